"""Tokenizers built from GGUF metadata: SmolLM2's byte-level BPE against transformers, the
pre-tokenizer table on a hand-made vocabulary, and metadata errors."""

from __future__ import annotations

import logging
import pickle

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chat_core.tokenizer import TokenizerError, tokenizer_from_gguf

SMOLLM2_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
PROPERTY = settings(max_examples=200, deadline=None, database=None)

any_text = st.text(max_size=60)
whitespace_runs = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u3000ab1.", max_size=40)
digit_text = st.text(alphabet="0123456789 \t\n.,-x²½٣\u00a0", max_size=40)
with_specials = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SMOLLM2_SPECIALS)), max_size=8).map("".join)
no_numbers = st.text(alphabet=st.characters(exclude_categories=("Cs", "Nd", "Nl", "No")), max_size=60)


def reference_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="session")
def smollm2_missing_bytes(smollm2_metadata) -> frozenset[int]:
    """Bytes with no token of their own in SmolLM2 (0xF1, 0xFF, some controls): text with them cannot round-trip."""
    from chat_core.tokenizer.gguf_tokenizer import byte_alphabet

    tokens = set(smollm2_metadata["tokenizer.ggml.tokens"])
    return frozenset(b for b, char in byte_alphabet().items() if char not in tokens)


# --- SmolLM2 against transformers ---------------------------------------------------------------


def test_smollm2_special_tokens_and_flags(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token_id, smollm2.bos_token) == (1, "<|im_start|>")
    assert (smollm2.eos_token_id, smollm2.eos_token) == (2, "<|im_end|>")
    # eos first; <|endoftext|> is a control token llama.cpp also ends generation on.
    assert smollm2.stop_token_ids == (2, 0)
    assert smollm2.add_bos_token is False
    assert smollm2.chat_template is not None and "<|im_start|>" in smollm2.chat_template
    assert smollm2.all_special_ids == frozenset(range(17))  # the 17 control tokens
    assert smollm2.encode("hi") == smollm2.encode("hi", add_special_tokens=False)


def test_smollm2_splits_digits_like_the_original_tokenizer(smollm2, hf_smollm2, hf_smollm2_unpatched):
    # Whitespace before a digit is where "smollm" splitting shows: the spaces become one token.
    for text in ["  1", "x    2024", "a\n\n3", "Total:   42"]:
        ours = smollm2.encode(text)
        assert ours == reference_ids(hf_smollm2, text)
        assert ours != reference_ids(hf_smollm2_unpatched, text), "unpatched transformers should differ here"
    assert smollm2.convert_ids_to_tokens(smollm2.encode("  1")) == ["ĠĠ", "1"]


@PROPERTY
@given(st.one_of(any_text, whitespace_runs, digit_text, with_specials))
def test_smollm2_encode_matches_reference(smollm2, hf_smollm2, text):
    assert smollm2.encode(text) == reference_ids(hf_smollm2, text)


@PROPERTY
@given(st.one_of(no_numbers, st.text(alphabet=" \t\n\r\u00a0ab.", max_size=40)))
def test_smollm2_encode_matches_unpatched_transformers_without_digits(smollm2, hf_smollm2_unpatched, text):
    assert smollm2.encode(text) == reference_ids(hf_smollm2_unpatched, text)


@PROPERTY
@given(st.one_of(any_text, whitespace_runs, digit_text))
def test_smollm2_decode_inverts_encode(smollm2, smollm2_missing_bytes, text):
    assume(smollm2_missing_bytes.isdisjoint(text.encode()))
    assert smollm2.decode(smollm2.encode(text)) == text


@PROPERTY
@given(st.one_of(with_specials, st.lists(st.integers(0, 49151), max_size=12).map(tuple)))
def test_smollm2_decode_matches_reference(smollm2, hf_smollm2, text_or_ids):
    ids = smollm2.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    for skip in (False, True):
        assert smollm2.decode(ids, skip_special_tokens=skip) == hf_smollm2.decode(ids, skip_special_tokens=skip)


def test_smollm2_drops_bytes_it_has_no_token_for(smollm2, hf_smollm2, smollm2_missing_bytes):
    # Like the reference: a byte-level vocabulary without a byte's token cannot encode it (no byte fallback).
    assert 0xF1 in smollm2_missing_bytes
    text = "a\U00040000b"  # UTF-8 F1 80 80 80
    assert smollm2.encode(text) == reference_ids(hf_smollm2, text)
    assert smollm2.decode(smollm2.encode(text)) != text


