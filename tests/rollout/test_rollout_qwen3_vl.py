"""The JAX sampler on a tiny Qwen3-VL (DeepStack in the prefill, via ``Qwen3VL.kv_cache``)
against unmodified transformers ``generate`` (greedy) and the full forward (log-probs).

Tolerances: greedy tokens exactly equal; sampled log-probs within 1e-5 (float32) of
``log_softmax(model.forward(prompt + response))`` at the sampled tokens. The sampler never
samples the multimodal placeholders, so ``generate`` gets them as ``suppress_tokens``.
"""

import jax
import numpy as np
import pytest
import torch

from caspo_jax.models import load_pretrained
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams
from caspo_jax.tiny import qwen3_vl as tq

MULTIMODAL = [tq.IMAGE_TOKEN_ID, tq.VIDEO_TOKEN_ID, tq.VISION_START_TOKEN_ID, tq.VISION_END_TOKEN_ID]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tq.hf_model("vision", seed=3)
    path = tmp_path_factory.mktemp("tiny_qwen3_vl")
    hf.save_pretrained(path)
    model, params = load_pretrained(path)
    return hf, model, params


def _prompts():
    text = tq.make_batch([[9]], seed=1)
    image = tq.make_batch([[3, (1, 4, 4), 5]], seed=2)
    return [RolloutPrompt(text.input_ids[0]),
            RolloutPrompt(image.input_ids[0], image.pixel_values, image.image_grid_thw)]


def _hf_greedy(hf, prompt: RolloutPrompt, max_new: int) -> np.ndarray:
    ids = torch.tensor(prompt.token_ids[None].astype(np.int64))
    kwargs = {}
    if prompt.image_grid_thw is not None:
        kwargs = dict(pixel_values=torch.tensor(prompt.pixel_values), image_grid_thw=torch.tensor(prompt.image_grid_thw),
                      mm_token_type_ids=(ids == tq.IMAGE_TOKEN_ID).long())
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                      eos_token_id=tq.VISION_END_TOKEN_ID, pad_token_id=0, suppress_tokens=MULTIMODAL, **kwargs)
    return out[0, ids.shape[1]:].numpy()


def test_qwen3_vl_greedy_equals_transformers_generate_text_and_image(tiny):
    hf, model, params = tiny
    assert model.kv_cache.__name__.endswith("common.kv_cache")
    prompts = _prompts()
    rollouts = JaxSampler(model, params).generate(prompts, n=1, sampling=SamplingParams(temperature=0.0,
                                                                                        max_new_tokens=10))
    for s, prompt in enumerate(prompts):
        np.testing.assert_array_equal(rollouts.response(s), _hf_greedy(hf, prompt, 10))
    assert rollouts.lengths.tolist() == [10, 10]


def test_qwen3_vl_sampled_logprobs_equal_full_forward(tiny):
    _, model, params = tiny
    prompts = _prompts()
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=5)
    rollouts = JaxSampler(model, params).generate(prompts, n=2, sampling=sampling)
    worst = 0.0
    for s in range(4):
        prompt, response = prompts[rollouts.prompt_index[s]], rollouts.response(s)
        seq = np.concatenate([prompt.token_ids, response[:-1]])[None]
        logits = model.forward(params, seq, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[0, len(prompt.token_ids) - 1:]
        ref = np.take_along_axis(logp, response[:, None].astype(np.int64), axis=1)[:, 0]
        worst = max(worst, float(np.abs(ref - rollouts.logprobs[s, : len(response)]).max()))
    assert worst <= 1e-5
    assert not np.isin(rollouts.tokens[rollouts.mask], MULTIMODAL).any()
