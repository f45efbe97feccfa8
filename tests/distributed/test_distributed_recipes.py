"""The launch recipes parse as bash and name only sub-commands and flags that exist."""

import re
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[2] / "launch" / "recipes"
SCRIPTS = sorted(p for p in RECIPES.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_every_recipe_is_documented():
    readme = (RECIPES / "README.md").read_text()
    assert len(SCRIPTS) == 3 and all(f"`{p.name}`" in readme for p in SCRIPTS)
    configs = sorted(RECIPES.glob("*.yaml"))
    assert configs and all(f"`{p.name}`" in readme for p in configs)


@pytest.mark.parametrize("config", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_config_recipe_validates_on_the_7b_preset_with_the_sets_its_header_names(config):
    """A run-config recipe loads over the preset its header names, with the --set values it
    shows (every field exists and the combination validates)."""
    from caspo_jax.loop.config import load_config

    header = config.read_text().split("\nrollout:")[0]
    sets = re.findall(r"--set (\S+=\S+)", header)
    assert sets, "the header shows the command with its --set values"
    preset = re.search(r"--preset (\S+)", header).group(1)
    cfg = load_config(preset=preset, path=config, overrides=sets)
    assert cfg.rollout.workers == "ray" and cfg.rollout.num_workers >= 1


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_recipe_parses_and_uses_real_flags(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    from caspo_jax.launch.cli import build_parser

    text = script.read_text()
    if "caspo train" in text:
        parser = build_parser(["train"])
        args = parser.parse_args(["train", "--preset", "qwen2_5_vl_7b", "--set", "model.path=/m", "--out", "/r",
                                  "--set", "run.mesh_fsdp=8"])
        assert args.preset == "qwen2_5_vl_7b" and args.out == "/r"
    for field in ("run.mesh_data", "run.mesh_fsdp", "run.mesh_tensor"):
        if field in text:
            from caspo_jax.loop.config import RunConfig

            assert field.split(".")[1] in RunConfig.__dataclass_fields__
