"""IncrementalDetokenizer: pushes add up to the diff of whole decodes, and never split a character."""

from __future__ import annotations

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from chat_core.tokenizer import IncrementalDetokenizer
from chat_core.tokenizer.detokenizer import PROMPT_CONTEXT_TOKENS

PROPERTY = settings(max_examples=200, deadline=None, database=None)
REPLACEMENT = "\ufffd"

# Multi-byte characters that byte-level and byte-fallback vocabularies split across tokens.
RICH_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("😀🦙👩‍💻日本語東京漢字é ñ\n\t  ab.!1")),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=30,
)


def stream(tokenizer, prompt_ids, generated_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pushes = [detok.push(token_id) for token_id in generated_ids]
    return detok, pushes


def expected_text(tokenizer, prompt_ids, generated_ids, skip_special_tokens=True) -> str | None:
    """decode(tail + generated) minus decode(tail), or None when the tail's text is not a prefix."""
    tail = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
    before = tokenizer.decode(tail, skip_special_tokens=skip_special_tokens)
    after = tokenizer.decode(tail + list(generated_ids), skip_special_tokens=skip_special_tokens)
    return after[len(before) :] if after.startswith(before) else None


def check_stream(tokenizer, prompt_ids, generated_ids, skip_special_tokens):
    expected = expected_text(tokenizer, prompt_ids, generated_ids, skip_special_tokens)
    assume(expected is not None)
    detok, pushes = stream(tokenizer, prompt_ids, generated_ids, skip_special_tokens)
    held = detok.flush()
    assert "".join(pushes) + held == expected
    assert detok.text == expected
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in p for p in pushes) and held == ""
    # Held-back text is only ever an unfinished character at the end.
    assert held == "" or held.endswith(REPLACEMENT)


# --- SmolLM2: byte-level BPE ----------------------------------------------------------------------

smollm2_ids = st.lists(st.integers(0, 49151), max_size=12)


@PROPERTY
@given(smollm2_ids, smollm2_ids, st.booleans())
def test_smollm2_random_ids(smollm2, prompt_ids, generated_ids, skip):
    check_stream(smollm2, prompt_ids, generated_ids, skip)


@PROPERTY
@given(RICH_TEXT, RICH_TEXT)
@example("", "\ufffd")
def test_smollm2_text_streams_back_exactly(smollm2, prompt, text):
    prompt_ids = smollm2.encode("<|im_start|>user\n" + prompt + "<|im_end|>")
    generated = smollm2.encode(text, add_special_tokens=False)
    detok, pushes = stream(smollm2, prompt_ids, generated)
    assume(smollm2.decode(generated) == text)  # SmolLM2 lacks a few byte tokens (e.g. 0xF1)
    held = detok.flush()
    assert "".join(pushes) + held == text
    # A literal U+FFFD at the end looks like an unfinished character: held until more comes, or the end.
    if REPLACEMENT not in text:
        assert held == "" and not any(REPLACEMENT in p for p in pushes)


def test_smollm2_emoji_is_held_until_complete(smollm2):
    ids = smollm2.encode("a😀", add_special_tokens=False)
    assert len(ids) > 2  # the emoji's four bytes span several tokens
    _, pushes = stream(smollm2, [], ids)
    assert pushes[0] == "a" and pushes[-1] == "😀" and all(p == "" for p in pushes[1:-1])


def test_smollm2_special_tokens(smollm2):
    ids = smollm2.encode("hi<|im_end|>", add_special_tokens=False)
    assert "".join(stream(smollm2, [], ids)[1]) == "hi"
    assert "".join(stream(smollm2, [], ids, skip_special_tokens=False)[1]) == "hi<|im_end|>"


# --- SentencePiece: leading spaces and byte fallback ----------------------------------------------

spm_ids = st.lists(st.integers(0, 499), max_size=12)


@PROPERTY
@given(spm_ids, spm_ids, st.booleans())
def test_spm_random_ids(spm_tokenizer, prompt_ids, generated_ids, skip):
    check_stream(spm_tokenizer, prompt_ids, generated_ids, skip)


@PROPERTY
@given(spm_ids, spm_ids, st.booleans())
def test_gguf_llama_random_ids(spm_gguf_tokenizer, prompt_ids, generated_ids, skip):
    check_stream(spm_gguf_tokenizer, prompt_ids, generated_ids, skip)


@PROPERTY
@given(RICH_TEXT, RICH_TEXT)
def test_spm_text_streams_with_its_leading_space(spm_tokenizer, prompt, text):
    assume(text.strip() and "▁" not in text)
    prompt_ids = spm_tokenizer.encode(prompt + " Answer:")
    generated = spm_tokenizer.encode(text, add_special_tokens=False)  # starts with the prefix space "▁"
    _, pushes = stream(spm_tokenizer, prompt_ids, generated)
    assert "".join(pushes) == " " + text
    assert not any(REPLACEMENT in p for p in pushes)


def test_spm_first_word_keeps_its_space(spm_tokenizer, spm_gguf_tokenizer):
    for tokenizer in (spm_tokenizer, spm_gguf_tokenizer):
        prompt = tokenizer.encode("the quick")
        generated = tokenizer.encode("hello world", add_special_tokens=False)
        detok, pushes = stream(tokenizer, prompt, generated)
        assert detok.text == " hello world"
        # Without a prompt there is nothing to keep the space from.
        assert stream(tokenizer, [], generated)[0].text == "hello world"


def test_spm_byte_fallback_is_held_until_complete(spm_tokenizer):
    ids = spm_tokenizer.encode("x 😀", add_special_tokens=False)
    assert spm_tokenizer.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    _, pushes = stream(spm_tokenizer, spm_tokenizer.encode("go"), ids)
    assert pushes[-4:] == ["", "", "", "😀"]


def test_truly_invalid_bytes_are_emitted_or_flushed(spm_tokenizer):
    lone_lead = spm_tokenizer.encode("😀", add_special_tokens=False)[1]  # <0xF0>, after the prefix "▁"
    letter = spm_tokenizer.encode("a", add_special_tokens=False)
    detok, pushes = stream(spm_tokenizer, [], [lone_lead, *letter])
    assert "".join(pushes) == REPLACEMENT + " a"  # the broken byte, then the next piece
    detok, pushes = stream(spm_tokenizer, [], [lone_lead])
    assert pushes == [""] and detok.flush() == REPLACEMENT
