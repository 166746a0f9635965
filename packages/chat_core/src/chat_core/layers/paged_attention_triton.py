"""Decode attention over the paged KV cache as one Triton kernel (CUDA; also runs under Triton's CPU
interpreter, `TRITON_INTERPRET=1`, which is how the test suite checks it without a GPU).

One program per (sequence, kv head) walks the sequence's block table, reads each block of keys and
values where it lies in the cache, and keeps a running (online) softmax for the query heads that
share the kv head. Nothing is gathered into a padded copy; the grid and every shape depend only on the
batch size and the table width, so a CUDA graph captured for a batch size replays for any lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [batch, heads, head_dim]
    k_cache_ptr,  # [num_slots, kv_heads, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [batch, max_blocks]
    seq_lens_ptr,  # [batch]
    out_ptr,  # [batch, heads, head_dim]
    scale,
    window,  # the new token sees the last `window` keys
    stride_q_seq,
    stride_q_head,
    stride_cache_slot,
    stride_cache_head,
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two, at least 16 (tl.dot's minimum)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (tf32 would cost accuracy), else unused
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )

    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    first_visible = tl.maximum(seq_len - window, 0)
    offsets = tl.arange(0, BLOCK_SIZE)
    for block_index in range(first_visible // BLOCK_SIZE, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_table_seq + block_index)
        positions = block_index * BLOCK_SIZE + offsets
        visible = (positions < seq_len) & (positions >= first_visible)
        slots = block * BLOCK_SIZE + offsets
        kv_offsets = slots[:, None] * stride_cache_slot + kv_head * stride_cache_head + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        # A cache of another dtype than the queries (`kv_cache_dtype`) is converted as read: both products
        # take operands of one dtype.
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        block_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - block_max)
        probs = tl.exp(scores - block_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
        running_max = block_max

    out = acc / running_sum[:, None]
    tl.store(
        out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & dim_ok[None, :],
    )


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [batch, heads, head_dim] (one new token per sequence); caches: [num_slots, kv_heads, head_dim],
    each sequence's keys in the blocks of its row of `block_tables`, `seq_lens` of them. -> [batch, heads, head_dim]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    if block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"the Triton decode kernel needs a power-of-two block_size >= 16; got {block_size}")
    # The kernel steps through heads and slots by strides but reads each head_dim row as contiguous, and the
    # value cache by the key cache's strides.
    if q.stride(2) != 1 or key_cache.stride(2) != 1 or value_cache.stride() != key_cache.stride() or block_tables.stride(1) != 1:
        raise ValueError(
            f"the Triton decode kernel needs contiguous head_dim rows, caches of one layout and block table rows; got strides "
            f"q {q.stride()}, key cache {key_cache.stride()}, value cache {value_cache.stride()}, block tables {block_tables.stride()}"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the caller views it [batch, heads * head_dim]
    _paged_decode_kernel[(batch, num_kv_heads)](
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        out,
        scale,
        sliding_window or (1 << 30),
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
