"""Tokens that hold part of a UTF-8 character (CJK, emoji): their bytes, their text offsets, and
the text of a generation that ends inside a character, from the tokenizers up to the server's JSON."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chat_core import SamplingParams
from chat_core.tokenizer import IncrementalDetokenizer, SentencePieceTokenizer, TokenizerSettings, load_tokenizer

PROPERTY = settings(max_examples=150, deadline=None, database=None)
REPLACEMENT = "\ufffd"

# Characters that byte-level and byte-fallback vocabularies split across tokens, among plain ones.
RICH_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("😀🌟👩‍💻日本語東京の首都は漢字éñ  ab.!1\n")),
        st.characters(exclude_categories=("Cs",)),
    ),
    min_size=1,
    max_size=24,
)

JAPANESE = "日本の首都は"  # SmolLM2 answers "、アニ…": katakana split into two tokens each
EMOJI = "Reply with an emoji: "  # SmolLM2 answers "\n🌟🌟…": each star in three tokens


def complete_chars(data: bytes) -> int:
    """How many whole UTF-8 characters `data` holds, leaving out an unfinished one at its end."""
    return len(data.decode("utf-8", errors="ignore"))


# --- tokenizers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from chat_core.checkpoint.gguf_file import GGUFFile
    from chat_core.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(smollm2_path).metadata)


def test_byte_level_bytes_decode_as_the_vocabulary_does(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for token_id in range(tok.vocab_size):
        assert tok.token_bytes(token_id).decode("utf-8", errors="replace") == tok.decode([token_id]), token_id
    ids = tok.encode("日本", add_special_tokens=False)
    assert [tok.token_bytes(i) for i in ids] == [b"\xe6\x97", b"\xa5", "本".encode()]  # "日" split in two
    assert tok.token_bytes(tok.eos_token_id) == b"<|im_end|>"
    assert tok.token_bytes(tok.vocab_size) == b""  # as decode, which drops ids past the vocabulary


@PROPERTY
@given(RICH_TEXT)
def test_byte_level_bytes_join_to_the_text(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    # Special-token text becomes the special token; SmolLM2 lacks a few bytes (0xF1...), which encode drops.
    assume("<|" not in text and smollm2_tokenizer.decode(ids) == text)
    assert b"".join(smollm2_tokenizer.token_bytes(i) for i in ids) == text.encode()


@pytest.fixture(scope="module")
def spm_tokenizers(spm_model_path, tmp_path_factory) -> dict:
    """One SentencePiece vocabulary through all three readers: sentencepiece itself, a GGUF "llama"
    vocabulary, and the tokenizer.json transformers converts it to (a ByteFallback decoder)."""
    import gguf
    import sentencepiece
    import transformers

    from chat_core.checkpoint.gguf_file import GGUFFile
    from chat_core.tokenizer import tokenizer_from_gguf

    processor = sentencepiece.SentencePieceProcessor(model_file=spm_model_path)
    gguf_path = str(tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf")
    writer = gguf.GGUFWriter(gguf_path, arch="llama")
    writer.add_tokenizer_model("llama")
    ids = range(processor.get_piece_size())
    writer.add_token_list([processor.id_to_piece(i) for i in ids])
    writer.add_token_scores([processor.get_score(i) for i in ids])
    writer.add_token_types([_gguf_type(processor, i) for i in ids])
    writer.add_unk_token_id(processor.unk_id())
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()

    hf_dir = str(tmp_path_factory.mktemp("spm_json"))
    shutil.copy(spm_model_path, os.path.join(hf_dir, "tokenizer.model"))
    transformers.LlamaTokenizerFast.from_pretrained(hf_dir).save_pretrained(hf_dir)  # writes tokenizer.json
    return {
        "sentencepiece": SentencePieceTokenizer.from_file(spm_model_path, TokenizerSettings(source=spm_model_path)),
        "gguf": tokenizer_from_gguf(GGUFFile(gguf_path).metadata),
        "tokenizer.json": load_tokenizer(hf_dir),
    }


def _gguf_type(processor, token_id: int) -> int:
    import gguf

    if processor.is_unknown(token_id):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(token_id):
        return gguf.TokenType.CONTROL
    return gguf.TokenType.BYTE if processor.is_byte(token_id) else gguf.TokenType.NORMAL


def test_byte_fallback_pieces_are_their_bytes(spm_tokenizers):
    spm = spm_tokenizers["sentencepiece"]
    assert type(spm_tokenizers["tokenizer.json"]).__name__ == "HFTokenizer"
    for name, tok in spm_tokenizers.items():
        assert [tok.token_bytes(i) for i in range(spm.vocab_size)] == [spm.token_bytes(i) for i in range(spm.vocab_size)], name
    pieces = spm.convert_ids_to_tokens(range(spm.vocab_size))
    assert spm.token_bytes(pieces.index("<0xE3>")) == b"\xe3"
    hello = next(i for i, piece in enumerate(pieces) if piece.startswith("▁") and len(piece) > 2)
    assert spm.token_bytes(hello) == pieces[hello].replace("▁", " ").encode()  # the space is the token's


@PROPERTY
@given(RICH_TEXT)
def test_byte_fallback_bytes_join_to_the_text(spm_tokenizers, text):
    spm = spm_tokenizers["sentencepiece"]
    assume(not any(special in text for special in ("<s>", "</s>", "<unk>")) and "▁" not in text)
    ids = spm.encode(text, add_special_tokens=False)
    # SentencePiece puts a space before the text ("▁" on the first piece), which is the first token's.
    assert b"".join(spm.token_bytes(i) for i in ids) == b" " + text.encode()


# --- text offsets from the detokenizer, against the bytes -----------------------------------------


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def any_tokenizer(request, smollm2_tokenizer, spm_tokenizers):
    return smollm2_tokenizer if request.param == "byte-level" else spm_tokenizers["gguf"]


@PROPERTY
@given(RICH_TEXT)
def test_offsets_count_the_whole_characters_before_each_token(any_tokenizer, text):
    """Each token's offset is its first character's index in the text; for a token that starts inside
    a character, that character's (the number of whole characters in the bytes before it)."""
    tok = any_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    raw = [tok.token_bytes(i) for i in ids]
    assume(tok.decode(ids, skip_special_tokens=True) == text)  # nothing special, nothing the vocabulary lacks
    detokenizer = IncrementalDetokenizer(tok, tok.encode("Say:", add_special_tokens=False))
    offsets = []
    for token_id in ids:
        offsets.append(detokenizer.next_offset)
        detokenizer.push(token_id)
    # After a prompt, SentencePiece's first piece keeps its "▁": the text is then the bytes' " " + text.
    assert detokenizer.text + detokenizer.flush() == b"".join(raw).decode()
    assert offsets == [complete_chars(b"".join(raw[:i])) for i in range(len(ids))]


