"""render_prompt: a chat template that cannot render is a UserError naming its file."""

import json

import pytest

from caspo_jax.data.processor import load_processor
from caspo_jax.data.prompts import ChatTemplateError, render_prompt
from caspo_jax.errors import UserError
from caspo_jax.tiny.tokenizer import build_tiny_processor, build_tiny_tokenizer, save_tiny_processor, tokenizer_info
from caspo_jax.loop.setup import tiny_hf_config

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def _checkpoint_dir(path):
    """A directory load_processor accepts: config.json, tokenizer files, processor config."""
    tokenizer = build_tiny_tokenizer()
    save_tiny_processor(build_tiny_processor(tokenizer), path)
    (path / "config.json").write_text(json.dumps(tiny_hf_config("test", tokenizer_info(tokenizer))))
    return path


@pytest.mark.parametrize("template,reason", [
    ("{% set seen = [] %}{{ seen.append(1) }}", "SecurityError"),  # the sandbox forbids list.append
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% for m in messages %}{{ m.role }", "TemplateSyntaxError"),
])
def test_unrenderable_chat_template_names_its_file(tmp_path, template, reason):
    _checkpoint_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(template)
    processor = load_processor(tmp_path)
    assert processor.tokenizer.chat_template == template  # the file is what the tokenizer renders
    with pytest.raises(ChatTemplateError) as info:
        render_prompt(processor.tokenizer, MESSAGES)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'chat_template.jinja'}: the chat template cannot render")
    assert reason in message and "replace it with the base model's chat_template.jinja" in message


def test_a_good_template_still_renders(tmp_path):
    _checkpoint_dir(tmp_path)
    text = render_prompt(load_processor(tmp_path).tokenizer, MESSAGES)
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text
