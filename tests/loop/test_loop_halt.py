"""A run whose rewards fail stops and says so (issue #22) instead of training nothing.

- every group failing for run.halt_failed_steps consecutive steps saves the step, then
  raises RunHalted naming the knobs and the reward's own error; --resume continues;
- a reward that cannot score the training records at all (the demo reward on other
  data) is a UserError before any model is built;
- the failed share is a metric and is shown in the progress bar.

The runs use the smallest tiny model (model.tiny=test) and share one policy, so the
jitted functions compile once for the file.
"""

import json

import pytest

from caspo_jax.data.records import load_records
from caspo_jax.errors import RunHalted, UserError
from caspo_jax.rewards import FunctionReward
from caspo_jax.loop import caspo as caspo_mod
from caspo_jax.loop.config import ConfigError, load_config

SMALL = ["model.tiny=test", "data.demo_train=24", "data.demo_eval=12", "data.max_response_len=8",
         "data.max_prompt_len=256", "algo.prompts_per_step=2", "algo.group_size=4", "optim.minibatch_size=8",
         "run.steps=3", "run.save_every=0", "run.eval_every=0", "algo.variant=token", "run.halt_failed_steps=2"]
JUDGE_DOWN = "judge at http://127.0.0.1:9/v1 refused the connection"


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_steps(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def policy():
    from caspo_jax.loop.setup import build_policy

    cfg = load_config(preset="tiny-cpu", overrides=SMALL)
    return build_policy(cfg.model, cfg.data)


def failing_reward(fail_on_calls):
    """make_reward's stand-in: the demo reward, except that on the given calls (1-based
    steps) every response fails as if the judge were down."""
    calls = {"n": 0}
    demo = caspo_mod.make_reward({"kind": "demo"})

    def make_reward(spec):
        def score(prompt, response):
            if calls["n"] in fail_on_calls:
                raise ConnectionError(JUDGE_DOWN)
            return demo.fn(prompt, response)

        reward = FunctionReward(score, name="judge")
        inner = reward.score

        def counted(prompts, responses):
            calls["n"] += 1
            return inner(prompts, responses)

        reward.score = counted
        return reward

    return make_reward


def test_every_reward_failing_halts_after_saving_and_resumes(tmp_path, policy, monkeypatch):
    cfg = load_config(preset="tiny-cpu", overrides=SMALL)
    out = tmp_path / "run"
    monkeypatch.setattr(caspo_mod, "make_reward", failing_reward(fail_on_calls={1, 2, 3}))
    with pytest.raises(RunHalted) as halted:
        caspo_mod.run_caspo(cfg, out, policy=policy, progress=False, export=False)
    message = str(halted.value)
    for part in ("after step 2", "run.halt_failed_steps=2", "run.halt_failed_share=1.0", JUDGE_DOWN, "--resume",
                 str(out / "checkpoints")):
        assert part in message, part
    assert saved_steps(out) == [2]  # run.save_every=0: only the halt saved it
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2]
    for row in got:
        assert row["reward/failed_group_frac"] == 1.0 and row["reward/failed_groups"] == 2.0
        assert row["reward/mean"] is None and row["loss"] == 0.0 and row["grad_norm"] == 0.0
        assert row["token_reward_std"] == 0.0 and row["zero_variance_group_frac"] == 0.0
    monkeypatch.undo()  # the judge is back: --resume continues from the saved step
    caspo_mod.run_caspo(cfg, out, policy=policy, progress=False, export=False, resume=True)
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3] and got[2]["reward/failed_group_frac"] == 0.0
    assert got[2]["grad_norm"] > 0


def test_failures_that_are_not_consecutive_do_not_halt(tmp_path, policy, monkeypatch):
    cfg = load_config(preset="tiny-cpu", overrides=SMALL)
    monkeypatch.setattr(caspo_mod, "make_reward", failing_reward(fail_on_calls={1, 3}))
    caspo_mod.run_caspo(cfg, tmp_path / "run", policy=policy, progress=False, export=False)
    assert [r["reward/failed_group_frac"] for r in rows(tmp_path / "run")] == [1.0, 0.0, 1.0]


def test_demo_reward_on_other_records_is_rejected_before_any_model_is_built(tmp_path, monkeypatch):
    from caspo_jax.demo.task import make_split, write_split

    paths = write_split(make_split(6, 0), tmp_path / "data", "train")
    records = [json.loads(line) for line in paths["records"].read_text().splitlines()]
    custom = tmp_path / "data" / "custom.jsonl"
    custom.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "reference"}) + "\n" for r in records))

    def no_model(*args, **kwargs):
        raise AssertionError("the policy was built before the reward was checked")

    monkeypatch.setattr(caspo_mod, "build_policy", no_model)
    cfg = load_config(preset="tiny-cpu", overrides=SMALL + [f"data.train={custom}"])
    with pytest.raises(UserError) as rejected:
        caspo_mod.run_caspo(cfg, tmp_path / "run", progress=False, export=False)
    message = str(rejected.value)
    for part in ("reward.kind='demo' (the default)", f"data.train={str(custom)!r}", "6 of 6 records",
                 repr(records[0]["id"]), "reference", "'judge' or 'function'"):
        assert part in message, part
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # the demo's own records pass the same check
    assert caspo_mod.make_reward({"kind": "demo"}).check_records(load_records(paths["records"])) is None


def test_progress_bar_shows_the_failed_share(tmp_path):
    from caspo_jax.loop.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False, progress=True, total_steps=2)
    writer.write(1, {"reward/mean": float("nan"), "reward/failed_group_frac": 1.0, "loss": 0.0})
    shown = writer._bar.postfix
    writer.close()
    assert "failed=1" in shown and "loss=0" in shown and "reward" not in shown  # a NaN mean is left out


def test_step_0_metrics_do_not_advance_the_progress_bar(tmp_path):
    from caspo_jax.loop.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False, progress=True, total_steps=2)
    writer.write(0, {"eval_standard/warning_auc": 0.5})  # the evaluation before RL
    writer.write(1, {"loss": 0.0})
    count = writer._bar.n
    writer.close()
    assert count == 1


@pytest.mark.parametrize("override", ["run.halt_failed_share=0", "run.halt_failed_share=1.5",
                                      "run.halt_failed_steps=-1"])
def test_halt_knobs_are_validated(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(preset="tiny-cpu", overrides=[override])


def test_halt_knob_defaults_are_every_group_for_three_steps():
    run = load_config(preset="tiny-cpu").run
    assert (run.halt_failed_share, run.halt_failed_steps) == (1.0, 3)