def test_smollm2_special_strings_become_their_ids(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert smollm2.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_smollm2_chat_template_matches_reference(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.apply_chat_template(messages) == expected


def test_smollm2_pickles(smollm2):
    clone = pickle.loads(pickle.dumps(smollm2))
    text = "<|im_start|>Pickled  42 times 😀"
    assert clone.encode(text) == smollm2.encode(text)
    assert clone.stop_token_ids == smollm2.stop_token_ids and clone.chat_template == smollm2.chat_template


# --- the pre-tokenizer table, on a vocabulary made to show each split ---------------------------


def byte_level_metadata(pre: str | None, extra_tokens: list[str], merges: list[str]) -> dict:
    """A byte-level GGUF vocabulary: the 256 byte characters, then `extra_tokens` reached by `merges`."""
    from chat_core.tokenizer.gguf_tokenizer import byte_alphabet

    tokens = ["<|end|>", *byte_alphabet().values(), *extra_tokens]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    return metadata


# Merges that build "1234" and "ĠĠ" show how digits and spaces were split before merging.
DIGIT_TOKENS = ["12", "123", "1234", "ĠĠ", "'S"]
DIGIT_MERGES = ["1 2", "12 3", "123 4", "Ġ Ġ", "' S"]


def split(pre: str | None, text: str) -> list[str]:
    tokenizer = tokenizer_from_gguf(byte_level_metadata(pre, DIGIT_TOKENS, DIGIT_MERGES))
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text))


def test_gpt2_default_keeps_numbers_whole():
    assert split("default", "1234") == ["1234"]
    assert split("gpt-2", "x  1234") == ["x", "Ġ", "Ġ", "1234"]  # " 1234" is one split; there is no "Ġ1" merge
    assert split("default", "'S") == ["'", "S"]  # GPT-2's contractions are lower-case only


def test_smollm_splits_every_digit():
    assert split("smollm", "1234") == ["1", "2", "3", "4"]
    assert split("smollm", "x  1234") == ["x", "ĠĠ", "1", "2", "3", "4"]


def test_llama3_groups_digits_by_three_and_ignores_case_in_contractions():
    assert split("llama-bpe", "1234") == ["123", "4"]
    assert split("llama3", "'S") == ["'S"]


def test_qwen2_splits_every_digit():
    assert split("qwen2", "1234") == ["1", "2", "3", "4"]


def test_unknown_pre_tokenizer_warns_and_falls_back_to_gpt2(caplog):
    with caplog.at_level(logging.WARNING, logger="chat_core.tokenizer.gguf_tokenizer"):
        assert split("no-such-pre", "1234") == ["1234"]
    assert "no-such-pre" in caplog.text


def test_llama3_adds_bos_by_default_and_the_metadata_flag_wins():
    metadata = byte_level_metadata("llama-bpe", DIGIT_TOKENS, DIGIT_MERGES)
    metadata["tokenizer.ggml.bos_token_id"] = 0
    assert tokenizer_from_gguf(metadata).encode("1")[0] == 0
    metadata["tokenizer.ggml.add_bos_token"] = False
    assert tokenizer_from_gguf(metadata).encode("1") == [1 + ord("1") - ord("!")]


def test_control_and_user_defined_tokens():
    from chat_core.tokenizer.gguf_tokenizer import CONTROL, USER_DEFINED

    metadata = byte_level_metadata("default", ["<think>", "<|eot_id|>"], [])
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"][:-2] + [USER_DEFINED, CONTROL]
    metadata["tokenizer.ggml.eot_token_id"] = len(metadata["tokenizer.ggml.tokens"]) - 1
    tokenizer = tokenizer_from_gguf(metadata)
    think, eot = len(metadata["tokenizer.ggml.tokens"]) - 2, len(metadata["tokenizer.ggml.tokens"]) - 1
    assert tokenizer.encode("<think><|eot_id|>") == [think, eot]
    assert tokenizer.all_special_ids == {0, eot}  # user-defined tokens are added, not special
    assert tokenizer.decode([think, eot], skip_special_tokens=True) == "<think>"
    assert tokenizer.stop_token_ids == (0, eot)


# --- metadata errors -----------------------------------------------------------------------------


def test_missing_model_key_names_it():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({"tokenizer.ggml.tokens": ["a"]})


def test_unsupported_model_names_it():
    with pytest.raises(TokenizerError, match="'bert'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_bad_token_id_names_the_key():
    metadata = byte_level_metadata("default", [], [])
    metadata["tokenizer.ggml.bos_token_id"] = 10**6
    with pytest.raises(TokenizerError, match="tokenizer.ggml.bos_token_id"):
        tokenizer_from_gguf(metadata)


def test_token_type_length_mismatch_names_the_key():
    metadata = byte_level_metadata("default", [], [])
    metadata["tokenizer.ggml.token_type"] = [1, 1]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.token_type"):
        tokenizer_from_gguf(metadata)


def test_merge_with_unknown_token_is_an_error():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf(byte_level_metadata("default", [], ["zz qq"]))


def test_duplicate_token_is_an_error():
    with pytest.raises(TokenizerError, match="twice"):
        tokenizer_from_gguf(byte_level_metadata("default", ["a"], []))



def test_ids_beyond_the_vocabulary(smollm2, spm_tokenizer, spm_gguf_tokenizer):
    # A model's output layer may be padded past the vocabulary: decode drops such ids, lookups name them.
    for tokenizer in (smollm2, spm_tokenizer, spm_gguf_tokenizer):
        ids = tokenizer.encode("ok", add_special_tokens=False)
        assert tokenizer.decode([*ids, tokenizer.vocab_size + 5]) == tokenizer.decode(ids)
        with pytest.raises(TokenizerError, match=str(tokenizer.vocab_size + 5)):
            tokenizer.convert_ids_to_tokens([tokenizer.vocab_size + 5])
