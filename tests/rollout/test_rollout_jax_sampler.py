"""The JAX sampler against unmodified transformers (greedy) and the full forward (log-probs).

Tolerances: greedy tokens exactly equal; log-probs within 1e-5 (float32) of
``log_softmax(model.forward(prompt + response))`` gathered at the sampled tokens.
The sampler never samples the multimodal placeholders (``MULTIMODAL``), so transformers'
``generate`` gets them as ``suppress_tokens`` (its own logits processor, the reference
otherwise unmodified).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caspo_jax.models import load_pretrained
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams, bucket
from caspo_jax.tiny import models as tm

MULTIMODAL = [tm.IMAGE_TOKEN_ID, tm.VIDEO_TOKEN_ID, tm.VISION_START_TOKEN_ID, tm.VISION_END_TOKEN_ID]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tm.hf_model("vision", seed=0)
    path = tm.Path(tmp_path_factory.mktemp("tiny"))
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    return hf, model, params


def _prompts():
    text = tm.make_batch([[11]], seed=1)
    image = tm.make_batch([[3, (1, 4, 4), 6]], seed=2)
    return [
        RolloutPrompt(text.input_ids[0]),
        RolloutPrompt(image.input_ids[0], image.pixel_values, image.image_grid_thw),
    ]


def _hf_greedy(hf, prompt: RolloutPrompt, max_new: int) -> np.ndarray:
    hf.model.rope_deltas = None
    ids = torch.tensor(prompt.token_ids[None].astype(np.int64))
    kwargs = {}
    if prompt.image_grid_thw is not None:
        kwargs = dict(pixel_values=torch.tensor(prompt.pixel_values), image_grid_thw=torch.tensor(prompt.image_grid_thw),
                      mm_token_type_ids=(ids == tm.IMAGE_TOKEN_ID).long())
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                      eos_token_id=tm.VISION_END_TOKEN_ID, pad_token_id=0, suppress_tokens=MULTIMODAL, **kwargs)
    return out[0, ids.shape[1]:].numpy()


def _reference_logprobs(model, params, prompt: RolloutPrompt, response: np.ndarray) -> np.ndarray:
    """The forward runs on prompt + response[:-1]: the last token is never an input (so a
    sampled image-pad id there cannot be taken for an image)."""
    seq = np.concatenate([prompt.token_ids, response[:-1]])[None]
    logits = model.forward(params, seq, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[0, len(prompt.token_ids) - 1:]
    return np.take_along_axis(logp, response[:, None].astype(np.int64), axis=1)[:, 0]


def test_greedy_equals_transformers_generate_text_and_image(tiny):
    hf, model, params = tiny
    prompts = _prompts()
    rollouts = JaxSampler(model, params).generate(prompts, n=2, sampling=SamplingParams(temperature=0.0,
                                                                                        max_new_tokens=12))
    assert rollouts.prompt_index.tolist() == [0, 0, 1, 1]
    for s in range(4):
        expected = _hf_greedy(hf, prompts[s // 2], 12)
        expected = expected[: len(rollouts.response(s))] if rollouts.finish_reason[s] != "length" else expected
        np.testing.assert_array_equal(rollouts.response(s), expected)
        assert rollouts.finish_reason[s] in ("length", "eos")


def test_sampled_logprobs_equal_full_forward(tiny):
    _, model, params = tiny
    prompts = _prompts()
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=100, max_new_tokens=10, seed=7)
    rollouts = JaxSampler(model, params).generate(prompts, n=3, sampling=sampling)
    assert rollouts.tokens.shape[0] == 6
    worst = 0.0
    for s in range(6):
        response = rollouts.response(s)
        ref = _reference_logprobs(model, params, prompts[rollouts.prompt_index[s]], response)
        worst = max(worst, float(np.abs(ref - rollouts.logprobs[s, : len(response)]).max()))
        assert not rollouts.logprobs[s, len(response):].any()
    assert worst <= 1e-5
    # n samples of one prompt differ (independent keys)
    assert len({tuple(rollouts.response(s)) for s in range(3)}) > 1


def test_sampled_logprobs_equal_the_trainers_compute_logprobs(tiny):
    from caspo_jax.rollout import prompt_arrays
    from caspo_jax.step.batch import build_train_batch
    from caspo_jax.step.logprobs import compute_logprobs

    _, model, params = tiny
    prompts = _prompts()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=9, seed=11)
    rollouts = JaxSampler(model, params).generate(prompts, n=2, sampling=sampling)
    ids, mask, pixels, grids = prompt_arrays(prompts)
    batch = build_train_batch(model, ids, mask, rollouts.tokens, rollouts.mask, rollouts.prompt_index,
                              pixel_values=pixels, image_grid_thw=grids)
    logp, _ = compute_logprobs(model, params, batch)
    np.testing.assert_allclose(np.asarray(logp), rollouts.logprobs, atol=1e-5, rtol=0)
    assert rollouts.mask.sum() > 10


def test_fixed_seed_reproduces_and_per_request_seed_is_batch_independent(tiny):
    _, model, params = tiny
    engine = JaxSampler(model, params)
    prompts = _prompts()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    a = engine.generate(prompts, n=2, sampling=sampling)
    b = engine.generate(prompts, n=2, sampling=sampling)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    other = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=4))
    assert not np.array_equal(a.tokens, other.tokens)
    # prompt 1 alone with the seed it had in the batch (seed + index) draws the same samples
    seeded = RolloutPrompt(prompts[1].token_ids, prompts[1].pixel_values, prompts[1].image_grid_thw, seed=4)
    alone = engine.generate([seeded], n=2, sampling=sampling)
    np.testing.assert_array_equal(alone.tokens[:, : a.tokens.shape[1]], a.tokens[2:, : alone.tokens.shape[1]])


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0, max_new_tokens=6),
                                      SamplingParams(temperature=1.0, top_k=3, top_p=0.9, max_new_tokens=6, seed=2)],
                         ids=["greedy", "sampled"])
def test_multimodal_placeholders_are_never_sampled_even_when_most_likely(tiny, sampling):
    import dataclasses

    _, model, params = tiny

    @dataclasses.dataclass(frozen=True)
    class LovesPlaceholders(type(model)):
        """The tiny model with +100 on every placeholder logit: each one beats every text token."""

        def lm_head(self, params, h):
            return super().lm_head(params, h).at[..., jnp.asarray(MULTIMODAL)].add(100.0)

    biased = LovesPlaceholders(model.config)
    prompts = _prompts()
    out = JaxSampler(biased, params, eos_token_ids=()).generate(prompts, n=2, sampling=sampling)
    assert out.mask.all() and out.tokens.shape[1] == 6  # nothing ended early
    assert not np.isin(out.tokens, MULTIMODAL).any()
    # log-probs stay those of the unmodified distribution: the placeholders hold nearly all the mass
    assert (out.logprobs < -50).all()
    # with suppression off the placeholders win, so the check above has teeth
    raw = JaxSampler(biased, params, eos_token_ids=(), suppress_token_ids=()).generate(prompts, n=1, sampling=sampling)
    assert np.isin(raw.tokens, MULTIMODAL).all()


def test_stop_and_eos_tokens_end_responses_with_their_reason(tiny):
    _, model, params = tiny
    prompt = _prompts()[0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    base = JaxSampler(model, params, eos_token_ids=()).generate([prompt], n=1, sampling=greedy)
    response = base.response(0)
    assert base.finish_reason[0] == "length" and len(response) == 12
    cut = next(i for i in range(2, 12) if response[i] not in response[:i])
    stop = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(int(response[cut]),))
    stopped = JaxSampler(model, params, eos_token_ids=()).generate([prompt], n=2, sampling=stop)
    assert stopped.finish_reason.tolist() == ["stop", "stop"]
    np.testing.assert_array_equal(stopped.response(0), response[: cut + 1])  # the stop token is kept
    assert stopped.tokens.shape[1] == cut + 1 and stopped.mask.all()
    eos = JaxSampler(model, params, eos_token_ids=(int(response[cut]),)).generate([prompt], n=1, sampling=greedy)
    assert eos.finish_reason.tolist() == ["eos"] and eos.lengths.tolist() == [cut + 1]
    np.testing.assert_allclose(eos.logprobs[0], base.logprobs[0, : cut + 1], atol=1e-6)


def test_sharded_mesh_matches_single_device(tiny):
    from caspo_jax.sharding import make_mesh

    _, model, params = tiny
    prompts = _prompts()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    single = JaxSampler(model, params).generate(prompts, n=4, sampling=sampling)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    engine = JaxSampler(model, params, mesh=mesh)
    assert len(engine.params.text.layers.q_kernel.sharding.device_set) == 8
    sharded = engine.generate(prompts, n=4, sampling=sampling)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_sync_weights_changes_outputs_and_back(tiny):
    _, model, params = tiny
    engine = JaxSampler(model, params)
    prompt = _prompts()[:1]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompt, n=1, sampling=greedy)
    engine.sync_weights(model.init(jax.random.PRNGKey(1)))
    changed = engine.generate(prompt, n=1, sampling=greedy)
    engine.sync_weights(params)
    after = engine.generate(prompt, n=1, sampling=greedy)
    assert not np.allclose(changed.logprobs, before.logprobs)
    np.testing.assert_array_equal(after.tokens, before.tokens)
    np.testing.assert_array_equal(after.logprobs, before.logprobs)


def test_bad_prompts_are_named():
    with pytest.raises(ValueError, match="token_ids"):
        RolloutPrompt(np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_image_token_count_mismatch_is_named(tiny):
    _, model, params = tiny
    image = tm.make_batch([[3, (1, 4, 4), 6]], seed=2)
    bad = RolloutPrompt(image.input_ids[0][:-3], image.pixel_values, np.asarray([[1, 2, 4]]))
    with pytest.raises(ValueError, match="prompt 0: token_ids hold 4 image tokens"):
        JaxSampler(model, params).generate([bad], n=1, sampling=SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("size,minimum,expected", [(1, 16, 16), (16, 16, 16), (17, 16, 32), (129, 1, 256)])
def test_bucket_is_next_power_of_two(size, minimum, expected):
    assert bucket(size, minimum) == expected


def test_length_buckets_bound_recompiles(tiny):
    from caspo_jax.rollout import jax_engine

    _, model, params = tiny
    engine = JaxSampler(model, params, min_prompt_bucket=32)  # a shape no other test compiles
    rng = np.random.default_rng(5)
    before = jax_engine._rollout._cache_size()
    for length, new in [(9, 5), (30, 7), (17, 16), (10, 3)]:  # all in the (32, 16) bucket
        prompt = RolloutPrompt(rng.integers(0, 400, length))
        out = engine.generate([prompt], n=2, sampling=SamplingParams(temperature=0.0, max_new_tokens=new))
        assert out.tokens.shape[1] <= new
    assert jax_engine._rollout._cache_size() - before == 1
