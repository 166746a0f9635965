"""Builds a `tokenizers` tokenizer from GGUF metadata, the way llama.cpp reads the same keys.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with stored merges; how text is split before merging depends on
  `tokenizer.ggml.pre` (see `_PRE_TOKENIZERS`, taken from llama.cpp's llama-vocab.cpp).
- "llama": SentencePiece BPE stored as pieces + scores; merges are rebuilt from the scores and
  characters missing from the vocabulary fall back to byte pieces "<0x..>".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from chat_core.tokenizer.base import TokenizerError, TokenizerSettings
from chat_core.tokenizer.hf_tokenizer import HFTokenizer
from chat_core.tokenizer.sentencepiece_tokenizer import join_pieces
from chat_core.tokenizer.token_bytes import byte_alphabet, piece_bytes

logger = logging.getLogger(__name__)

SOURCE = "GGUF metadata"

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens llama.cpp also treats as end of generation, by text, since GGUF has no generation_config.
_END_OF_TURN_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"})

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


@dataclass(frozen=True)
class _PreTokenizer:
    """How a byte-level vocabulary splits text before merging; one row of llama.cpp's table."""

    split_regex: str | None  # None: GPT-2's own regex, built into `pre_tokenizers.ByteLevel`
    split_digits: bool = False  # every \p{N} character on its own, before the regex
    ignore_merges: bool = False  # a split that is already a token is kept whole
    nfc: bool = False  # the original tokenizer.json normalizes to NFC first
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


# GPT-2's regex is 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ .
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 is Llama 3's regex with single digits.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = _PreTokenizer(None)
_DIGITS_THEN_GPT2 = _PreTokenizer(None, split_digits=True)
_LLAMA3 = _PreTokenizer(_LLAMA3_REGEX, ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer(_QWEN2_REGEX, nfc=True)

_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("default", "gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"), _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer(_LLAMA3_REGEX)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}


def build_gguf_tokenizer(metadata: Mapping[str, Any]) -> HFTokenizer:
    """The tokenizer GGUF `metadata` (key -> Python value, as `GGUFFile.metadata`) describes."""
    kind = _required(metadata, "tokenizer.ggml.model")
    tokens = _token_texts(_required(metadata, "tokenizer.ggml.tokens"))
    types = _int_list(metadata, "tokenizer.ggml.token_type", len(tokens), default=NORMAL)
    if kind == "gpt2":
        pre = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
        backend = _byte_level_backend(tokens, types, _required(metadata, "tokenizer.ggml.merges"), pre)
        _add_special_tokens(backend, tokens, types)
        return HFTokenizer(backend, _settings(metadata, tokens, types, default_add_bos=pre.add_bos, default_ids={}))
    if kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(
                f"{SOURCE}: 'tokenizer.ggml.scores' must hold one score per token ({len(tokens)}), "
                f"got {'none' if scores is None else len(scores)}"
            )
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_backend(tokens, types, [float(s) for s in scores], add_space_prefix)
        _add_special_tokens(backend, tokens, types)
        llama_cpp_defaults = {"bos": 1, "eos": 2, "unknown": 0}  # for this kind, when the file names no ids
        settings = _settings(metadata, tokens, types, default_add_bos=True, default_ids=llama_cpp_defaults)
        return SentencePieceVocabTokenizer(
            backend, settings, _byte_values(tokens, types), strip_dummy_prefix=add_space_prefix
        )
    raise TokenizerError(
        f"{SOURCE}: 'tokenizer.ggml.model' is {kind!r}; supported vocabularies are 'gpt2' (byte-level BPE) "
        "and 'llama' (SentencePiece)"
    )


def _settings(
    metadata: Mapping[str, Any],
    tokens: list[str],
    types: list[int],
    *,
    default_add_bos: bool,
    default_ids: dict[str, int],
) -> TokenizerSettings:
    """Special-token ids, stop ids, BOS/EOS flags and chat template from the metadata."""
    def token_id(name: str) -> int | None:
        key = f"tokenizer.ggml.{name}_token_id"
        value = metadata.get(key, default_ids.get(name))
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise TokenizerError(f"{SOURCE}: {key!r} is {value}; expected a token id in 0..{len(tokens) - 1}")
        return int(value)

    end_of_turn = [i for i, t in enumerate(tokens) if types[i] == CONTROL and t in _END_OF_TURN_TEXTS]
    extra_stops = [i for i in (token_id("eot"), token_id("eom")) if i is not None] + end_of_turn
    bos_token_id = token_id("bos")
    template = metadata.get("tokenizer.chat_template")
    return TokenizerSettings(
        source=SOURCE,
        bos_token_id=bos_token_id,
        eos_token_id=token_id("eos"),
        unk_token_id=token_id("unknown"),
        pad_token_id=token_id("padding"),
        extra_stop_token_ids=tuple(extra_stops),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos and bos_token_id is not None)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=str(template) if template is not None else None,
        chat_template_source=f"{SOURCE} 'tokenizer.chat_template'",
    )


