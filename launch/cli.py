"""The ``caspo`` command line.

Why argparse: it is in the standard library, gives sub-commands, ``--help`` and typed
flags, and our typed config (dataclasses + YAML) does the heavy lifting, so a CLI
framework would add a dependency without removing code.

Sub-commands are declared once in ``SUBCOMMANDS`` as (name, module, help). A module
is imported only when its sub-command runs, so ``caspo --help`` stays instant (no
JAX start-up). Each module provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...   # process exit status

Errors a user can act on (`caspo_jax.errors.CaspoError`: bad config, data, images,
checkpoint directories; a run that halted itself) end as ONE line on stderr,
``caspo: <message>``, and the error's exit code (2: bad input, 3: the run halted after
saving) -- never a traceback. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from tqdm import tqdm

from caspo_jax import __version__
from caspo_jax.errors import CaspoError

# (name, module implementing add_arguments/run, one-line help). Add new commands here.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("eval", "caspo_jax.evals.cli", "Generate, judge (R/S/E, SIUO, MSSBench) and report a model; --compare two runs"),
    ("curate", "caspo_jax.curate.cli", "Build latent-hazard data: synthesize, filter, dedup, images, rewrite, respond, select, dpo"),
    ("dryrun", "caspo_jax.launch.dryrun", "Size a run without devices: mesh, per-device memory, step FLOPs for a preset and topology"),
    ("train", "caspo_jax.launch.train_cmd", "CASPO policy optimisation (Algorithm 1): rollouts, rewards, advantages, updates"),
    ("sft", "caspo_jax.launch.sft_cmd", "Supervised fine-tuning on (image, query, response), optionally with constitutions"),
    ("dpo", "caspo_jax.launch.dpo_cmd", "DPO on preference pairs against a frozen reference (static baseline)"),
    ("demo", "caspo_jax.launch.demo_cmd", "Built-in tiny run on 2 CPU cores: SFT -> CASPO -> risk-failure table and plots"),
    ("plot", "caspo_jax.launch.plot_cmd", "PNG figures of entropy, KL, response length and reward of runs"),
    ("sweep", "caspo_jax.launch.sweep_cmd", "Advantage cells x seeds on a preset: a table with 95%% intervals and one figure"),
    ("rm", "caspo_jax.launch.rm_cmd", "Train the reward model: Bradley-Terry pairs + lambda * MSE on RSE scores (eq. 7)"),
]


def _load(module_name: str):
    return importlib.import_module(module_name)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Parser with every sub-command; only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(
        prog="caspo",
        description=(
            "CASPO: consequence-aware safety policy optimisation for Qwen-VL models "
            "in JAX, with OOD-MMSafe-style evaluation."
        ),
    )
    parser.add_argument("--version", action="version", version=f"caspo-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, module_name, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _load(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def one_line(message: object) -> str:
    """A message as one line: its lines joined with "; " (indentation dropped)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _close_progress_bars() -> None:
    """Ends the progress bars still drawn (an error raised mid-run leaves the run's bar open),
    so the error message starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def report_error(exc: CaspoError) -> int:
    """Prints ``caspo: <message>`` as one line on stderr (a message that already names its
    command, ``caspo sweep: ...``, is printed as it is); returns the error's exit code."""
    _close_progress_bars()
    text = one_line(exc)
    print(text if text.startswith("caspo") else f"caspo: {text}", file=sys.stderr, flush=True)
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    try:
        return int(args._module.run(args) or 0)
    except CaspoError as exc:  # every sub-command: one line, the error's exit code
        return report_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