# --- the engine, on SmolLM2 -----------------------------------------------------------------------


def test_chosen_token_bytes_rebuild_cjk_and_emoji_text(smollm2_engine):
    for prompt, max_tokens in [(JAPANESE, 5), (EMOJI, 7)]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)
        completion = smollm2_engine.generate(prompt, params)[0].outputs[0]
        chosen = completion.logprobs
        assert not completion.text.endswith(REPLACEMENT) and any(lp.token == REPLACEMENT for lp in chosen), completion.text
        assert b"".join(lp.token_bytes for lp in chosen) == completion.text.encode()
        for lp in chosen:
            assert lp.token == lp.token_bytes.decode("utf-8", errors="replace")
        for alternatives in completion.top_logprobs:
            assert all(alt.token_bytes == smollm2_engine.tokenizer.token_bytes(alt.token_id) for alt in alternatives)


def test_text_offsets_index_the_completion_text(smollm2_engine):
    completion = smollm2_engine.generate(JAPANESE, SamplingParams(temperature=0, max_tokens=5, logprobs=0))[0].outputs[0]
    assert completion.text == "、アニ"
    # "、" is one token; "ア" and "ニ" two each, whose second halves belong to the character begun before them.
    assert [lp.text_offset for lp in completion.logprobs] == [0, 1, 1, 2, 2]
    raw = [lp.token_bytes for lp in completion.logprobs]
    for i, lp in enumerate(completion.logprobs):
        assert lp.text_offset == complete_chars(b"".join(raw[:i]))


