"""The decoder layer's native small ops (`chat_core.layers.native_ops`) against torch's arithmetic, over shapes
with and without whole vectors of 16 (the kernels' masked tails)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core.layers import native_ops
from chat_core.layers.norm import RMSNorm
from chat_core.layers.rotary import apply_rotary
from native_marks import needs_native_kernels

pytestmark = needs_native_kernels

PROPERTY = settings(max_examples=60, deadline=None)


def random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@PROPERTY
@given(st.integers(1, 9), st.integers(1, 200), st.booleans(), st.integers(0, 2**16))
def test_rms_norm(rows, dim, with_residual, seed):
    x, residual, weight = random(rows, dim, seed=seed), random(rows, dim, seed=seed + 1), random(dim, seed=seed + 2)
    if with_residual:
        out, total = native_ops.rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(total, x + residual)  # one float add each: exact
    else:
        out, total = native_ops.rms_norm(x, weight, 1e-6), x
    torch.testing.assert_close(out, F.rms_norm(total, (dim,), weight, 1e-6), rtol=2e-6, atol=1e-6)
    # The module takes the native path for float32 on this CPU: the same bits as the function.
    norm = RMSNorm(dim, 1e-6)
    norm.weight.data.copy_(weight)
    assert torch.equal(norm(x, residual)[0] if with_residual else norm(x), out)


@PROPERTY
@given(st.integers(1, 9), st.integers(1, 200), st.integers(0, 2**16))
def test_silu_mul(rows, width, seed):
    gate_up = random(rows, 2 * width, seed=seed, scale=6.0)  # well into both tails of the sigmoid
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native_ops.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


@PROPERTY
@given(st.integers(1, 7), st.integers(1, 6), st.integers(1, 70).map(lambda half: 2 * half), st.integers(0, 2), st.integers(0, 2**16))
def test_rope(tokens, heads, head_dim, extra_heads, seed):
    # A view of the first `heads` heads of wider rows, as the attention layer passes q and k out of qkv.
    qkv = random(tokens, (heads + extra_heads) * head_dim, seed=seed)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    angles = random(tokens, 1, head_dim // 2, seed=seed + 1, scale=3.0)
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1)
    expected = torch.addcmul(x * cos, x.roll(head_dim // 2, -1), signed_sin)  # the torch path of apply_rotary
    out = native_ops.rope(x, cos, signed_sin)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
    assert torch.equal(apply_rotary(x, cos, signed_sin), out)  # which apply_rotary calls for float32 here
