"""The tokenizer interface the engine calls: text to ids, ids to text, and chat prompts to text."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer file, field or template is missing or malformed; the message names it and what was expected."""


@dataclass(frozen=True)
class TokenizerSettings:
    """What a checkpoint says about its special tokens and chat template, before the vocabulary resolves it.

    Config files name special tokens by text, GGUF metadata and config.json by id; either may be
    None, and the implementation fills in the other side from its vocabulary.
    """

    source: str  # the directory, file or "GGUF metadata" these came from, for error messages
    bos_token: str | None = None
    bos_token_id: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    unk_token: str | None = None
    unk_token_id: int | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None
    extra_stop_token_ids: tuple[int, ...] = ()  # e.g. Llama 3's <|eot_id|> from generation_config.json
    add_bos_token: bool | None = None  # None: what the vocabulary's own post-processor does
    add_eos_token: bool | None = None
    chat_template: str | None = None
    chat_template_source: str = "<chat template>"


class Tokenizer(ABC):
    """One model's vocabulary, with its special tokens and chat template.

    Implementations set every attribute below in their constructor and must survive pickling,
    because the engine may hand a tokenizer to another process.
    """

    vocab_size: int  # including added tokens
    bos_token_id: int | None
    eos_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    stop_token_ids: tuple[int, ...]  # eos plus any extra end-of-generation ids, deduplicated
    add_bos_token: bool  # whether encode(add_special_tokens=True) prepends BOS
    add_eos_token: bool = False  # whether it appends EOS (rare: a few embedding-style checkpoints)
    chat_template: str | None
    # Where the chat template came from, so a template error can name it.
    chat_template_source: str = "<chat template>"

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special-token strings inside it (like "<|im_start|>") become their ids."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `token_ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""

    @abstractmethod
    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's vocabulary entry, spelled as the vocabulary spells it (e.g. "Ġthe", "▁the", "<0x0A>")."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for in a text, whole or part of a UTF-8 character.

        Logprobs report these: decoding a lone token that holds part of a character gives U+FFFD,
        and clients rebuild the character from the bytes of consecutive tokens. A SentencePiece
        "▁the" keeps its leading space (decode drops it only at the start of a text); a special
        token gives its text. b"" for an id outside the vocabulary, which decode drops too (a
        model's embedding may be padded past the vocabulary, so it can sample such ids).

        This default, for tokenizers that do not know their vocabulary's spelling, is the token decoded alone
        (exact for whole characters only); the tokenizers here override it.
        """
        return self.decode([token_id]).encode("utf-8")

    @property
    @abstractmethod
    def all_special_ids(self) -> frozenset[int]:
        """Ids that skip_special_tokens removes: control tokens plus bos/eos/unk/pad."""

    def _add_bos_eos(self, ids: list[int]) -> list[int]:
        """`ids` with BOS before and EOS after, as far as this checkpoint asks for them."""
        if self.add_bos_token:
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, rendered with this model's chat template.

        `add_generation_prompt`: end with the header of an assistant turn (the model answers). `continue_final_message`:
        end inside the last message instead, right after its content (the model goes on with it: a prefilled
        answer), as transformers' and vLLM's option of that name does. Other keyword arguments reach the template
        as variables (a template may read e.g. `tools` or `enable_thinking`)."""
        from chat_core.tokenizer.chat_template import render_chat_template

        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message=True ends inside the last message: pass add_generation_prompt=False with it")
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message=True needs a last message whose content is text")

        if self.chat_template is None:
            raise TokenizerError(
                f"{type(self).__name__} has no chat template (looked in {self.chat_template_source}); "
                "pass a prompt string instead, or a checkpoint whose tokenizer files define one"
            )
        template_kwargs.setdefault("bos_token", self.bos_token or "")
        template_kwargs.setdefault("eos_token", self.eos_token or "")
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            template_source=self.chat_template_source,
            **template_kwargs,
        )
        if continue_final_message:  # cut after the last message's content (templates may strip it: try that too)
            final = messages[-1]["content"]
            for content in (final, final.strip()):
                end = text.rfind(content) if content else -1
                if end >= 0:
                    return text[: end + len(content)]
            raise ValueError(f"continue_final_message=True: the template did not render the last message's content {final!r}")
        return text


def dedupe_ids(*groups: int | Sequence[int] | None) -> tuple[int, ...]:
    """The ids of all groups in first-seen order, once each; None entries are dropped."""
    seen: dict[int, None] = {}
    for group in groups:
        if group is None:
            continue
        for token_id in [group] if isinstance(group, int) else group:
            if token_id is not None:
                seen.setdefault(int(token_id), None)
    return tuple(seen)
