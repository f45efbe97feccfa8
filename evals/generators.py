"""Response generation behind one small protocol, so any engine can be evaluated.

``Generator.generate(prompts, n, sampling) -> list[Generation]``: for each prompt, n
sampled responses and their status. Engines:

* ``OpenAIGenerator``: any OpenAI-compatible endpoint (closed APIs, or a checkpoint
  served by vLLM/SGLang) through ``caspo_jax.llm.client.ChatClient`` (retries,
  Retry-After, per-request failure reporting).
* ``local_generator("jax" | "vllm", checkpoint)``: a ``LocalGenerator`` over the
  in-process JAX sampler (``caspo_jax.rollout.JaxSampler``) or the vLLM engine
  (``VllmEngine``; ``EngineNotAvailable`` when vllm does not import). The model,
  tokenizer and image processor come from the directory through
  ``caspo_jax.hf_checkpoint.load_hf_checkpoint``; prompts are rendered like training prompts (``caspo_jax.data.prompts``: chat
  template, one ``<|image_pad|>`` run per image sized by the processor's grid, images
  resized with ``caspo_jax.data.images.resize_image`` and the processor's min/max pixels).

``PAPER_SAMPLING`` is the paper's generation preset (appendix A.2.1: temperature 0.9,
up to 4096 new tokens).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Protocol, Sequence

import numpy as np

from caspo_jax.data.images import load_image, resize_image
from caspo_jax.data.pipeline import processor_resize_settings
from caspo_jax.data.prompts import expand_image_tokens, image_token_counts, render_prompt
from caspo_jax.evals.modes import Prompt, prompt_messages
from caspo_jax.hf_checkpoint import load_hf_checkpoint, stop_token_ids
from caspo_jax.llm.client import ChatRequest, is_retriable_status
from caspo_jax.llm.messages import system_message, user_message
from caspo_jax.rollout import JaxSampler, RolloutPrompt, SamplingParams, VllmEngine


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9
    max_new_tokens: int = 4096


PAPER_SAMPLING = Sampling(temperature=0.9, max_new_tokens=4096)


@dataclasses.dataclass(frozen=True)
class Generation:
    """The n samples of one prompt. ``texts[k]`` is None where sample k failed."""

    texts: list[str | None]
    errors: list[str | None]
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return all(t is not None for t in self.texts)


class Generator(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling) -> list[Generation]: ...


class EngineNotAvailable(NotImplementedError):
    """A generation engine that cannot run here (vllm not installed)."""


LOCAL_ENGINES = ("jax", "vllm")


def local_generator(engine: str, checkpoint: str | None = None, *, batch_size: int = 16,
                    seed: int = 0, ignore_custom_code: bool = False, progress: bool = True,
                    **engine_kwargs) -> "LocalGenerator":
    """A ``LocalGenerator`` over the checkpoint in ``checkpoint`` (an HF directory).

    engine_kwargs go to ``JaxSampler`` (e.g. ``mesh``) or ``VllmEngine.start``.
    """
    if engine not in LOCAL_ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose openai, jax or vllm")
    if not checkpoint:
        raise ValueError(f"--engine {engine} needs --checkpoint DIR (an HF directory: config.json, "
                         "safetensors, tokenizer and preprocessor_config.json)")
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise EngineNotAvailable(
                f"--engine vllm needs the vllm package, which does not import here ({e}). Use --engine jax, "
                f"or serve {checkpoint} with an OpenAI-compatible server (e.g. `vllm serve DIR`) and use "
                "--engine openai --base-url URL.") from None

    model, params, processor = load_hf_checkpoint(checkpoint, ignore_custom_code=ignore_custom_code, progress=progress)
    eos_ids = stop_token_ids(processor.tokenizer)
    if engine == "jax":
        rollout_engine = JaxSampler(model, params, eos_token_ids=eos_ids, **engine_kwargs)
    else:
        # vLLM reads the same weights from the directory; the JAX model only describes it
        rollout_engine = VllmEngine.start(checkpoint, model, eos_token_ids=eos_ids, **engine_kwargs)
    return LocalGenerator(rollout_engine, processor, name=f"{engine}:{checkpoint}", batch_size=batch_size,
                          seed=seed)


def prompt_seed(prompt: Prompt, seed: int) -> int:
    """A prompt's sampling seed from its content: its samples do not depend on the batch
    it shares or on the order of a (resumed) run."""
    key = json.dumps([prompt.system, prompt.text, list(prompt.images)]).encode()
    return (zlib.crc32(key) + seed) % 2**31


def encode_local_prompt(processor, prompt: Prompt, seed: int = 0):
    """``RolloutPrompt`` of ``prompt`` for an in-process engine: the chat template over
    ``prompt_messages``, images resized with the processor's min/max pixels, one
    placeholder run per image sized by its grid; the sampling seed from ``prompt_seed``."""
    text = render_prompt(processor.tokenizer, prompt_messages(prompt))
    pixels = grid = None
    images: tuple = ()
    if prompt.images:
        factor, lo, hi = processor_resize_settings(processor)
        images = tuple(resize_image(load_image(p), factor, lo, hi) for p in prompt.images)
        vision = processor.image_processor(images=list(images), return_tensors="np")
        pixels = np.asarray(vision["pixel_values"], np.float32)
        grid = np.asarray(vision["image_grid_thw"], np.int64).reshape(-1, 3)
        text = expand_image_tokens(text, image_token_counts(grid, processor.image_processor.merge_size))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return RolloutPrompt(np.asarray(ids), pixels, grid, images, seed=prompt_seed(prompt, seed))


class LocalGenerator:
    """Generation in this process with a ``caspo_jax.rollout`` engine (``RolloutEngine``).

    Each prompt is encoded like a training prompt (system turn, one image entry per image
    then the text, the processor's chat template, image placeholders expanded to the grid)
    and its n samples drawn in one ``engine.generate`` call per ``batch_size`` prompts;
    responses are decoded without special tokens. A prompt that cannot be encoded (e.g.
    an unreadable image) fails alone, with the reason as its error.
    """

    def __init__(self, engine, processor, *, name: str = "local", batch_size: int = 16, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"LocalGenerator(batch_size={batch_size}): must be >= 1")
        self.engine = engine
        self.processor = processor
        self.name = name
        self.batch_size = batch_size
        self.seed = seed

    def encode(self, prompt: Prompt):
        """``RolloutPrompt`` of ``prompt``: token ids, pixels, grid and the resized images."""
        return encode_local_prompt(self.processor, prompt, self.seed)

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling) -> list[Generation]:
        params = SamplingParams(temperature=float(sampling.temperature), max_new_tokens=int(sampling.max_new_tokens),
                                seed=self.seed)
        out: list[Generation | None] = [None] * len(prompts)
        encoded = []
        for i, p in enumerate(prompts):
            try:
                encoded.append((i, self.encode(p)))
            except (OSError, ValueError) as e:  # caspo_jax.data.images.ImageError is a ValueError
                out[i] = Generation(texts=[None] * n, errors=[f"cannot encode prompt: {e}"] * n)
        decode = self.processor.tokenizer.decode
        for lo in range(0, len(encoded), self.batch_size):
            chunk = encoded[lo: lo + self.batch_size]
            rollouts = self.engine.generate([r for _, r in chunk], n=n, sampling=params)
            for c, (i, rp) in enumerate(chunk):
                rows = range(c * n, (c + 1) * n)
                out[i] = Generation(
                    texts=[decode(rollouts.response(s).tolist(), skip_special_tokens=True) for s in rows],
                    errors=[None] * n, prompt_tokens=n * len(rp.token_ids),
                    completion_tokens=int(sum(int(rollouts.lengths[s]) for s in rows)))
        return out  # type: ignore[return-value]


class OpenAIGenerator:
    """Generation through an OpenAI-compatible chat endpoint.

    Sample k of a prompt is its own request with cache namespace ``gen/<k>``, so n
    samples are n distinct draws even with a response cache, and a resumed run with
    the cache enabled re-reads rather than re-buys them.
    """

    def __init__(self, client, name: str | None = None):
        self.client = client
        self.name = name or client.config.model

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling) -> list[Generation]:
        reqs, sent, out = [], [], []
        unsendable: dict[int, str] = {}
        for i, p in enumerate(prompts):
            try:  # an unreadable image fails its own prompt, never the run
                messages = ([system_message(p.system)] if p.system else []) + [user_message(p.text, p.images)]
            except (OSError, ValueError) as e:  # caspo_jax.data.images.ImageError is a ValueError
                unsendable[i] = f"cannot encode prompt: {e}"
                continue
            sent.append(i)
            for k in range(n):
                reqs.append(
                    ChatRequest(
                        messages=messages,
                        temperature=sampling.temperature,
                        max_tokens=sampling.max_new_tokens,
                        cache_namespace=f"gen/{k}",
                    )
                )
        results = self.client.complete_many(reqs, progress=f"generate ({self.name})")
        by_prompt = {i: results[j * n : (j + 1) * n] for j, i in enumerate(sent)}
        for i in range(len(prompts)):
            if i in unsendable:
                out.append(Generation(texts=[None] * n, errors=[unsendable[i]] * n))
                continue
            rs = by_prompt[i]
            out.append(
                Generation(
                    texts=[r.text if r.ok else None for r in rs],
                    errors=[None if r.ok else generation_error(r, sampling) for r in rs],
                    # tokens actually spent: a cache hit reports its original call's usage
                    prompt_tokens=sum(r.usage.prompt_tokens for r in rs if not r.cached),
                    completion_tokens=sum(r.usage.completion_tokens for r in rs if not r.cached),
                )
            )
        return out


NOT_RETRIED = "not retried: a rerun sends the same request"


def generation_error(result, sampling: Sampling) -> str:
    """The error of a failed generation request (a ``ChatResult``), with the fix when the
    server refused it for good: a rerun repeats a 4xx, so the message says what to change."""
    error = result.error or "failed"
    status = result.status_code
    if is_retriable_status(status):
        return error
    if status == 400:
        fix = (f"if the prompt plus --max-new-tokens ({sampling.max_new_tokens}) exceeds the server's context "
               "length, lower --max-new-tokens or serve the model with a longer context (vllm serve "
               "--max-model-len N)")
    elif status in (401, 403):
        fix = "check the key in the variable --api-key-env names"
    elif status == 404:
        fix = "check --base-url (ending in /v1) and --model (the served model name)"
    else:
        fix = "fix the request the server refuses"
    return f"{error} ({NOT_RETRIED}; {fix})"
