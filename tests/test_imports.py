"""Imports sit at module top: a reader sees a module's dependencies in its first lines,
and an import cycle fails at import time instead of half-way through a run.

The only imports allowed inside a function are the optional heavy dependencies, which a
plain install does not have or which cost seconds that most commands never need:

- ``vllm`` (GPU rollout engine, its own environment), ``torch`` (HF parity, vLLM weight
  push; test extra only), ``ray`` (multi-host rollout workers), ``matplotlib`` (figures);
- ``safetensors.torch``: safetensors' torch half, which imports torch.

The CLI's dispatch table (``caspo_jax.launch.cli.SUBCOMMANDS``) loads the chosen
sub-command's module with ``importlib.import_module``: that is dispatch, not an import
statement, and keeps ``caspo --help`` from starting JAX.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY_FOLDERS = ("caspo_jax", "models", "evals", "launch")
OPTIONAL_HEAVY = ("vllm", "torch", "ray", "matplotlib", "safetensors.torch")

# Files whose function-level imports other helpers of issue #19 convert; the coordinator
# empties this set after merging their branches. A listed file that has no function-level
# import left fails the test, so the set cannot go stale.
PENDING = {
    "caspo_jax/hf_checkpoint.py",
    "caspo_jax/rewards/__init__.py",
    "caspo_jax/rewards/reward_model.py",
    "caspo_jax/rollout/jax_engine.py",
    "caspo_jax/step/optimizer.py",
    "caspo_jax/tiny/models.py",
    "caspo_jax/tiny/qwen3_vl.py",
    "launch/dryrun.py",
    "launch/train_cmd.py",
    "models/__init__.py",
}


def _is_optional_heavy(module: str) -> bool:
    return any(module == heavy or module.startswith(heavy + ".") for heavy in OPTIONAL_HEAVY)


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function body (nested ones too) whose module
    is not an optional heavy dependency. A relative import is reported with its dots."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if not _is_optional_heavy(a.name))
            elif in_function and isinstance(child, ast.ImportFrom):
                module = "." * child.level + (child.module or "")
                if child.level or not _is_optional_heavy(module):
                    found.append((child.lineno, module))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def _library_files() -> list[pathlib.Path]:
    return sorted(p for folder in LIBRARY_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_functions_import_only_optional_heavy_dependencies():
    offenders = []
    for path in _library_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in PENDING:
            continue
        offenders += [f"{rel}:{line}: {module}" for line, module in function_level_imports(path.read_text())]
    assert not offenders, (
        "imports inside functions (move them to the module's top; only "
        f"{', '.join(OPTIONAL_HEAVY)} may stay lazy):\n" + "\n".join(offenders))


def test_pending_files_still_have_function_level_imports():
    """Once a PENDING file is converted, it leaves PENDING (and is checked like the rest)."""
    missing = sorted(rel for rel in PENDING if not (ROOT / rel).is_file())
    assert not missing, f"PENDING names files that do not exist: {missing}"
    done = sorted(rel for rel in PENDING if not function_level_imports((ROOT / rel).read_text()))
    assert not done, f"these PENDING files have no function-level import left; remove them from PENDING: {done}"


def test_the_check_sees_nested_and_relative_imports_but_not_optional_heavy_ones():
    source = (
        "import json\n"
        "def f():\n"
        "    import numpy as np\n"
        "    import torch\n"
        "    from matplotlib import pyplot\n"
        "    def g():\n"
        "        from caspo_jax.errors import UserError\n"
        "    from . import sibling\n"
        "    from safetensors.torch import load\n"
        "    from safetensors.numpy import save\n"
        "class C:\n"
        "    def method(self):\n"
        "        import ray, yaml\n"
    )
    assert function_level_imports(source) == [
        (3, "numpy"), (7, "caspo_jax.errors"), (8, "."), (10, "safetensors.numpy"), (13, "yaml")]
