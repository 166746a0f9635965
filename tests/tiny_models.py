"""Tiny random Hugging Face checkpoints of each supported family, made with transformers' save_pretrained."""

from __future__ import annotations

import os
from typing import Any

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "llama_tied")


def make_tiny_checkpoint(directory: str, family: str, *, vocab_size: int = 320, seed: int = 0, **overrides: Any):
    """Save a random model of `family` to `directory`; returns the transformers model (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama":
        config, model_cls = LlamaConfig(**{**common, "num_key_value_heads": 4, **overrides}), LlamaForCausalLM
    elif family == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        config = LlamaConfig(**{**common, "rope_scaling": scaling, "rope_theta": 500000.0, **overrides})
        model_cls = LlamaForCausalLM
    elif family == "mistral":
        config = MistralConfig(**{**common, "num_attention_heads": 8, "sliding_window": None, **overrides})
        model_cls = MistralForCausalLM
    elif family == "qwen2":
        config, model_cls = Qwen2Config(**{**common, "tie_word_embeddings": True, "initializer_range": 0.3, **overrides}), Qwen2ForCausalLM
    elif family == "llama_tied":
        config = LlamaConfig(**{**common, "tie_word_embeddings": True, "initializer_range": 0.3, **overrides})
        model_cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if family == "qwen2":  # transformers initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return model


CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "user assistant system: what is the capital of France? Paris is the capital.",
    "numbers 0123456789 and symbols !?.,;:'\"()[]{}",
] * 20


def add_tiny_tokenizer(directory: str, vocab_size: int = 320) -> None:
    """A byte-level BPE trained on a few sentences, saved as tokenizer.json with a chat template.

    Ids 0..2 are <unk>, <s>, </s> (bos 1, eos 2, as the tiny models' configs say)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, f)
