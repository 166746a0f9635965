"""The gated activation of Llama's MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chat_core.layers import native_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up` = [..., 2 * width], the gate then the up projection -> [..., width]."""
    if native_ops.applies(gate_up):  # one call instead of three ops
        return native_ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
