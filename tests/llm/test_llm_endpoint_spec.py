"""The endpoint spec every command uses (``--judge``, ``caspo curate --model``): defaults,
prices as floats, and one clear error per malformed part."""

import pytest

from caspo_jax.llm.endpoint_spec import parse_endpoint_spec


def test_full_and_minimal_specs():
    assert parse_endpoint_spec("name=gpt,model=gpt-5,base_url=https://x/v1,api_key_env=K,price_in=0.00125,"
                               "price_out=0.01") == {
        "name": "gpt", "model": "gpt-5", "base_url": "https://x/v1", "api_key_env": "K",
        "price_in": 0.00125, "price_out": 0.01}
    # name defaults to the model, the key variable to OPENAI_API_KEY, prices to 0
    assert parse_endpoint_spec("model=Qwen3-VL-32B, base_url=http://judge:8000/v1") == {
        "name": "Qwen3-VL-32B", "model": "Qwen3-VL-32B", "base_url": "http://judge:8000/v1",
        "api_key_env": "OPENAI_API_KEY", "price_in": 0.0, "price_out": 0.0}


@pytest.mark.parametrize("spec, message", [
    ("model=m,base_url", "'base_url' is not key=value"),
    ("model=m,base_url=u,temperature=0", "unknown key 'temperature'"),
    ("name=n,model=m", "missing base_url"),
])
def test_malformed_specs_name_the_part_and_the_keys(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_endpoint_spec(spec)
    assert spec in str(err.value)
