"""Chat templates render as transformers renders them, and fail with TokenizerError naming the template."""

from __future__ import annotations

import pytest

from chat_core.tokenizer import TokenizerError, render_chat_template
from chat_core.tokenizer.chat_template import _compile

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is the capital of France?"}],
    "with system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "Count: 1 2 3\nnew line"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_template_matches_transformers(smollm2, hf_smollm2, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("prefill", ["The capital of France is", "Paris, of course. ", "😀 "])
def test_continuing_the_final_message_matches_transformers(smollm2, hf_smollm2, prefill):
    """A prefilled answer: the prompt ends right after its content, where the model goes on (the template's
    end-of-turn dropped), as transformers renders it."""
    messages = [*CONVERSATIONS["user only"], {"role": "assistant", "content": prefill}]
    expected = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert smollm2.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True) == expected
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        smollm2.apply_chat_template(messages, continue_final_message=True)


def test_default_system_prompt_only_without_a_system_message(smollm2):
    assert "named SmolLM" in smollm2.apply_chat_template(CONVERSATIONS["user only"])
    assert "named SmolLM" not in smollm2.apply_chat_template(CONVERSATIONS["with system"])


def test_extra_variables_reach_the_template():
    template = "{{ bos_token }}|{{ eos_token }}|{{ extra }}"
    variables = {"bos_token": "<s>", "eos_token": "</s>", "extra": 1}
    rendered = render_chat_template(template, [], add_generation_prompt=False, **variables)
    assert rendered == "<s>|</s>|1"


def test_tokenizer_passes_its_own_bos_and_eos(spm_gguf_tokenizer):
    # The GGUF fixture's template is "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}".
    assert spm_gguf_tokenizer.apply_chat_template([{"role": "user", "content": "a"}]) == "<s>[a]"
    assert spm_gguf_tokenizer.apply_chat_template([], bos_token="") == ""


def test_raise_exception_gives_tokenizer_error():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    with pytest.raises(TokenizerError, match="first message must be from the user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}], add_generation_prompt=True)


def test_syntax_error_names_the_source():
    with pytest.raises(TokenizerError, match=r"my/tokenizer_config\.json.*line 1"):
        render_chat_template(
            "{% for m in messages %}", [], add_generation_prompt=True, template_source="my/tokenizer_config.json"
        )


def test_render_error_names_the_source():
    with pytest.raises(TokenizerError, match="somewhere.jinja"):
        render_chat_template(
            "{{ messages[0]['content'] + 1 }}",
            [{"content": "x"}],
            add_generation_prompt=True,
            template_source="somewhere.jinja",
        )


def test_sandbox_forbids_mutating_messages():
    with pytest.raises(TokenizerError):
        render_chat_template("{% set _ = messages.append(1) %}", [], add_generation_prompt=True)


def test_tojson_does_not_escape_html_or_unicode():
    tools = [{"name": "f", "description": "<a & 'b'> café"}]
    out = render_chat_template("{{ tools | tojson }}", [], add_generation_prompt=False, tools=tools)
    assert out == '[{"name": "f", "description": "<a & \'b\'> café"}]'
    indented = render_chat_template("{{ x | tojson(indent=2) }}", [], add_generation_prompt=False, x={"k": 1})
    assert indented == '{\n  "k": 1\n}'


def test_strftime_now_loop_controls_and_generation_blocks():
    template = (
        "{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m }}{% endfor %}"
        "{% generation %}G{% endgeneration %}"
    )
    assert render_chat_template(template, ["a", "b"], add_generation_prompt=False) == "4aG"


def test_trim_and_lstrip_blocks():
    template = "  {% if add_generation_prompt %}\nyes\n  {% endif %}\n"
    assert render_chat_template(template, [], add_generation_prompt=True) == "yes\n"


def test_templates_are_compiled_once():
    template = "{{ messages | length }} cached"
    render_chat_template(template, [], add_generation_prompt=True)
    hits = _compile.cache_info().hits
    assert render_chat_template(template, [1, 2], add_generation_prompt=True) == "2 cached"
    assert _compile.cache_info().hits == hits + 1


def test_tokenizer_without_template(spm_tokenizer):
    with pytest.raises(TokenizerError, match="no chat template"):
        spm_tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
