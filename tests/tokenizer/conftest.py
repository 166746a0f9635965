"""Session-wide tokenizers for the tokenizer tests: the SmolLM2 GGUF (ours and transformers'), and a
tiny SentencePiece model trained here, also written out as a GGUF "llama" vocabulary."""

from __future__ import annotations

import copy
import os
import random

import pytest

TINY_SPM_VOCAB = 500


@pytest.fixture(scope="session")
def smollm2_gguf_path(smollm2_path: str) -> str:
    return smollm2_path  # the real checkpoint is a test requirement: a missing one fails, it does not skip


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf_path: str) -> dict:
    from chat_core.checkpoint.gguf_file import GGUFFile

    return GGUFFile(smollm2_gguf_path).metadata


@pytest.fixture(scope="session")
def smollm2(smollm2_metadata: dict):
    from chat_core.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(smollm2_metadata)


@pytest.fixture(scope="session")
def hf_smollm2_unpatched(smollm2_gguf_path: str):
    """transformers' own GGUF tokenizer: ignores tokenizer.ggml.pre == "smollm" (plain GPT-2 splitting)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path)
    )


@pytest.fixture(scope="session")
def hf_smollm2(hf_smollm2_unpatched):
    """The reference: transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's original
    tokenizer.json put back (every digit alone, then GPT-2's byte-level regex), which is what the
    model was trained with and what llama.cpp does for tokenizer.ggml.pre == "smollm"."""
    from tokenizers import pre_tokenizers

    patched = copy.deepcopy(hf_smollm2_unpatched)
    patched.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return patched


def _training_lines(seed: int = 0, count: int = 3000) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over lazy dog hello world token model language large small "
        "inference engine python rust code test value number café naïve über "
        "東京 日本 привет мир données"
    ).split()
    lines = []
    for _ in range(count):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 100000)}"
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice(".!?,:")
        if rng.random() < 0.1:
            line = "    " + line
        lines.append(line)
    return lines


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> str:
    """A tiny SentencePiece BPE model with Llama's settings: byte fallback, no normalization, digits split."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("spm")
    prefix = str(directory / "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=TINY_SPM_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        minloglevel=2,
        num_threads=1,
    )
    return prefix + ".model"


@pytest.fixture(scope="session")
def spm_processor(spm_model_path: str):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=spm_model_path)


@pytest.fixture(scope="session")
def spm_tokenizer(spm_model_path: str):
    from chat_core.tokenizer import SentencePieceTokenizer, TokenizerSettings

    return SentencePieceTokenizer.from_file(spm_model_path, TokenizerSettings(source=spm_model_path))


def write_sentencepiece_gguf(processor, path: str, **extra) -> None:
    """The vocabulary as llama.cpp's convert script writes a SentencePiece model (no tensors)."""
    import gguf

    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif processor.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif processor.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif processor.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    if "chat_template" in extra:
        writer.add_chat_template(extra["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def spm_gguf_metadata(spm_processor, tmp_path_factory) -> dict:
    from chat_core.checkpoint.gguf_file import GGUFFile

    path = str(tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf")
    template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    write_sentencepiece_gguf(spm_processor, path, chat_template=template)
    return GGUFFile(path).metadata


@pytest.fixture(scope="session")
def spm_gguf_tokenizer(spm_gguf_metadata: dict):
    from chat_core.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(spm_gguf_metadata)