def test_a_generation_cut_inside_a_character_ends_with_its_whole_decode(smollm2_engine):
    tok = smollm2_engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=2)
    out = smollm2_engine.generate(JAPANESE, params)[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True) == "、" + REPLACEMENT
    deltas = list(smollm2_engine.stream(JAPANESE, params))
    assert "".join(d.text for d in deltas) == out.text
    assert deltas[-1].finish_reason == "length" and deltas[-1].text.endswith(REPLACEMENT)


def test_a_stop_token_inside_a_character_keeps_the_bytes_before_it(smollm2_engine):
    tok = smollm2_engine.tokenizer
    greedy = smollm2_engine.generate(JAPANESE, SamplingParams(temperature=0, max_tokens=3))[0].token_ids
    assert tok.token_bytes(greedy[1]) == b"\xe3\x82"  # the first half of "ア"; greedy[2] is its second
    out = smollm2_engine.generate(JAPANESE, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy[2]]))[0]
    assert out.token_ids == greedy and out.finish_reason == "stop"
    assert out.text == tok.decode(greedy[:2]) == "、" + REPLACEMENT  # the stop token's own text is never shown


# --- the server's JSON ------------------------------------------------------------------------------


def test_server_logprobs_carry_the_token_bytes_and_offsets(smollm2_engine):
    from chat_cli.server.logprobs import chat_logprobs, completion_logprobs

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    completion = smollm2_engine.generate(JAPANESE, params)[0].outputs[0]
    assert completion.text == "、アニ" + REPLACEMENT  # the sixth token is half of a character

    chat = chat_logprobs(completion.logprobs, completion.top_logprobs).model_dump(mode="json")
    assert bytes(b for entry in chat["content"] for b in entry["bytes"]) == "、アニ".encode() + b"\xe3\x83"
    assert [entry["bytes"] for entry in chat["content"]][1] == [0xE3, 0x82]
    for entry, alternatives in zip(chat["content"], completion.top_logprobs):
        assert [top["bytes"] for top in entry["top_logprobs"]] == [list(alt.token_bytes) for alt in alternatives]

    text = completion_logprobs(completion.logprobs, completion.top_logprobs, 0).model_dump(mode="json")
    assert text["text_offset"] == [0, 1, 1, 2, 2, 3]
    assert all(0 <= offset < len(completion.text) for offset in text["text_offset"])


def test_streamed_completion_offsets_equal_the_whole_ones(smollm2_engine):
    """The server's streaming path: each step's delta of the engine's outputs, converted on its own."""
    from chat_cli.server.logprobs import completion_logprobs
    from chat_cli.server.streaming import DeltaTracker

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    request_id = smollm2_engine.add_request(JAPANESE, params)
    tracker, offsets, text, final = DeltaTracker(1), [], "", None
    while final is None:
        for output in smollm2_engine.generator.step():
            assert output.request_id == request_id
            for delta in tracker.deltas(0, output):
                text += delta.text
                offsets += completion_logprobs(delta.logprobs, delta.top_logprobs, delta.text_offset).text_offset
            final = output if output.finished else None
    whole = completion_logprobs(final.outputs[0].logprobs, None, 0)
    assert text == final.text == "、アニ" + REPLACEMENT
    assert offsets == whole.text_offset == [0, 1, 1, 2, 2, 3]
