"""RolloutProducer without a model: the staleness bound, pushes between batches only,
pausing, and failures that reach the trainer as one clear error instead of a hang."""

import threading
import time

import pytest

from caspo_jax.rollout.producer import RolloutEngineError, RolloutProducer


class FakeEngine:
    """Records (step, version) of every batch and every push; `hold` blocks generation."""

    def __init__(self, version=0):
        self.version = version
        self.log = []
        self.hold = threading.Event()
        self.hold.set()
        self.in_generate = threading.Event()

    def sync_weights(self, params, version=None):
        assert not self.in_generate.is_set(), "a push during a generation"
        self.log.append(("push", version))
        self.version = version

    def produce(self, step, engine):
        self.in_generate.set()
        version = self.version
        assert self.hold.wait(30)
        self.in_generate.clear()
        self.log.append(("batch", step, version))
        return f"batch {step}", version


def trainer(producer, steps, start=0, update_s=0.0):
    """Takes each batch, 'trains', publishes the next version; returns the staleness per step."""
    staleness = []
    for step in range(start, start + steps):
        got = producer.take(step)
        assert got.item == f"batch {step}"
        staleness.append(step - got.version)
        time.sleep(update_s)
        producer.publish(f"params {step + 1}", step + 1)
    return staleness


@pytest.mark.parametrize("k", [1, 2])
def test_batches_are_never_more_than_k_versions_old(k):
    engine = FakeEngine()
    producer = RolloutProducer(engine, engine.produce, start=0, end=8, max_staleness=k, timeout_s=30, version=0)
    staleness = trainer(producer, 8, update_s=0.02)
    producer.close()
    assert all(0 <= s <= k for s in staleness) and max(staleness) == k  # it does run ahead, by k at most
    for entry in engine.log:
        if entry[0] == "batch":
            _, step, version = entry
            assert version >= step - k
    # with the trainer slower than generation, the producer waits for each version
    assert [e[1] for e in engine.log if e[0] == "push"] == sorted(e[1] for e in engine.log if e[0] == "push")


def test_resume_start_and_no_batch_beyond_the_end():
    engine = FakeEngine(version=5)
    producer = RolloutProducer(engine, engine.produce, start=5, end=7, max_staleness=1, timeout_s=30, version=5)
    assert trainer(producer, 2, start=5) == [0, 1]
    producer.close()
    assert [e[1] for e in engine.log if e[0] == "batch"] == [5, 6]


def test_pause_gives_the_engine_to_the_caller_between_batches():
    engine = FakeEngine()
    producer = RolloutProducer(engine, engine.produce, start=0, end=4, max_staleness=1, timeout_s=30, version=0)
    producer.take(0)
    with producer.paused() as paused_engine:
        assert paused_engine is engine and not engine.in_generate.is_set()
        engine.sync_weights("eval weights", version=1)  # the caller installs version 1 itself
        producer.publish("params 1", 1)
        time.sleep(0.1)
        assert not engine.in_generate.is_set()  # still paused
    got = producer.take(1)
    producer.publish("params 2", 2)
    producer.take(2)
    producer.close()
    assert [e for e in engine.log if e[0] == "push"].count(("push", 1)) == 1  # not pushed twice
    assert got.version in (0, 1)


def test_a_failing_engine_reaches_the_trainer_as_one_error():
    engine = FakeEngine()

    def produce(step, eng):
        if step == 1:
            raise BrokenPipeError("worker 0 died")
        return engine.produce(step, eng)

    producer = RolloutProducer(engine, produce, start=0, max_staleness=1, timeout_s=30, version=0)
    producer.take(0)
    with pytest.raises(RolloutEngineError, match=r"failed while generating step 2's rollouts: BrokenPipeError: "
                                                 r"worker 0 died.*--resume"):
        producer.take(1)
    producer.close()


def test_a_hung_engine_times_out():
    engine = FakeEngine()
    engine.hold.clear()  # the first generation never returns
    producer = RolloutProducer(engine, engine.produce, start=0, max_staleness=1, timeout_s=0.5, version=0)
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=r"no rollouts for step 1 within rollout.timeout_s=0.5 s"):
        producer.take(0)
    assert time.perf_counter() - start < 10
    with pytest.raises(RolloutEngineError, match="did not pause"):
        with producer.paused():
            pass
    engine.hold.set()
    producer.close()
