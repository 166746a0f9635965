"""int8 weight-only products on CUDA as one Triton kernel (also runs under Triton's CPU interpreter,
`TRITON_INTERPRET=1`, which is how the test suite checks it without a GPU).

y = (x @ q.T) * scale for x [M, K] (bfloat16 or float16), q [N, K] int8 and a scale per output row [N]: each
program multiplies a tile of rows of x by a tile of rows of q, widening q to x's dtype as it is loaded (exact:
|q| <= 127), summing in float32, and scales once at the end. The weight is read once per row tile of x, as int8:
at decode (M of 1 to a few dozen rows) that is the whole cost, half of what bfloat16 weights read.

Why not torch's own `_weight_int8pack_mm`: its CUDA version (where a build has one) computes each output with
one thread that walks K in float32, reading the weight uncoalesced; dequantizing per call instead writes and
reads a bfloat16 copy of every weight, 2.5x the bytes of the bfloat16 model.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_weight_matmul_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [N, K] int8
    scale_ptr,  # [N]
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_x_row,
    stride_q_row,
    stride_y_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,  # only under the interpreter: see `int8_weight_matmul`
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # int64 offsets: a wide weight (an LM head of 128k x 8k) passes 2^31 elements
        q = tl.load(q_ptr + cols[:, None].to(tl.int64) * stride_q_row + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        if DOT_IN_FLOAT32:
            acc += tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(q.to(tl.float32).to(x.dtype)))
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def int8_weight_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16/float16 @ (q [N, K] int8 * scale [N, 1]).T -> [M, N] in x's dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16) or q.dtype != torch.int8:
        raise ValueError(f"int8_weight_matmul takes bfloat16/float16 rows and int8 weights; got {x.dtype} and {q.dtype}")
    (rows, cols), (out_features, in_features) = x.shape, q.shape
    if cols != in_features or scale.shape != (out_features,):
        raise ValueError(f"int8_weight_matmul: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)} do not fit")
    x, q = x.contiguous(), q.contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    # Few rows (decode): small column tiles, so that even a 2048-wide layer spreads over enough programs to
    # keep every SM's loads in flight. Many rows (prefill): square tiles that reuse each weight tile more.
    block_m, block_n, block_k = (16, 32, 128) if rows <= 16 else (64, 64, 64)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _int8_weight_matmul_kernel[grid](
        x, q, scale, y, rows, out_features, in_features, x.stride(0), q.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        # Triton's CPU interpreter multiplies bfloat16 tiles wrongly (3.9: tl.dot of two bfloat16 tiles is off by
        # orders of magnitude, float32 ones are right), so there the tiles are widened first: the tests check the
        # tiling, masks, offsets and scales; the GPU multiplies in x's dtype, summing in float32 either way.
        DOT_IN_FLOAT32=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    return y
