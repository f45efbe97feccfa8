"""Response generation behind one small protocol, so any engine can be evaluated.

``Generator.generate(prompts, n, sampling) -> list[Generation]``: for each prompt, n
sampled responses and their status. Engines:

* ``OpenAIGenerator``: any OpenAI-compatible endpoint (closed APIs, or a checkpoint
  served by vLLM/SGLang) through ``caspo_jax.llm.client.ChatClient`` (retries,
  Retry-After, per-request failure reporting).
* ``local_generator("jax" | "vllm", ...)``: the in-process JAX sampler and the vLLM
  engine; not built yet, so it raises ``EngineNotAvailable`` naming the missing piece.

``PAPER_SAMPLING`` is the paper's generation preset (appendix A.2.1: temperature 0.9,
up to 4096 new tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from caspo_jax.evals.modes import Prompt


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
    """A generation engine that this build does not provide yet."""


_MISSING = {
    "jax": (
        "the in-process JAX sampler (caspo_jax rollouts: prefill/decode over "
        "caspo_jax.models with a Qwen-VL processor)"
    ),
    "vllm": "the vLLM rollout engine and weight bridge (caspo_jax rollouts, vLLM backend)",
}


def local_generator(engine: str, checkpoint: str | None = None) -> Generator:
    """The local engines; raise until the rollout engine lands (a later issue)."""
    if engine not in _MISSING:
        raise ValueError(f"unknown engine {engine!r}; choose openai, jax or vllm")
    raise EngineNotAvailable(
        f"--engine {engine} needs {_MISSING[engine]}, which is not built yet. Until then, "
        f"serve the checkpoint{f' {checkpoint}' if checkpoint else ''} with an "
        "OpenAI-compatible server (e.g. `vllm serve DIR`) and use --engine openai --base-url URL."
    )


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
        from caspo_jax.llm.client import ChatRequest
        from caspo_jax.llm.messages import system_message, user_message

        reqs = []
        for p in prompts:
            messages = ([system_message(p.system)] if p.system else []) + [user_message(p.text, p.images)]
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
        out = []
        for i in range(len(prompts)):
            rs = results[i * n : (i + 1) * n]
            out.append(
                Generation(
                    texts=[r.text if r.ok else None for r in rs],
                    errors=[None if r.ok else (r.error or "failed") for r in rs],
                    # tokens actually spent: a cache hit reports its original call's usage
                    prompt_tokens=sum(r.usage.prompt_tokens for r in rs if not r.cached),
                    completion_tokens=sum(r.usage.completion_tokens for r in rs if not r.cached),
                )
            )
        return out
