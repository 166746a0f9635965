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


def _k_quant_groups(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Q4_K's and Q5_K's common part, for float32 [rows, cols (a multiple of 256)]: per block of 256, float16 d and
    dmin (4 bytes), each group of 32's 6-bit scale sc and minimum m packed in 12 bytes as llama.cpp packs them;
    and the values q (0..levels) with w = d sc q - dmin m. Plain min/max rounding: a valid file, not llama.cpp's
    best one. Returns (the 4 + 12 header bytes [rows, blocks, 16], q [rows, blocks, 8, 32], blocks)."""
    rows, cols = values.shape
    blocks = cols // 256
    x = values.reshape(rows, blocks, 8, 32).astype(np.float32)
    minimum = -np.minimum(x.min(-1), 0)  # [rows, blocks, 8]: w = step q - minimum
    step = (x.max(-1) + minimum) / levels
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (minimum.max(-1) / 63).astype(np.float16)

    def sixbit(value, unit):
        unit = unit.astype(np.float32)[..., None]
        return np.clip(np.rint(np.divide(value, unit, out=np.zeros_like(value), where=unit > 0)), 0, 63).astype(np.uint8)

    sc, m = sixbit(step, d), sixbit(minimum, dmin)
    scale = np.broadcast_to((d.astype(np.float32)[..., None] * sc)[..., None], x.shape)
    shifted = x + (dmin.astype(np.float32)[..., None] * m)[..., None]
    q = np.clip(np.rint(np.divide(shifted, scale, out=np.zeros_like(x), where=scale > 0)), 0, levels).astype(np.uint8)
    header = np.concatenate(
        [
            np.stack([d, dmin], axis=-1).view(np.uint8).reshape(rows, blocks, 4),
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ],
        axis=-1,
    )  # fmt: skip
    return header, q, blocks


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """Per 64 values of a block, the first 32's low 4 bits in low nibbles and the next 32's in high: 128 bytes."""
    rows, blocks = q.shape[:2]
    nibbles = (q & 15).reshape(rows, blocks, 4, 2, 32)
    return (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).reshape(rows, blocks, 128)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, cols (a multiple of 256)] as GGUF Q4_K blocks, [rows, cols // 256 * 144] uint8 (the `gguf`
    package reads this type but cannot write it): the header of `_k_quant_groups`, then 4-bit values."""
    header, q, blocks = _k_quant_groups(values, 15)
    return np.concatenate([header, _low_nibbles(q)], axis=-1).reshape(len(values), blocks * 144)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, cols (a multiple of 256)] as GGUF Q5_K blocks, [rows, cols // 256 * 176] uint8: Q4_K's header
    with 5-bit values, whose fifth bits (group g's value j: bit g of byte j) come in 32 bytes before the 128 of
    low nibbles."""
    header, q, blocks = _k_quant_groups(values, 31)
    high = ((q >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).sum(axis=2, dtype=np.uint8)  # [rows, blocks, 32]
    return np.concatenate([header, high, _low_nibbles(q)], axis=-1).reshape(len(values), blocks * 176)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float32 [rows, cols (a multiple of 256)] as GGUF Q6_K blocks, [rows, cols // 256 * 210] uint8 (which `gguf`
    reads but cannot write): per block of 256, the low 4 bits of each 6-bit value (128 bytes), the high 2 bits
    (64 bytes), an int8 scale per 16 values and a float16 d, so that w = d sc (q - 32). Plain abs-max rounding."""
    rows, cols = values.shape
    blocks = cols // 256
    x = values.reshape(rows, blocks, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31  # [rows, blocks, 16]
    d = (step.max(-1) / 127).astype(np.float16)
    unit = d.astype(np.float32)[..., None]
    sc = np.clip(np.rint(np.divide(step, unit, out=np.zeros_like(step), where=unit > 0)), 0, 127).astype(np.int8)
    scale = np.broadcast_to((unit * sc)[..., None], x.shape)
    q = np.clip(np.rint(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)), -32, 31).astype(np.int16) + 32
    halves = q.astype(np.uint8).reshape(rows, blocks, 2, 128)  # each half of a block: 128 values
    low, high = halves & 0x0F, halves >> 4
    low_bytes = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, blocks, 128)  # value j and j + 64 of a half
    high = high.reshape(rows, blocks, 2, 4, 32)  # value j + 32 s of a half: bits 2s of byte j
    high_bytes = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)).reshape(rows, blocks, 64)
    parts = [low_bytes, high_bytes, sc.view(np.uint8), d.view(np.uint8).reshape(rows, blocks, 2)]
    return np.concatenate(parts, axis=-1).reshape(rows, blocks * 210)


WRITERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}  # the types `gguf` cannot write


def write_gguf(
    path: str, hf_model, qtype_name: str, arch: str = "llama", overrides: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Write `hf_model` to `path`, its matrices as `qtype_name` (those whose GGUF name ends with a key of
    `overrides` as its value, as llama.cpp's mixes do); returns the HF state dict as the file holds it (each
    matrix quantized and dequantized), to load into the reference."""
    cfg = hf_model.config
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
            matrix_type = next((t for suffix, t in (overrides or {}).items() if name.endswith(suffix)), qtype_name)
            qtype = gguf.GGMLQuantizationType[matrix_type]
            data = WRITERS[matrix_type](stored) if matrix_type in WRITERS else quantize(stored, qtype)
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
