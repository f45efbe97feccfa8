"""vLLM (real, CPU build) behind the rollout interface, fed by the bridge.

Runs only in the vLLM environment: ``/work/venv-vllm/bin/python -m pytest -m vllm tests/rollout tests/bridge``.
Tolerance: float32 log-probs within 1e-4 of JAX (measured <= 4e-5 in vllm-on-cpu.md).
"""

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (build it with scripts/vllm_env.sh)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _rollout_vllm_fixtures import build_checkpoint, make_prompts  # noqa: E402

from caspo_jax.bridge import WeightSyncError, verify_sync  # noqa: E402
from caspo_jax.bridge.verify import vllm_slots  # noqa: E402
from caspo_jax.models import load_pretrained  # noqa: E402
from caspo_jax.rollout import JaxSampler, SamplingParams, VllmEngine  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, processor, eos = build_checkpoint(tmp_path_factory.mktemp("vllm_tiny"))
    model, params = load_pretrained(path)
    engine = VllmEngine.start(path, model, max_model_len=512, kv_cache_memory_bytes=64 * 2**20)
    yield engine, model, params, make_prompts(processor), eos
    engine.shutdown()


def _sgd_step(model, params, prompts, lr=0.5):
    """One optax SGD step on the prompts' mean negative log-likelihood."""
    def loss(p):
        return -sum(jnp.mean(jax.nn.log_softmax(model.forward(p, q.token_ids[None], pixel_values=q.pixel_values,
                                                                image_grid_thw=q.image_grid_thw)[0, :-1])
                             [jnp.arange(len(q.token_ids) - 1), q.token_ids[1:]]) for q in prompts)

    opt = optax.sgd(lr)
    updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
    return optax.apply_updates(params, updates)


def _response_logprobs(model, params, prompt, response):
    """JAX log-probs of a response: the forward runs on prompt + response[:-1] (the last
    token is never an input, so a sampled image-pad id there cannot be taken for an image)."""
    seq = np.concatenate([prompt.token_ids, response[:-1]])[None]
    logits = model.forward(params, seq, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    logp = np.asarray(jax.nn.log_softmax(logits[0, len(prompt.token_ids) - 1:], axis=-1))
    return logp[np.arange(len(response)), response]


def test_generate_n_samples_text_and_image_with_jax_logprobs(setup):
    engine, model, params, prompts, eos = setup
    assert engine.eos_token_ids == (eos,)
    # The image/video pad ids stop a response: fed back as input they would be taken for images.
    vision_ids = (model.config.image_token_id, model.config.video_token_id)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=1, stop_token_ids=vision_ids)
    rollouts = engine.generate(prompts, n=3, sampling=sampling)
    assert rollouts.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert set(rollouts.finish_reason) <= {"eos", "length", "stop"}
    assert len({tuple(rollouts.response(s)) for s in range(3)}) > 1
    again = engine.generate(prompts, n=3, sampling=sampling)
    np.testing.assert_array_equal(again.tokens, rollouts.tokens)  # a fixed seed reproduces
    worst = 0.0
    for s in range(len(rollouts)):
        prompt = prompts[rollouts.prompt_index[s]]
        response = rollouts.response(s)
        ref = _response_logprobs(model, params, prompt, response)
        worst = max(worst, float(np.abs(ref - rollouts.logprobs[s, : len(response)]).max()))
    assert worst <= 1e-4


def test_greedy_matches_the_jax_sampler(setup):
    engine, model, params, prompts, _ = setup
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    theirs = engine.generate(prompts, n=1, sampling=greedy)
    ours = JaxSampler(model, params, eos_token_ids=engine.eos_token_ids).generate(prompts, n=1, sampling=greedy)
    np.testing.assert_array_equal(theirs.tokens, ours.tokens)
    assert theirs.finish_reason.tolist() == ours.finish_reason.tolist()
    np.testing.assert_allclose(theirs.logprobs, ours.logprobs, atol=1e-4)
    # n greedy samples per prompt (vLLM alone refuses temperature 0 with n > 1): n equal rows
    group = engine.generate(prompts, n=3, sampling=greedy)
    ours3 = JaxSampler(model, params, eos_token_ids=engine.eos_token_ids).generate(prompts, n=3, sampling=greedy)
    np.testing.assert_array_equal(group.prompt_index, ours3.prompt_index)
    np.testing.assert_array_equal(group.tokens, ours3.tokens)
    np.testing.assert_array_equal(group.tokens[::3], theirs.tokens)
    np.testing.assert_allclose(group.logprobs, ours3.logprobs, atol=1e-4)


