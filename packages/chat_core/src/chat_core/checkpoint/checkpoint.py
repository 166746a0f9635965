"""Finding a checkpoint (a Hugging Face directory, a GGUF file, or an alias) and listing its tensors
under Hugging Face names, unread, so each rank reads only what it needs."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import numpy as np

from chat_core.checkpoint.aliases import resolve_alias
from chat_core.checkpoint.errors import CheckpointError
from chat_core.checkpoint.gguf_file import GGUFFile
from chat_core.checkpoint.tensor_source import SafetensorsTensor, TensorSource
from chat_core.config import ModelConfig


class Checkpoint:
    """A model's configuration, tensors (by Hugging Face name) and tokenizer files, not yet read."""

    path: str
    config: ModelConfig

    def tensors(self) -> Iterator[tuple[str, TensorSource]]:
        raise NotImplementedError

    @property
    def num_tensors(self) -> int | None:
        """How many tensors `tensors()` yields, when known without reading them (for progress bars)."""
        return None

    def tensor_formats(self) -> dict[str, str]:
        """How each tensor is stored, by name, where that is a quantized format (e.g. GGUF's "Q4_1")."""
        return {}

    def load_tokenizer(self):  # -> Tokenizer | None
        raise NotImplementedError

    def release_tensors(self) -> None:
        """Close whatever maps the tensor data (once the model holds its weights); `tensors()` opens it again."""

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults the checkpoint suggests (generation_config.json), if any."""
        return {}


def open_checkpoint(path_or_alias: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint from a directory, a `.gguf` file, or a short alias such as `smollm2-135m-instruct`."""
    path = resolve_alias(os.fspath(path_or_alias))
    if os.path.isdir(path):
        return HFDirectoryCheckpoint(path)
    if os.path.isfile(path):
        if path.endswith(".gguf") or _has_gguf_magic(path):
            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path} is neither a model directory nor a GGUF file")
    raise CheckpointError(
        f"model not found: {path!r} is not a directory, a GGUF file, or a known alias"
        " (see chat_core.checkpoint.aliases.MODEL_ALIASES)"
    )


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class HFDirectoryCheckpoint(Checkpoint):
    """`config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        config_path = os.path.join(path, "config.json")
        self.raw_config = _read_json(config_path)
        self.config = ModelConfig.from_hf_config(self.raw_config, source=config_path)
        generation_path = os.path.join(path, "generation_config.json")
        self._generation = _read_json(generation_path) if os.path.exists(generation_path) else {}
        if self._generation.get("eos_token_id") is not None:
            eos = self._generation["eos_token_id"]
            eos_ids = tuple(dict.fromkeys([*self.config.eos_token_ids, *(eos if isinstance(eos, list) else [eos])]))
            self.config = dataclasses.replace(self.config, eos_token_ids=eos_ids)
        self.files = self._safetensors_files()

    def _safetensors_files(self) -> list[str]:
        index_path = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: expected a 'weight_map' object")
            files = [os.path.join(self.path, name) for name in dict.fromkeys(weight_map.values())]
        elif os.path.exists(os.path.join(self.path, "model.safetensors")):
            files = [os.path.join(self.path, "model.safetensors")]
        else:
            raise CheckpointError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)"
            )
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"checkpoint shard not found: {file}")
        return files

    def tensors(self) -> Iterator[tuple[str, TensorSource]]:
        from safetensors import safe_open

        for file in self.files:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
            with handle:  # names and shapes only: each tensor maps the file when it is read (see SafetensorsTensor)
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            for name, shape in shapes.items():
                yield name, SafetensorsTensor(file, name, shape)

    def load_tokenizer(self):
        from chat_core.tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return {k: self._generation[k] for k in ("temperature", "top_p", "top_k") if k in self._generation}


# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFCheckpoint(Checkpoint):
    """A single GGUF file: hyper-parameters, tokenizer and chat template all come from its metadata."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: GGUFFile | None = GGUFFile(path)
        config = ModelConfig.from_gguf_metadata(self.file.metadata, source=path)
        tied = "output.weight" not in self.file.tensors
        self.config = dataclasses.replace(config, tie_word_embeddings=tied)

    @property
    def file(self) -> GGUFFile:
        if self._file is None:
            self._file = GGUFFile(self.path)
        return self._file

    def release_tensors(self) -> None:
        # The file's pages stay resident while it is mapped: as much memory again as the weights.
        self._file = None
        self.__dict__.pop("_hf_tensors", None)

    @cached_property
    def _hf_tensors(self) -> dict[str, TensorSource]:
        tensors: dict[str, TensorSource] = {}
        for name, tensor in self.file.tensors.items():
            hf_name = self._hf_name(name)
            if hf_name is None:
                continue  # e.g. rope_freqs, which we compute
            if self.config.architecture in ("llama", "mistral") and (".q_proj." in hf_name or ".k_proj." in hf_name):
                heads = self.config.num_heads if ".q_proj." in hf_name else self.config.num_kv_heads
                tensor = tensor.with_row_order(_unpermute_rows(tensor.shape[0], heads))
            tensors[hf_name] = tensor
        return tensors

    @staticmethod
    def _hf_name(name: str) -> str | None:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        return None

    def tensors(self) -> Iterator[tuple[str, TensorSource]]:
        for name, tensor in self._hf_tensors.items():
            yield name, tensor
            self.file.drop_pages(tensor)  # loaded: its bytes leave this process's memory before the next one's come in

    @property
    def num_tensors(self) -> int:
        return len(self._hf_tensors)

    def tensor_formats(self) -> dict[str, str]:
        return {name: tensor.type_name for name, tensor in self._hf_tensors.items()}

    def load_tokenizer(self):
        if "tokenizer.ggml.model" not in self.file.metadata:
            return None  # a GGUF without a vocabulary still generates from token ids
        from chat_core.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.file.metadata)


def _unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's interleaving of q/k rows for its rotary layout.

    llama.cpp stores each head's rows as pairs (0, d/2, 1, d/2+1, ...); Hugging Face keeps the halves
    apart. Row i of the Hugging Face weight is row `order[i]` of the file; heads stay in place, so a
    rank's head range reads only its own rows.
    """
    head_dim = num_rows // num_heads
    within_head = np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)  # hf row -> file row in a head
    inverse = np.argsort(within_head)
    return (np.arange(num_heads)[:, None] * head_dim + inverse[None, :]).reshape(-1)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
