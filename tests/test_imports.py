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


def _is_optional_heavy(module: str) -> bool:
    return any(module == heavy or module.startswith(heavy + ".") for heavy in OPTIONAL_HEAVY)


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function body (nested ones too) whose module
    is not an optional heavy dependency. A relative import is reported with its dots."""
    found: list[tuple[int, str]] = []

    def imports_torch(function: ast.AST) -> bool:
        return any(isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names)
                   for n in ast.walk(function))

    def visit(node: ast.AST, in_function: bool, torch_path: bool) -> None:
        for child in ast.iter_child_nodes(node):
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            inside = in_function or is_function
            torch_here = torch_path or (is_function and imports_torch(child))

            def allowed(module: str) -> bool:
                # transformers' PyTorch models go with torch, in the function that imports torch
                return _is_optional_heavy(module) or (torch_path and module.split(".")[0] == "transformers")

            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if not allowed(a.name))
            elif in_function and isinstance(child, ast.ImportFrom):
                module = "." * child.level + (child.module or "")
                if child.level or not allowed(module):
                    found.append((child.lineno, module))
            visit(child, inside, torch_here)

    visit(ast.parse(source), False, False)
    return found


def _library_files() -> list[pathlib.Path]:
    return sorted(p for folder in LIBRARY_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_functions_import_only_optional_heavy_dependencies():
    offenders = []
    for path in _library_files():
        rel = path.relative_to(ROOT).as_posix()
        offenders += [f"{rel}:{line}: {module}" for line, module in function_level_imports(path.read_text())]
    assert not offenders, (
        "imports inside functions (move them to the module's top; only "
        f"{', '.join(OPTIONAL_HEAVY)} may stay lazy):\n" + "\n".join(offenders))


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
        "def torch_reference():\n"
        "    import torch\n"
        "    from transformers import Qwen2_5_VLForConditionalGeneration\n"
        "def tokenizer_only():\n"
        "    from transformers import AutoTokenizer\n"
    )
    assert function_level_imports(source) == [
        (3, "numpy"), (7, "caspo_jax.errors"), (8, "."), (10, "safetensors.numpy"), (13, "yaml"), (18, "transformers")]
