"""A `reward.kind=function` target for the trainer-SIGKILL test: the demo reward, and one
line per scored (= trained) batch with its sorted prompt ids, appended to the file named by
$CASPO_TEST_TRAINED (flushed at once, so a SIGKILL loses nothing written)."""

import json
import os

from caspo_jax.demo.task import demo_reward


def score(prompts, responses):
    with open(os.environ["CASPO_TEST_TRAINED"], "a", encoding="utf-8") as out:
        out.write(json.dumps(sorted({p.id for p in prompts})) + "\n")
    return [demo_reward(p, r) for p, r in zip(prompts, responses)]
