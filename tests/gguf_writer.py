"""Writes a transformers Llama-family model as a GGUF file the way llama.cpp's converter does."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` for q/k of the llama architecture."""
    return weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(path: str, hf_model, qtype_name: str, arch: str = "llama") -> dict[str, torch.Tensor]:
    """Write `hf_model` to `path`, its matrices as `qtype_name`; returns the HF state dict as the file
    holds it (each matrix quantized and dequantized), to load into the reference."""
    cfg = hf_model.config
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    as_stored: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_model.state_dict().items():
        values = tensor.detach().float().numpy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            parts = hf_name.split(".")
            name = f"blk.{parts[2]}." + LAYER_NAMES[".".join(parts[3:])]
        stored = values
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            stored = llama_cpp_permute(values, heads)
        if values.ndim == 2:
            data = quantize(stored, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            roundtrip = dequantize(data, qtype).reshape(values.shape)
            if stored is not values:  # undo the permutation for the reference
                heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
                d = values.shape[0] // heads
                roundtrip = roundtrip.reshape(heads, d // 2, 2, -1).swapaxes(1, 2).reshape(values.shape)
            as_stored[hf_name] = torch.from_numpy(np.ascontiguousarray(roundtrip, dtype=np.float32))
        else:
            writer.add_tensor(name, values.astype(np.float32))
            as_stored[hf_name] = torch.from_numpy(values.copy())
    if cfg.tie_word_embeddings:
        as_stored["lm_head.weight"] = as_stored["model.embed_tokens.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return as_stored
