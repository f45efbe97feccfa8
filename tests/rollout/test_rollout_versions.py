"""Weight versions: every Rollouts carries the version that produced it, and a push that
arrives while a request is being generated never mixes two versions within it (JAX
sampler in-process; remote workers through the client's ordering)."""

import threading
from concurrent.futures import Future

import jax
import numpy as np
import pytest

from caspo_jax.models import load_pretrained
from caspo_jax.remote import RemoteRolloutEngine, RolloutWorker, WorkerSpec
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams
from caspo_jax.tiny import models as tm

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tm.Path(tmp_path_factory.mktemp("versions"))
    tm.hf_model("vision", seed=0).save_pretrained(path)
    model, params = load_pretrained(path)
    other = jax.tree.map(lambda x: x * 1.5, params)  # another version: different tokens and log-probs
    return model, params, other


def _prompts():
    text = tm.make_batch([[11]], seed=1)
    image = tm.make_batch([[3, (1, 4, 4), 6]], seed=2)
    return [RolloutPrompt(text.input_ids[0]), RolloutPrompt(image.input_ids[0], image.pixel_values,
                                                            image.image_grid_thw)]


class _PausingModel:
    """The model, whose vision tower waits (once) for a push to land: the request has read
    its weights and the push arrives mid-generation."""

    def __init__(self, model):
        self._model = model
        self.started, self.release = threading.Event(), threading.Event()

    def encode_images(self, params, pixels, grids):
        self.started.set()
        assert self.release.wait(60), "the push never came"
        return self._model.encode_images(params, pixels, grids)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _same(a, b, atol=0.0):
    """Same tokens; log-probs equal (in-process) or within 1e-5 (weights rebuilt from bytes in
    a worker, as tests/distributed/test_distributed_remote.py)."""
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=atol)


def test_a_push_during_generation_applies_to_the_next_request(tiny):
    model, params, other = tiny
    want_old = JaxSampler(model, params).generate(_prompts(), n=2, sampling=SAMPLING)
    want_new = JaxSampler(model, other).generate(_prompts(), n=2, sampling=SAMPLING)
    assert not np.array_equal(want_old.logprobs, want_new.logprobs)
    sampler = JaxSampler(model, params, version=4)
    pausing = _PausingModel(model)
    sampler.model = pausing
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", sampler.generate(_prompts(), n=2,
                                                                                   sampling=SAMPLING)))
    thread.start()
    assert pausing.started.wait(60)
    sampler.sync_weights(other)  # None: the next version
    assert sampler.version == 5
    pausing.release.set()
    thread.join(120)
    assert out["r"].version == 4
    _same(out["r"], want_old)  # vision tower and decode loop both on version 4
    after = sampler.generate(_prompts(), n=2, sampling=SAMPLING)
    assert after.version == 5
    _same(after, want_new)
    sampler.sync_weights(params, version=9)
    assert sampler.generate(_prompts(), n=2, sampling=SAMPLING).version == 9


class _QueuedHandle:
    """A worker handle that runs calls one at a time in submission order on its own thread,
    like a one-process pool or a Ray actor; `gate` holds the worker's next call."""

    def __init__(self, spec):
        self.worker = RolloutWorker(spec)
        self.calls: list = []
        self.cond = threading.Condition()
        self.gate, self.held = threading.Event(), threading.Event()
        self.gate.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.calls)
                future, method, args = self.calls.pop(0)
            if not self.gate.is_set():
                self.held.set()
            assert self.gate.wait(60)
            future.set_result(getattr(self.worker, method)(*args))

    def submit(self, method, *args):
        future = Future()
        with self.cond:
            self.calls.append((future, method, args))
            self.cond.notify()
        return future

    result = staticmethod(lambda future, timeout=None: future.result(timeout))
    put = staticmethod(lambda value: value)
    close = staticmethod(lambda: None)


def test_remote_workers_serve_a_batch_with_one_version_while_a_push_waits(tiny):
    """Two workers; the second is held while the batch is in flight and the trainer pushes
    from another thread: the push queues behind the generation on both workers, the batch
    is version 1 throughout and equals one engine's at version 1; the next is version 2."""
    model, params, other = tiny
    spec = WorkerSpec.jax(model)
    handles = [_QueuedHandle(spec), _QueuedHandle(spec)]
    remote = RemoteRolloutEngine(model, handles, timeout=120)
    remote.sync_weights(params)
    assert remote.version == 1 and [i["version"] for i in remote.info()] == [1, 1]
    handles[1].gate.clear()
    out = {}
    generating = threading.Thread(target=lambda: out.setdefault("r", remote.generate(_prompts(), n=2,
                                                                                     sampling=SAMPLING)))
    generating.start()
    assert handles[1].held.wait(60)  # the batch reached both workers; worker 1 holds it
    pushing = threading.Thread(target=lambda: remote.sync_weights(other))
    pushing.start()
    pushing.join(0.5)
    assert pushing.is_alive()  # the push waits for worker 1's generation
    handles[1].gate.set()
    generating.join(120)
    pushing.join(120)
    assert out["r"].version == 1 and remote.version == 2
    _same(out["r"], JaxSampler(model, params).generate(_prompts(), n=2, sampling=SAMPLING), atol=1e-5)
    after = remote.generate(_prompts(), n=2, sampling=SAMPLING)
    assert after.version == 2
    _same(after, JaxSampler(model, other).generate(_prompts(), n=2, sampling=SAMPLING), atol=1e-5)


def test_parts_from_two_versions_are_refused():
    from caspo_jax.remote.client import _concat_rollouts
    from caspo_jax.rollout import Rollouts

    def part(version):
        return Rollouts(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32), np.ones((1, 2), bool),
                        np.asarray(["eos"]), np.zeros(1, np.int32), version=version)

    assert _concat_rollouts([part(3), part(3)], [1, 1]).version == 3
    with pytest.raises(RuntimeError, match=r"weight versions \[3, 4\]"):
        _concat_rollouts([part(3), part(4)], [1, 1])
