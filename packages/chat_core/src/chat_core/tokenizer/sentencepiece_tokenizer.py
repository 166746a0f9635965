"""A Tokenizer backed by a SentencePiece `tokenizer.model` (Llama 1/2, Mistral, TinyLlama...)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import sentencepiece

from chat_core.tokenizer.base import Tokenizer, TokenizerError, TokenizerSettings, dedupe_ids
from chat_core.tokenizer.token_bytes import piece_bytes

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_ESCAPED_BYTE_TO_REPLACEMENT = dict.fromkeys(range(0xDC80, 0xDD00), 0xFFFD)  # surrogateescape's range


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece, plus what it lacks: control tokens written in the text ("<s>") become their ids.

    Each run of text between control tokens is encoded separately and gets SentencePiece's dummy
    prefix space, as llama.cpp does. Pickles as the serialized model.
    """

    def __init__(self, model_proto: bytes, settings: TokenizerSettings, *, model_path: str | None = None) -> None:
        """`model_proto` is the content of a tokenizer.model; `model_path`, if given, names it in errors."""
        self._model_proto = model_proto
        self._settings = settings
        self._model_path = model_path
        self._processor = _load_processor(model_proto, model_path or settings.source)
        sp = self._processor
        self.source = settings.source
        self.vocab_size = sp.get_piece_size()

        self.bos_token_id, self.bos_token = self._resolve(settings.bos_token_id, settings.bos_token, sp.bos_id(), "bos")
        self.eos_token_id, self.eos_token = self._resolve(settings.eos_token_id, settings.eos_token, sp.eos_id(), "eos")
        unk_token_id, _ = self._resolve(settings.unk_token_id, settings.unk_token, sp.unk_id(), "unk")
        pad_token_id, _ = self._resolve(settings.pad_token_id, settings.pad_token, sp.pad_id(), "pad")
        for token_id in settings.extra_stop_token_ids:
            self._check_id(token_id, "a stop token id")
        self.stop_token_ids = dedupe_ids(self.eos_token_id, settings.extra_stop_token_ids)
        # SentencePiece models of the Llama family start every text with BOS unless the config says otherwise.
        add_bos = settings.add_bos_token
        self.add_bos_token = add_bos if add_bos is not None else self.bos_token_id is not None
        self.add_eos_token = bool(settings.add_eos_token)
        if self.add_bos_token and self.bos_token_id is None:
            raise TokenizerError(f"{self.source}: add_bos_token is set but the model has no bos piece")
        if self.add_eos_token and self.eos_token_id is None:
            raise TokenizerError(f"{self.source}: add_eos_token is set but the model has no eos piece")
        self.chat_template = settings.chat_template
        self.chat_template_source = settings.chat_template_source

        control = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        named = (self.bos_token_id, self.eos_token_id, unk_token_id, pad_token_id)
        self._special_ids = frozenset(control | {i for i in named if i is not None})
        # Control pieces are never produced by SentencePiece from text, so find them ourselves, longest first.
        self._special_by_text = {sp.id_to_piece(i): i for i in sorted(control) if not sp.is_unknown(i)}
        texts = sorted(self._special_by_text, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        # Decoding drops the space SentencePiece itself put before the text, if this model adds one.
        self._strips_dummy_prefix = sp.encode("a", out_type=str)[0].startswith(_SPACE)
        self._bytes_by_id: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], settings: TokenizerSettings) -> SentencePieceTokenizer:
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                model_proto = f.read()
        except OSError as exc:
            raise TokenizerError(f"cannot read SentencePiece model {path}: {exc}") from exc
        return cls(model_proto, settings, model_path=path)

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._model_proto, "settings": self._settings, "model_path": self._model_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["settings"], model_path=state["model_path"])  # type: ignore[misc]

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text) if self._special_pattern else ():
            if match.start() > start:
                ids.extend(self._processor.encode(text[start : match.start()]))
            ids.append(self._special_by_text[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._processor.encode(text[start:]))
        return self._add_bos_eos(ids) if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        sp = self._processor
        pieces: list[str | int | None] = []
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                continue  # as `tokenizers` does: an id the model may emit but the vocabulary lacks
            if token_id in self._special_ids:
                pieces.append(None if skip_special_tokens else sp.id_to_piece(token_id))
            elif sp.is_byte(token_id):
                pieces.append(int(sp.id_to_piece(token_id)[3:5], 16))  # pieces "<0x00>".."<0xFF>"
            else:
                pieces.append(sp.id_to_piece(token_id))
        return join_pieces(pieces, strip_dummy_prefix=self._strips_dummy_prefix)

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_by_id.get(token_id)
        if cached is None:
            cached = self._piece_bytes(token_id) if 0 <= token_id < self.vocab_size else b""
            self._bytes_by_id[token_id] = cached
        return cached

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self._processor.id_to_piece(token_id)
        if self._processor.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])  # pieces "<0x00>".."<0xFF>"
        return piece_bytes(piece)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        for token_id in token_ids:
            self._check_id(token_id, "token id")
        return [self._processor.id_to_piece(i) for i in token_ids]

    def _resolve(
        self, token_id: int | None, token: str | None, model_id: int, name: str
    ) -> tuple[int | None, str | None]:
        """(id, text) of special token `name`: the config's id, else its text, else the model's own (-1: none)."""
        field = f"{name}_token"
        if token_id is None and token is not None:
            token_id = self._processor.piece_to_id(token)
            if self._processor.id_to_piece(token_id) != token:  # piece_to_id answers unk for unknown text
                raise TokenizerError(f"{self.source}: {field} {token!r} is not a piece of the SentencePiece model")
        if token_id is None:
            token_id = model_id if model_id >= 0 else None
        if token_id is None:
            return None, None
        self._check_id(token_id, field)
        return token_id, self._processor.id_to_piece(token_id)

    def _check_id(self, token_id: int, what: str) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"{self.source}: {what} {token_id} is outside the vocabulary (expected 0..{self.vocab_size - 1})"
            )


def _load_processor(model_proto: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except Exception as exc:  # sentencepiece raises RuntimeError or OSError depending on the failure
        raise TokenizerError(f"{source} is not a readable SentencePiece model: {exc}") from exc
    return processor


def join_pieces(pieces: Sequence[str | int | None], *, strip_dummy_prefix: bool) -> str:
    """SentencePiece's decoding of pieces (text with "▁" for spaces) and bytes (ints, from "<0x..>" pieces);
    None stands for a special token left out, which still ends a run of bytes, as in SentencePiece.

    The first piece loses the space SentencePiece put before the text; each byte that is not part
    of a valid UTF-8 character becomes one U+FFFD, so text already decoded never changes when
    more pieces follow (Python's "replace" would give one U+FFFD per broken sequence).
    """
    text, out = [], bytearray()
    first = True
    for piece in pieces:
        if piece is None:  # bytes on either side of a skipped special token are never one character
            text.append(_decode_bytes(out))
            out = bytearray()
            continue
        if isinstance(piece, int):
            out.append(piece)
        else:
            if first and strip_dummy_prefix and piece.startswith(_SPACE):
                piece = piece[1:]
            out += piece.replace(_SPACE, " ").encode()
        first = False
    text.append(_decode_bytes(out))
    return "".join(text)


def _decode_bytes(out: bytearray) -> str:
    return out.decode("utf-8", errors="surrogateescape").translate(_ESCAPED_BYTE_TO_REPLACEMENT)
