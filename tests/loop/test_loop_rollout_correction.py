"""optim.rollout_correction end to end: the default (none, max_staleness 0) run equals the
loop before the feature bit for bit, and a masked-IS run drops exactly the rows whose
engine log-probs disagree with the trainer's."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop_e2e import read, small_config, strip_timing  # noqa: E402

from caspo_jax.loop import caspo as caspo_mod  # noqa: E402
from caspo_jax.loop.config import apply_overrides, config_from_dict, config_to_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The main branch when rollout correction and staleness were added (#20): its caspo.py is the
# synchronous loop every default run must still equal.
BEFORE = "62f77cc"


def override(cfg, *items):
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(items)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("correction")
    cfg = small_config(tmp, "run.steps=2")
    from caspo_jax.loop.setup import build_policy

    return tmp, cfg, build_policy(cfg.model, cfg.data)


def _loop_before():
    """caspo_jax/loop/caspo.py as of BEFORE, loaded as its own module (skip when git or the
    commit is not at hand, e.g. in an sdist)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:caspo_jax/loop/caspo.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git commit {BEFORE} is not available")
    spec = importlib.util.spec_from_loader("caspo_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{BEFORE}:caspo_jax/loop/caspo.py", "exec"), module.__dict__)
    return module


def test_default_run_equals_the_loop_before_the_feature(base):
    """max_staleness 0 and rollout_correction none: every metric the old loop wrote and every
    final parameter are bit-for-bit equal; the new rows only add the correction metrics."""
    tmp, cfg, policy = base
    before = _loop_before()
    old = before.run_caspo(cfg, tmp / "before", policy=policy, progress=False, export=False)
    new = caspo_mod.run_caspo(cfg, tmp / "now", policy=policy, progress=False, export=False)
    old_rows, new_rows = strip_timing(read(tmp / "before" / "metrics.jsonl")), strip_timing(
        read(tmp / "now" / "metrics.jsonl"))
    assert len(old_rows) == len(new_rows) == 2
    for o, n in zip(old_rows, new_rows):
        assert {k: n[k] for k in o} == o
        assert set(n) - set(o) == {"rollout_correction/logp_gap_mean", "rollout_correction/logp_gap_max",
                                   "rollout_correction/weight_mean", "rollout_correction/weight_max",
                                   "rollout_correction/corrected_frac"}
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sequence_masked_is_drops_the_rows_the_engine_disagrees_on(base, monkeypatch):
    """The engine's log-probs of every even sample are shifted by -log 3 (mean log-ratio
    log 3 > log 2): mis_seq drops those rows, so the corrected share is their share of the
    valid tokens and the mean weight the rest's (their ratio is 1: the JAX sampler matches
    the trainer to ~1e-6); the log-prob gap reports the shift."""
    tmp, cfg, policy = base
    cfg = override(cfg, "run.steps=1", "optim.rollout_correction=mis_seq", "optim.mis_threshold=2.0")
    seen = {}
    make_engine = caspo_mod.make_rollout_engine

    class Shifted:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, prompts, *, n, sampling):
            r = self.inner.generate(prompts, n=n, sampling=sampling)
            even = (np.arange(len(r)) % 2 == 0)[:, None]
            seen["even_tokens"], seen["tokens"] = int(r.mask[even[:, 0]].sum()), int(r.mask.sum())
            return dataclasses.replace(r, logprobs=np.where(even & r.mask, r.logprobs - np.log(3.0), r.logprobs))

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(caspo_mod, "make_rollout_engine", lambda *a, **k: Shifted(make_engine(*a, **k)))
    caspo_mod.run_caspo(cfg, tmp / "mis", policy=policy, progress=False, export=False)
    (row,) = read(tmp / "mis" / "metrics.jsonl")
    share = seen["even_tokens"] / seen["tokens"]
    assert row["reward/failed_groups"] == 0.0
    assert row["rollout_correction/corrected_frac"] == pytest.approx(share, abs=1e-6)
    assert row["rollout_correction/weight_mean"] == pytest.approx(1 - share, abs=1e-4)
    assert row["rollout_correction/logp_gap_max"] == pytest.approx(np.log(3.0), abs=1e-4)
