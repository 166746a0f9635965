"""A Tokenizer backed by the Hugging Face `tokenizers` library (a tokenizer.json, or one built from GGUF)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import tokenizers

from chat_core.tokenizer.base import Tokenizer, TokenizerError, TokenizerSettings, dedupe_ids
from chat_core.tokenizer.token_bytes import decoded_token_bytes, decoder_steps


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer`; BOS/EOS are added here, not by its post-processor, so the flags are explicit.

    Pickles through the `tokenizers` object's own pickling (its JSON form).
    """

    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings) -> None:
        self._backend = backend
        # A tokenizer.json may ask for truncation or padding; the engine wants every token of every prompt.
        backend.no_truncation()
        backend.no_padding()
        self.source = settings.source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

        self.bos_token_id, self.bos_token = self._resolve(settings.bos_token_id, settings.bos_token, "bos_token")
        self.eos_token_id, self.eos_token = self._resolve(settings.eos_token_id, settings.eos_token, "eos_token")
        unk_token_id, _ = self._resolve(settings.unk_token_id, settings.unk_token, "unk_token")
        pad_token_id, _ = self._resolve(settings.pad_token_id, settings.pad_token, "pad_token")
        for token_id in settings.extra_stop_token_ids:
            self._check_id(token_id, "a stop token id")
        self.stop_token_ids = dedupe_ids(self.eos_token_id, settings.extra_stop_token_ids)

        # What the vocabulary's post-processor would add, used when the config does not say.
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = (
            settings.add_bos_token
            if settings.add_bos_token is not None
            else self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        )
        self.add_eos_token = (
            settings.add_eos_token
            if settings.add_eos_token is not None
            else self.eos_token_id is not None and probe[-1:] == [self.eos_token_id]
        )
        if self.add_bos_token and self.bos_token_id is None:
            raise TokenizerError(f"{self.source}: add_bos_token is set but the tokenizer has no bos_token")
        if self.add_eos_token and self.eos_token_id is None:
            raise TokenizerError(f"{self.source}: add_eos_token is set but the tokenizer has no eos_token")

        self.chat_template = settings.chat_template
        self.chat_template_source = settings.chat_template_source
        marked_special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
        named = (self.bos_token_id, self.eos_token_id, unk_token_id, pad_token_id)
        self._special_ids = frozenset(marked_special | {i for i in named if i is not None})
        # How the decoder spells bytes (byte-level alphabet, "<0x..>" pieces), read once; bytes cached per id.
        self._decoder_steps = decoder_steps(backend.decoder)
        self._bytes_by_id: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], settings: TokenizerSettings) -> HFTokenizer:
        path = os.fspath(path)
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises a bare Exception for every parse error
            raise TokenizerError(f"{path} is not a readable tokenizer.json: {exc}") from exc
        return cls(backend, settings)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for tests and tools; the engine uses the methods below)."""
        return self._backend

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._add_bos_eos(ids) if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i not in self._special_ids]
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        tokens = []
        for token_id in token_ids:
            token = self._backend.id_to_token(token_id)
            if token is None:
                raise TokenizerError(
                    f"token id {token_id} is outside the vocabulary of {self.vocab_size} ({self.source})"
                )
            tokens.append(token)
        return tokens

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_by_id.get(token_id)
        if cached is None:
            token = self._backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
            cached = b"" if token is None else decoded_token_bytes(token, self._decoder_steps)
            self._bytes_by_id[token_id] = cached
        return cached

    def _resolve(self, token_id: int | None, token: str | None, field: str) -> tuple[int | None, str | None]:
        """(id, text) of a special token given by either; the text must be in the vocabulary."""
        if token_id is not None:
            self._check_id(token_id, field)
            return token_id, self._backend.id_to_token(token_id)
        if token is None:
            return None, None
        found = self._backend.token_to_id(token)
        if found is None:
            raise TokenizerError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return found, token

    def _check_id(self, token_id: int, what: str) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"{self.source}: {what} {token_id} is outside the vocabulary (expected 0..{self.vocab_size - 1})"
            )
