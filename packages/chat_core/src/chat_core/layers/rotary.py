"""Rotary position embedding (the `rotate_half` layout of Hugging Face checkpoints), with Llama 3 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from chat_core.config import RopeScaling
from chat_core.layers import native_ops


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_context = scaling.original_max_position_embeddings
        low_freq_wavelen = old_context / scaling.low_freq_factor
        high_freq_wavelen = old_context / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to `max_positions`; `lookup` is done once per step for all layers."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling, *, device=None
    ) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", angles.cos().to(device), persistent=False)
        # sin with the first half negated: rotate_half(x) * sin == roll(x, half) * signed_sin (see apply_rotary)
        signed = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        self.register_buffer("signed_sin_cache", signed.to(device), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for each token, shaped [tokens, 1, head_dim] to broadcast over heads."""
        return (
            self.cos_cache.index_select(0, positions).unsqueeze(1).to(dtype),
            self.signed_sin_cache.index_select(0, positions).unsqueeze(1).to(dtype),
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [tokens, heads, head_dim] by the angles of each token's position.

    The reference form is x * cos + cat(-x2, x1) * sin (halves x1, x2); roll(x, half) is cat(x2, x1), so
    the sign goes into the sin table and the rotation is three ops (one native call where `native_ops` applies)."""
    if native_ops.applies(x) and cos.dtype == torch.float32:
        return native_ops.rope(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)