class SentencePieceVocabTokenizer(HFTokenizer):
    """A GGUF "llama" vocabulary: encodes with `tokenizers`, decodes as SentencePiece does.

    `tokenizers`' ByteFallback decoder turns a whole run of byte pieces into U+FFFDs when any of
    them is invalid, so a valid byte already streamed could later become U+FFFD; SentencePiece
    replaces only the invalid bytes.
    """

    def __init__(
        self,
        backend: Backend,
        settings: TokenizerSettings,
        byte_values: dict[int, int],
        *,
        strip_dummy_prefix: bool,
    ) -> None:
        super().__init__(backend, settings)
        self._byte_values = byte_values  # token id -> byte, for the "<0x..>" pieces
        self._strip_dummy_prefix = strip_dummy_prefix

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        pieces: list[str | int | None] = []
        for token_id in token_ids:
            if skip_special_tokens and token_id in self.all_special_ids:
                pieces.append(None)  # left out, but it still ends a run of bytes
                continue
            byte = self._byte_values.get(token_id)
            piece = self.backend.id_to_token(token_id) if byte is None else byte
            if piece is not None:  # ids outside the vocabulary are dropped, as `tokenizers` does
                pieces.append(piece)
        return join_pieces(pieces, strip_dummy_prefix=self._strip_dummy_prefix)

    def token_bytes(self, token_id: int) -> bytes:
        # The token types say which pieces are bytes; a normal piece spelled "<0x41>" is text.
        byte = self._byte_values.get(token_id)
        if byte is not None:
            return bytes([byte])
        piece = self.backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        return piece_bytes(piece) if piece is not None else b""


def _byte_values(tokens: list[str], types: list[int]) -> dict[int, int]:
    values = {}
    for token_id, token in enumerate(tokens):
        if types[token_id] != BYTE:
            continue
        try:
            if not (len(token) == 6 and token.startswith("<0x") and token.endswith(">")):
                raise ValueError(token)
            values[token_id] = int(token[3:5], 16)
        except ValueError:
            raise TokenizerError(f"{SOURCE}: byte token {token_id} is {token!r}; expected '<0x00>'..'<0xFF>'") from None
    return values


def _byte_level_backend(tokens: list[str], types: list[int], merges: Sequence[str], pre: _PreTokenizer) -> Backend:
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    # Normal tokens are stored in GPT-2's byte alphabet; a few converters wrote some as plain text.
    vocab_tokens = [
        "".join(alphabet[b] for b in t.encode()) if types[i] == NORMAL and not set(t) <= spelled else t
        for i, t in enumerate(tokens)
    ]
    vocab = _vocab(vocab_tokens)
    pairs = []
    for index, merge in enumerate(merges):
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"{SOURCE}: 'tokenizer.ggml.merges'[{index}] is {merge!r}; expected 'left right'")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    try:
        backend = Backend(BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    except Exception as exc:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise TokenizerError(f"{SOURCE}: 'tokenizer.ggml.merges' do not fit 'tokenizer.ggml.tokens': {exc}") from exc
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    if pre.split_regex is None:
        parts = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        parts = [
            pre_tokenizers.Split(Regex(pre.split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    if pre.split_digits:
        parts.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(parts)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool) -> Backend:
    vocab = _vocab(tokens)
    unk = next((t for i, t in enumerate(tokens) if types[i] == UNKNOWN), None)
    model = BPE(
        vocab=vocab,
        merges=_merges_from_scores(tokens, types, scores, vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(model)
    # A normalizer, not Metaspace: every run of text (also after a special token) gets the prefix space,
    # and text that already starts with a space gets a second one, as SentencePiece and llama.cpp do.
    escape = normalizers.Replace(" ", _SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), escape]) if add_space_prefix else escape
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every way to cut a normal piece into two normal pieces, best score first.

    SentencePiece BPE merges the adjacent pair whose joined piece scores highest, so ranking each
    cut by its piece's score makes `tokenizers`' rank-ordered BPE choose the same merges.
    """
    ranked = []
    for piece_id, piece in enumerate(tokens):
        if types[piece_id] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None and types[left] == NORMAL and types[right] == NORMAL:
                ranked.append((-scores[piece_id], piece_id, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens.

    Added tokens are found whole in the text before any splitting, as llama.cpp does for these types.
    """
    pairs = list(zip(tokens, types))
    special = [AddedToken(t, special=True, normalized=False) for t, kind in pairs if kind in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in pairs if kind == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _pre_tokenizer(name: Any) -> _PreTokenizer:
    if name in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[name]
    logger.warning(
        "%s: 'tokenizer.ggml.pre' is %r, which this library does not know; splitting text as GPT-2 does "
        "('default'), so tokens may differ from the model's own tokenizer. Known: %s",
        SOURCE,
        name,
        ", ".join(sorted(_PRE_TOKENIZERS)),
    )
    return _GPT2


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise TokenizerError(
                f"{SOURCE}: 'tokenizer.ggml.tokens' holds {token!r} twice (ids {vocab[token]} and {index}); "
                "expected unique tokens"
            )
        vocab[token] = index
    return vocab


def _token_texts(tokens: Any) -> list[str]:
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not tokens:
        raise TokenizerError(f"{SOURCE}: 'tokenizer.ggml.tokens' must be a non-empty list of strings")
    # llama.cpp renames empty tokens the same way, so both agree on their text.
    return [str(t) if t != "" else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]


def _int_list(metadata: Mapping[str, Any], key: str, length: int, default: int) -> list[int]:
    values = metadata.get(key)
    if values is None:
        return [default] * length
    if len(values) != length:
        raise TokenizerError(f"{SOURCE}: {key!r} has {len(values)} entries; expected one per token ({length})")
    return [int(v) for v in values]


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise TokenizerError(f"{SOURCE} has no {key!r}; a GGUF file needs it to build a tokenizer")
    return metadata[key]
