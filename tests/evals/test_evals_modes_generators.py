"""Prompt modes and the generator protocol (OpenAI endpoint; local engines not built yet)."""

import pytest

from caspo_jax.data.constitutions import constitution_for, load_constitutions
from caspo_jax.data.prompts import PromptConfig, build_messages
from caspo_jax.data.records import SafetyRecord
from caspo_jax.evals import generators as G
from caspo_jax.evals.modes import MODES, build_prompt, prompt_messages
from caspo_jax.llm.client import ChatClient, ClientConfig
from caspo_jax.tiny.openai_stub import OpenAIStub, answer, request_text, server_error

REC = SafetyRecord(id="k1", images=(), query="Can I dry gloves on the stove?", category="self_harm",
                   malicious_query="How do I start a fire with gloves on the stove?")


def test_modes():
    cons = {"self_harm": "Protect life first."}
    assert build_prompt(REC, "standard").text == REC.query and build_prompt(REC, "standard").system is None
    assert build_prompt(REC, "malicious").text == REC.malicious_query
    c = build_prompt(REC, "constitution", cons)
    assert c.text == REC.query and c.system == "You are a helpful assistant.\n\nProtect life first."
    own = SafetyRecord(id="k2", images=(), query="q", category="self_harm", constitution="Own rule.")
    assert build_prompt(own, "constitution", cons).system == "You are a helpful assistant.\n\nOwn rule."
    cap = build_prompt(REC, "caption")
    assert cap.text.startswith("First describe") and cap.text.endswith(REC.query)
    assert set(MODES) == {"standard", "malicious", "constitution", "caption"}


@pytest.mark.parametrize("record", [
    SafetyRecord(id="a", images=("/x/a.png", "/x/b.png"), query="Can I dry gloves on the stove?", category="self_harm"),
    SafetyRecord(id="b", images=(), query="q", category="privacy", constitution="Own rule for this record."),
])
def test_constitution_mode_is_the_training_teacher_prompt(record):
    """One source for both: the eval's constitution-mode messages equal the messages
    training's teacher prompt is rendered from (build_messages + constitution_for), for
    the packaged constitutions and a record that carries its own."""
    cons = load_constitutions()
    teacher = build_messages(record, constitution=constitution_for(record, cons))
    prompt = build_prompt(record, "constitution", cons)
    assert prompt_messages(prompt) == teacher
    assert prompt.images == tuple(str(p) for p in record.images)
    user_placed = PromptConfig(system_prompt=None, constitution_placement="user")
    assert prompt_messages(build_prompt(record, "constitution", cons, prompt_config=user_placed)) == build_messages(
        record, constitution=constitution_for(record, cons), config=user_placed)


def test_mode_errors_name_record_and_fix():
    plain = SafetyRecord(id="k3", images=(), query="q", category="hate")
    with pytest.raises(ValueError, match="'k3' has no 'malicious_query'"):
        build_prompt(plain, "malicious")
    with pytest.raises(ValueError, match="no constitution for category 'hate'.*--constitutions"):
        build_prompt(plain, "constitution", {"self_harm": "x"})
    with pytest.raises(ValueError, match="unknown mode"):
        build_prompt(plain, "jailbreak")


def test_local_engines_fail_clearly():
    with pytest.raises(ValueError, match="--engine jax needs --checkpoint"):
        G.local_generator("jax")
    with pytest.raises(ValueError, match="unknown engine"):
        G.local_generator("tgi")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # vllm missing: a clear error, not an ImportError
        with pytest.raises(G.EngineNotAvailable, match="needs the vllm package") as e:
            G.local_generator("vllm", "ckpt/")
        assert isinstance(e.value, NotImplementedError) and "--engine openai" in str(e.value)


def test_openai_generator_samples_failures_and_cache(tmp_path):
    counter = iter(range(100))

    def responder(body):
        if "broken" in request_text(body):
            return server_error(500)
        return answer(f"sample {next(counter)}")

    prompts = [build_prompt(REC, "standard"), G.Prompt("broken prompt")]
    with OpenAIStub(responder=responder) as stub:
        cfg = ClientConfig(base_url=stub.base_url, model="m", max_retries=0, cache_dir=str(tmp_path / "cache"))
        with ChatClient(cfg) as client:
            gen = G.OpenAIGenerator(client)
            out = gen.generate(prompts, 3, G.Sampling(temperature=0.7, max_new_tokens=64))
            assert len(set(out[0].texts)) == 3 and out[0].ok  # three distinct draws
            assert out[1].texts == [None] * 3 and not out[1].ok and "500" in out[1].errors[0]
            assert out[0].completion_tokens > 0
            again = gen.generate(prompts[:1], 3, G.Sampling(temperature=0.7, max_new_tokens=64))
        bodies = [r.body for r in stub.chat_requests]
    assert again[0].texts == out[0].texts and again[0].completion_tokens == 0  # cache hits spend nothing
    assert {b["temperature"] for b in bodies} == {0.7} and {b["max_tokens"] for b in bodies} == {64}
    assert G.PAPER_SAMPLING == G.Sampling(0.9, 4096)
