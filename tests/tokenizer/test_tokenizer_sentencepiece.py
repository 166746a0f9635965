"""SentencePiece vocabularies: tokenizer.model through `sentencepiece`, and the same vocabulary
written as a GGUF "llama" tokenizer, both against SentencePiece itself."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from chat_core.tokenizer import SentencePieceTokenizer, TokenizerError, tokenizer_from_gguf

PROPERTY = settings(max_examples=200, deadline=None, database=None)
WORDS = ["the", "quick", "fox", "hello", "world", "café", "東京", "привет", "données", "tokenizer", "42"]
PIECES = WORDS + [" ", "  ", "    ", "\t", "\n", "\r\n", "1", "9", ".", ",", "!", "é", "😀", "日本", "\x00", "▁"]

any_text = st.text(max_size=40)
wordy_text = st.lists(st.sampled_from(PIECES), max_size=16).map("".join)
sp_text = st.one_of(any_text, wordy_text)


# --- tokenizer.model through sentencepiece -------------------------------------------------------


@PROPERTY
@given(sp_text)
def test_spm_encode_matches_sentencepiece(spm_tokenizer, spm_processor, text):
    assume("<s>" not in text and "</s>" not in text)  # SentencePiece itself reads these as plain text
    assert spm_tokenizer.encode(text, add_special_tokens=False) == spm_processor.encode(text)
    assert spm_tokenizer.encode(text) == [spm_processor.bos_id(), *spm_processor.encode(text)]


@PROPERTY
@given(
    st.one_of(
        sp_text.map(lambda text: ("text", text)),
        st.lists(st.integers(1, 499), max_size=12).map(lambda ids: ("ids", ids)),
    )
)
@example(("ids", [197, 1, 131]))  # two bytes of one character with <s> between them: two broken characters
def test_spm_decode_matches_sentencepiece(spm_tokenizer, spm_processor, case):
    kind, value = case
    ids = spm_processor.encode(value) if kind == "text" else value
    assert spm_tokenizer.decode(ids, skip_special_tokens=True) == spm_processor.decode(ids)


@PROPERTY
@given(sp_text)
def test_spm_decode_inverts_encode(spm_tokenizer, text):
    assume("▁" not in text)  # SentencePiece reads a written "▁" as a space
    assert spm_tokenizer.decode(spm_tokenizer.encode(text), skip_special_tokens=True) == text


def test_spm_special_tokens(spm_tokenizer):
    assert (spm_tokenizer.bos_token_id, spm_tokenizer.bos_token) == (1, "<s>")
    assert (spm_tokenizer.eos_token_id, spm_tokenizer.eos_token) == (2, "</s>")
    assert spm_tokenizer.stop_token_ids == (2,)
    assert spm_tokenizer.add_bos_token is True
    assert spm_tokenizer.all_special_ids == {0, 1, 2}
    ids = spm_tokenizer.encode("hello</s><s> world", add_special_tokens=False)
    assert 2 in ids and 1 in ids
    assert spm_tokenizer.decode(ids) == "hello</s><s>  world"  # each text run gets its own prefix space
    assert spm_tokenizer.decode(ids, skip_special_tokens=True) == "hello  world"


def test_spm_pickles(spm_tokenizer):
    clone = pickle.loads(pickle.dumps(spm_tokenizer))
    assert clone.encode("the quick fox 42") == spm_tokenizer.encode("the quick fox 42")


def test_spm_corrupt_model_names_the_path(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"not a protobuf")
    from chat_core.tokenizer import TokenizerSettings

    with pytest.raises(TokenizerError, match=str(path)):
        SentencePieceTokenizer.from_file(path, TokenizerSettings(source=str(path)))


@pytest.fixture(scope="module")
def hf_llama_from_model(spm_model_path, tmp_path_factory):
    import transformers
    directory = tmp_path_factory.mktemp("hf_llama")
    shutil.copy(spm_model_path, os.path.join(directory, "tokenizer.model"))
    # The `tokenizers`-backed class (in transformers 5 LlamaTokenizer is the same class).
    return transformers.LlamaTokenizerFast.from_pretrained(str(directory))


@PROPERTY
@given(wordy_text)
def test_spm_matches_transformers_llama_tokenizer(spm_tokenizer, hf_llama_from_model, text):
    # transformers' Metaspace(prepend_scheme="first") adds no prefix space to text that already
    # starts with one (" a" -> "▁a"), where SentencePiece and llama.cpp give "▁▁a"; compare the rest.
    assume(not text[:1].isspace() and "▁" not in text)
    ids = spm_tokenizer.encode(text, add_special_tokens=False)
    assert ids == hf_llama_from_model.encode(text, add_special_tokens=False)
    assert spm_tokenizer.decode(ids) == hf_llama_from_model.decode(ids)


# --- the same vocabulary as GGUF "llama" metadata -------------------------------------------------


@PROPERTY
@given(sp_text)
def test_gguf_llama_encode_matches_sentencepiece(spm_gguf_tokenizer, spm_processor, text):
    assume("<s>" not in text and "</s>" not in text and "<unk>" not in text)
    assert spm_gguf_tokenizer.encode(text, add_special_tokens=False) == spm_processor.encode(text)


@PROPERTY
@given(sp_text)
def test_gguf_llama_decode_matches_sentencepiece(spm_gguf_tokenizer, spm_processor, text):
    ids = spm_processor.encode(text)
    assert spm_gguf_tokenizer.decode(ids) == spm_processor.decode(ids)
    assert spm_gguf_tokenizer.decode([1, *ids], skip_special_tokens=True) == spm_processor.decode(ids)


@PROPERTY
@given(st.lists(st.one_of(wordy_text, st.sampled_from(["<s>", "</s>"])), max_size=6).map("".join))
def test_gguf_llama_agrees_with_spm_tokenizer_around_special_tokens(spm_gguf_tokenizer, spm_tokenizer, text):
    assert spm_gguf_tokenizer.encode(text) == spm_tokenizer.encode(text)
    ids = spm_tokenizer.encode(text)
    for skip in (False, True):
        expected = spm_tokenizer.decode(ids, skip_special_tokens=skip)
        assert spm_gguf_tokenizer.decode(ids, skip_special_tokens=skip) == expected


def test_gguf_llama_leading_spaces_and_byte_fallback(spm_gguf_tokenizer, spm_processor):
    for text in [" Hello", "  two  spaces", "\tx", "😀 y", "日本\n\n", ""]:
        assert spm_gguf_tokenizer.encode(text, add_special_tokens=False) == spm_processor.encode(text), text
        assert spm_gguf_tokenizer.decode(spm_processor.encode(text)) == text
    assert spm_gguf_tokenizer.convert_ids_to_tokens(spm_gguf_tokenizer.encode("😀", add_special_tokens=False)) == [
        "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"
    ]


def test_gguf_llama_metadata(spm_gguf_tokenizer):
    assert spm_gguf_tokenizer.vocab_size == 500
    assert (spm_gguf_tokenizer.bos_token, spm_gguf_tokenizer.eos_token) == ("<s>", "</s>")
    assert spm_gguf_tokenizer.add_bos_token is True and spm_gguf_tokenizer.encode("a")[0] == 1
    assert spm_gguf_tokenizer.all_special_ids == {0, 1, 2}
    assert spm_gguf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[hi]"


def test_gguf_llama_without_space_prefix(spm_gguf_metadata, spm_processor):
    tokenizer = tokenizer_from_gguf({**spm_gguf_metadata, "tokenizer.ggml.add_space_prefix": False})
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert not tokenizer.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(spm_processor.encode("hello")) == " hello"  # nothing to strip without the prefix


def test_gguf_llama_pickles(spm_gguf_tokenizer):
    clone = pickle.loads(pickle.dumps(spm_gguf_tokenizer))
    assert clone.encode(" the quick 42 😀") == spm_gguf_tokenizer.encode(" the quick 42 😀")


def test_gguf_llama_needs_one_score_per_token(spm_gguf_metadata):
    metadata = {**spm_gguf_metadata, "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        tokenizer_from_gguf(metadata)