@pytest.mark.parametrize("transport", ["in_process", "dlpack", "safetensors"])
def test_push_after_a_training_step_changes_outputs_and_originals_restore_them(setup, transport):
    engine, model, params, prompts, _ = setup
    engine.transport = "in_process" if transport == "dlpack" else transport
    engine.dlpack = transport == "dlpack"
    engine.bucket_bytes = 256 * 1024  # several buckets for the bytes transport
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    before = engine.generate(prompts, n=1, sampling=greedy)
    trained = _sgd_step(model, params, prompts)
    try:
        engine.sync_weights(trained, probes=prompts)  # verifies log-probs within 1e-4
        after = engine.generate(prompts, n=1, sampling=greedy)
        assert not np.array_equal(after.tokens, before.tokens) or not np.allclose(after.logprobs, before.logprobs)
        jax_after = JaxSampler(model, trained, eos_token_ids=engine.eos_token_ids).generate(prompts, n=1,
                                                                                            sampling=greedy)
        np.testing.assert_array_equal(after.tokens, jax_after.tokens)
    finally:
        engine.transport, engine.dlpack = "in_process", False
        engine.sync_weights(params)
    restored = engine.generate(prompts, n=1, sampling=greedy)
    np.testing.assert_array_equal(restored.tokens, before.tokens)
    np.testing.assert_array_equal(restored.logprobs, before.logprobs)


def test_prompt_logprobs_agree_and_a_bad_tensor_is_named(setup):
    engine, model, params, prompts, _ = setup
    assert verify_sync(engine, params, prompts) <= 1e-4
    from caspo_jax.bridge.transport import in_process_worker

    vllm_model = in_process_worker(engine.llm).model_runner.get_model()
    target = vllm_slots(model.param_table())["model.layers.1.post_attention_layernorm.weight"][0]
    parameter = dict(vllm_model.named_parameters())[target]
    try:
        parameter.data.mul_(1.5)  # a stale/mis-mapped tensor in the engine
        engine.llm.reset_prefix_cache()
        with pytest.raises(WeightSyncError, match="first bad tensor: model.layers.1.post_attention_layernorm.weight"):
            verify_sync(engine, params, prompts)
    finally:
        engine.sync_weights(params)
    assert verify_sync(engine, params, prompts) <= 1e-4


def test_image_resized_differently_is_named(setup):
    engine, model, params, prompts, _ = setup
    image = prompts[1]
    bad = type(image)(image.token_ids, image.pixel_values, image.image_grid_thw,
                      (image.images[0].resize((image.images[0].width * 2, image.images[0].height * 2)),))
    with pytest.raises(ValueError, match="prompt 0: vLLM built"):
        engine.generate([bad], n=1, sampling=SamplingParams(max_new_tokens=2))


def test_same_image_after_a_push_gets_the_new_weights_logprobs(setup):
    """vllm#44910: an image seen before a push must be encoded again after it. Only the
    vision tower changes, so an encoder cache reused across the push would give the old
    log-probs exactly; the response log-probs after the push are the new weights' (JAX,
    1e-4) and far from the old ones. The push's version is what the rollouts report."""
    engine, model, params, prompts, _ = setup
    image_prompt = [prompts[1]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    new = params.replace(vision=jax.tree.map(lambda x: x * 1.5, params.vision))
    before = engine.generate(image_prompt, n=1, sampling=greedy)
    assert before.version == engine.version
    try:
        engine.sync_weights(new, version=engine.version + 7)
        after = engine.generate(image_prompt, n=1, sampling=greedy)
        assert after.version == before.version + 7
        response = after.response(0)
        got = after.logprobs[0, : len(response)]
        want_new = _response_logprobs(model, new, image_prompt[0], response)
        want_old = _response_logprobs(model, params, image_prompt[0], response)
        assert float(np.abs(got - want_new).max()) <= 1e-4
        assert float(np.abs(want_new - want_old).max()) > 1e-2  # the vision change reaches the log-probs
    finally:
        engine.sync_weights(params)
    restored = engine.generate(image_prompt, n=1, sampling=greedy)
    np.testing.assert_array_equal(restored.tokens, before.tokens)
    np.testing.assert_array_equal(restored.logprobs, before.logprobs)
