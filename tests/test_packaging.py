"""The package layout contract: top-level folders installed inside ``caspo_jax``."""

import pathlib
import subprocess
import sys
import tomllib

import caspo_jax
from caspo_jax.launch import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_declared():
    """A package folder missing from pyproject would vanish from non-editable installs."""
    tool = _pyproject()["tool"]["setuptools"]
    declared = set(tool["packages"])
    dirs = tool["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    # A sub-folder mapped on its own (caspo_jax.models -> models/) is not also under caspo_jax/.
    assert found == declared, f"undeclared: {found - declared}, stale: {declared - found}"


def test_subpackages_resolve_to_top_level_folders():
    import caspo_jax.evals
    import caspo_jax.launch
    import caspo_jax.models

    for mod, folder in [(caspo_jax.models, "models"), (caspo_jax.evals, "evals"), (caspo_jax.launch, "launch")]:
        assert pathlib.Path(mod.__file__).parent == ROOT / folder


def test_no_generic_top_level_names_installed():
    """`import models` must not pick up our folder from site-packages."""
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('models') is None and importlib.util.find_spec('evals') is None else 1)"
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True)
    assert res.returncode == 0


def test_version_matches_pyproject():
    assert caspo_jax.__version__ == _pyproject()["project"]["version"]


def test_cli_version_and_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert caspo_jax.__version__ in capsys.readouterr().out
    assert cli.main([]) == 0
    assert "usage: caspo" in capsys.readouterr().out


def test_cli_rejects_unknown_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2


def test_console_script_installed():
    exe = pathlib.Path(sys.executable).parent / "caspo"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and caspo_jax.__version__ in res.stdout


def test_test_extra_pins_cpu_torch_and_no_torchvision():
    deps = _pyproject()["project"]["optional-dependencies"]["test"]
    assert "torch==2.13.0" in deps
    all_deps = " ".join(d for group in _pyproject()["project"]["optional-dependencies"].values() for d in group)
    all_deps += " ".join(_pyproject()["project"]["dependencies"])
    assert "torchvision" not in all_deps
