"""A token's raw bytes, as its vocabulary spells them: what logprobs report, since a token that holds
part of a UTF-8 character has no text of its own ("\ufffd" when decoded alone).

Three spellings are known:
- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every byte is one character of GPT-2's byte alphabet;
- byte fallback (SentencePiece, and `tokenizers` files converted from it): "<0xE3>" is one byte,
  other pieces are text with "▁" for a space;
- anything else: the token's text, in UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SPACE_MARK = "\u2581"  # SentencePiece's visible space, "▁"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the rest for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in alphabet)
    alphabet.update((b, chr(256 + n)) for n, b in enumerate(extra))
    return alphabet


_ALPHABET_BYTES = {char: byte for byte, char in byte_alphabet().items()}


def byte_level_bytes(token: str) -> bytes:
    """A byte-level vocabulary entry's bytes, as `tokenizers`' ByteLevel decoder reads it.

    A token with a character outside the alphabet is an added token written as plain text
    ("<|im_end|>" is inside it, "▁" or "é" are not), so it stands for its own UTF-8.
    """
    try:
        return bytes(_ALPHABET_BYTES[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


def byte_piece_value(piece: str) -> int | None:
    """The byte of a byte-fallback piece "<0x00>".."<0xFF>", or None for any other piece."""
    if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
        return None
    try:
        return int(piece[3:5], 16)
    except ValueError:
        return None


def piece_bytes(piece: str) -> bytes:
    """A SentencePiece text piece's bytes, "▁" read as a space.

    The leading space of "▁Hello" is kept: decoding drops it only at the start of a text, which is
    a matter of position, not of the token.
    """
    return piece.replace(SPACE_MARK, " ").encode("utf-8")


def decoder_steps(decoder: Any | None) -> list[Mapping[str, Any]]:
    """The steps of a `tokenizers` decoder (a Sequence's parts, else the decoder itself) as their JSON configs.

    Read from the decoder's own serialization (what pickling it writes), so every decoder kind
    of every `tokenizers` version can be inspected the same way.
    """
    if decoder is None:
        return []
    config = json.loads(decoder.__getstate__())
    return list(config["decoders"]) if config.get("type") == "Sequence" else [config]


def decoded_token_bytes(token: str, steps: list[Mapping[str, Any]]) -> bytes:
    """The bytes one vocabulary entry stands for, under a `tokenizers` decoder's `steps`.

    Only the steps that map each token on its own apply; those that depend on the token's place in
    the text (Strip, a Metaspace's first prefix space, WordPiece's joining) or join tokens (Fuse) do not.
    A Replace by regex is left out: converters write plain-string ones for the "▁" of SentencePiece.
    """
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            return byte_level_bytes(token)
        if kind == "ByteFallback":
            byte = byte_piece_value(token)
            if byte is not None:
                return bytes([byte])
        elif kind == "Replace":
            pattern = step.get("pattern", {})
            if "String" in pattern:
                token = token.replace(pattern["String"], step.get("content", ""))
        elif kind == "Metaspace":
            token = token.replace(step.get("replacement", SPACE_MARK), " ")
    return token.encode("utf-8")
