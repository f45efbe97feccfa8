"""Fail when `pip install ".[gpu]"` would put two CUDA majors under JAX and torch.

JAX and torch share one process (and one GPU) when the trainer hosts an in-process vLLM
engine; JAX's CUDA plugin (jax-cudaNN-plugin) and torch's CUDA wheels (torch's own
requirements: cuda-toolkit==NN.x, nvidia-cudnn-cuNN, nvidia-nccl-cuNN, ...) must then be of
one CUDA major. This asks pip's resolver what the extra resolves to (`pip install --dry-run
--ignore-installed --report`, so it runs wherever the registry is reachable and installs
nothing) and compares the two majors. Other packages that ship wheels of both majors
(vLLM's CUTLASS DSL libraries) are listed, not judged: they are vLLM's business.

    python scripts/check_cuda_majors.py                 # resolve ".[gpu]" from this checkout
    python scripts/check_cuda_majors.py --report r.json # judge a saved pip report
Exit status: 0 one major, 1 two majors (or none found for a side), 2 pip could not resolve.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_JAX_PLUGIN = re.compile(r"^jax-cuda(\d+)-(plugin|pjrt)$")
_SUFFIXED = re.compile(r"^nvidia-[a-z0-9-]+?-cu(\d+)$")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$")


def _packages(report: dict) -> dict[str, dict]:
    """name (lower case) -> metadata of every package the report installs."""
    return {item["metadata"]["name"].lower(): item["metadata"] for item in report.get("install", [])}


def _applies_on_linux(requirement: str) -> bool:
    """Whether a Requires-Dist line applies to a plain Linux install (no extras): its marker,
    if any, names Linux and no extra."""
    _, _, marker = requirement.partition(";")
    return not marker or ("extra" not in marker and ("linux" in marker.lower() or "platform" not in marker))


def torch_cuda_major(report: dict) -> int | None:
    """The CUDA major torch's wheel is built on, from torch's own requirements (cuda-toolkit==NN,
    nvidia-*-cuNN); None for a CPU build or no torch."""
    torch = _packages(report).get("torch")
    if torch is None:
        return None
    majors = set()
    for requirement in torch.get("requires_dist") or []:
        if not _applies_on_linux(requirement):
            continue
        name, _, spec = _REQUIREMENT.match(requirement.split(";")[0]).groups()
        name = name.lower()
        if name == "cuda-toolkit":
            majors |= {int(m) for m in re.findall(r"==\s*(\d+)", spec)}
        elif (m := _SUFFIXED.match(name)) is not None:
            majors.add(int(m.group(1)))
    if len(majors) > 1:
        raise ValueError(f"torch {torch['version']} itself requires CUDA majors {sorted(majors)}")
    return majors.pop() if majors else None


def jax_cuda_major(report: dict) -> int | None:
    """The CUDA major of JAX's plugin (jax-cudaNN-plugin / -pjrt); None without one."""
    majors = {int(m.group(1)) for name in _packages(report) if (m := _JAX_PLUGIN.match(name))}
    if len(majors) > 1:
        raise ValueError(f"JAX plugins of several CUDA majors resolved: {sorted(majors)}")
    return majors.pop() if majors else None


def suffixed_wheels(report: dict) -> dict[int, list[str]]:
    """CUDA major -> the nvidia-*-cuNN wheels the report installs (what lands beside each other)."""
    out: dict[int, list[str]] = {}
    for name, meta in sorted(_packages(report).items()):
        if (m := _SUFFIXED.match(name)) is not None:
            out.setdefault(int(m.group(1)), []).append(f"{name}=={meta['version']}")
    return out


def judge(report: dict) -> tuple[bool, list[str]]:
    """(one major?, the lines to print)."""
    jax_major, torch_major = jax_cuda_major(report), torch_cuda_major(report)
    packages = _packages(report)
    version = {name: packages[name]["version"] for name in ("jax", "torch", "vllm") if name in packages}
    lines = [f"resolved: {', '.join(f'{k} {v}' for k, v in version.items())}",
             f"JAX's CUDA plugin: {'CUDA ' + str(jax_major) if jax_major else 'none'}; "
             f"torch's CUDA wheels: {'CUDA ' + str(torch_major) if torch_major else 'none (CPU build or no torch)'}"]
    for major, names in suffixed_wheels(report).items():
        lines.append(f"  -cu{major} wheels: {', '.join(names)}")
    ok = jax_major is not None and jax_major == torch_major
    if ok:
        lines.append(f"OK: JAX and torch share CUDA {jax_major}")
    elif jax_major is None or torch_major is None:
        lines.append("FAIL: no CUDA major found for " + " and ".join(
            side for side, major in (("JAX", jax_major), ("torch", torch_major)) if major is None))
    else:
        lines.append(f"FAIL: JAX's plugin is CUDA {jax_major} but torch is built on CUDA {torch_major}: pick "
                     f"jax[cuda{torch_major}] in pyproject.toml's gpu extra (or pin vllm/torch to a CUDA {jax_major} "
                     "build)")
    return ok, lines


def resolve_report(target: str, python: str = sys.executable) -> dict:
    """pip's resolution of ``target`` (e.g. ".[gpu]") as a report, nothing installed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(path),
               target]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="a saved `pip install --dry-run --report` JSON to judge")
    parser.add_argument("--target", default=".[gpu]", help="what to resolve (default: this checkout's gpu extra)")
    parser.add_argument("--save", type=Path, help="also write the resolved report here")
    args = parser.parse_args(argv)
    if args.report:
        report = json.loads(args.report.read_text())
    else:
        try:
            report = resolve_report(args.target)
        except RuntimeError as err:
            print(f"check_cuda_majors: {err}", file=sys.stderr)
            return 2
        if args.save:
            args.save.write_text(json.dumps(report, indent=1))
    ok, lines = judge(report)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
