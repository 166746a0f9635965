"""Finds a checkpoint's tokenizer: the files of a Hugging Face directory, or a GGUF file's metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from chat_core.tokenizer.base import Tokenizer, TokenizerError, TokenizerSettings
from chat_core.tokenizer.gguf_tokenizer import build_gguf_tokenizer
from chat_core.tokenizer.hf_tokenizer import HFTokenizer
from chat_core.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory: tokenizer.json if present, else tokenizer.model.

    None when the directory has neither (a GGUF checkpoint carries its own; see `tokenizer_from_gguf`).
    Raises TokenizerError naming the file when one is present but unreadable.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TokenizerError(f"tokenizer directory {directory} does not exist or is not a directory")
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    sentencepiece_model = os.path.join(directory, "tokenizer.model")
    if os.path.exists(tokenizer_json):
        return HFTokenizer.from_file(tokenizer_json, read_tokenizer_settings(directory))
    if os.path.exists(sentencepiece_model):
        return SentencePieceTokenizer.from_file(sentencepiece_model, read_tokenizer_settings(directory))
    return None


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (pass `GGUFFile(path).metadata`)."""
    return build_gguf_tokenizer(metadata)


def read_tokenizer_settings(directory: str) -> TokenizerSettings:
    """Special tokens, stop ids, BOS/EOS flags and chat template from a Hugging Face directory's JSON files.

    Special tokens come from tokenizer_config.json, else special_tokens_map.json, else the ids in
    generation_config.json / config.json. Extra stop ids come from generation_config.json's
    eos_token_id (an int or a list), or config.json's when there is no generation_config.json.
    """
    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    model_config = _read_json(os.path.join(directory, "config.json")) or {}
    id_config = generation if generation is not None else model_config
    id_config_name = "generation_config.json" if generation is not None else "config.json"

    def text(name: str) -> str | None:
        value = config.get(name, special_map.get(name))
        return value.get("content") if isinstance(value, dict) else value

    def named(name: str) -> bool:
        # An explicit null (Qwen2's "bos_token": null) means none, not "look in config.json".
        return name in config or name in special_map

    eos_ids = _id_list(id_config.get("eos_token_id"), os.path.join(directory, id_config_name))
    bos_id = id_config.get("bos_token_id") if not named("bos_token") else None
    template, template_source = _chat_template(directory, config)
    return TokenizerSettings(
        source=directory,
        bos_token=text("bos_token"),
        bos_token_id=bos_id if isinstance(bos_id, int) else None,
        eos_token=text("eos_token"),
        eos_token_id=eos_ids[0] if eos_ids and not named("eos_token") else None,
        unk_token=text("unk_token"),
        pad_token=text("pad_token"),
        extra_stop_token_ids=tuple(eos_ids),
        add_bos_token=_optional_bool(config, "add_bos_token", directory),
        add_eos_token=_optional_bool(config, "add_eos_token", directory),
        chat_template=template,
        chat_template_source=template_source,
    )


def _chat_template(directory: str, config: dict[str, Any]) -> tuple[str | None, str]:
    """The default chat template and the file it came from (newer transformers write chat_template.jinja)."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template, config_path
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), jinja_path
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read chat template {jinja_path}: {exc}") from exc
    json_path = os.path.join(directory, "chat_template.json")
    template = (_read_json(json_path) or {}).get("chat_template")
    if isinstance(template, str):
        return template, json_path
    return None, f"{config_path}, chat_template.jinja and chat_template.json"


def _read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} holds a JSON {type(value).__name__}; expected an object")
    return value


def _id_list(value: Any, path: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: eos_token_id is {value!r}; expected a token id or a list of token ids")
    return values


def _optional_bool(config: dict[str, Any], key: str, directory: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{directory}/tokenizer_config.json: {key} is {value!r}; expected true or false")
    return value
