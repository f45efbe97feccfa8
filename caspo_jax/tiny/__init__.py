"""The built-in tiny world the demo and the tests run on: tiny random-weight Qwen-VL
configs (``models``, ``qwen3_vl``), a tiny byte-level tokenizer and processor
(``tokenizer``) and a local OpenAI-compatible judge (``openai_stub``)."""
