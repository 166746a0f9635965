"""Attention over a paged KV cache, for a batch that mixes prefills and decodes of any lengths.

The tokens of all scheduled sequences are packed one after another ([num_tokens, ...], no padding in
the linear layers). The KV cache of a layer is one pool of slots, [2, num_slots, num_kv_heads,
head_dim]; a sequence's keys live in the slots of its blocks (its block table). Each step, the
metadata below is built once and shared by every layer: it says where each new token's keys go
(`slot_mapping`) and how to gather each sequence's queries and keys into a padded [batch, len]
view for `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens]: the cache slot each new token's key/value is written to
    # [batch * max_query_len]: token index of each (sequence, query) pair; None when every sequence
    # feeds exactly one token (a pure decode step), where the tokens already are that layout.
    query_index: torch.Tensor | None
    key_slots: torch.Tensor  # [batch * max_seq_len]: cache slot of each (sequence, key) pair
    mask: torch.Tensor  # [batch, 1, max_query_len, max_seq_len]: True where a query may attend to a key
    output_index: torch.Tensor | None  # [tokens]: row of the [batch * max_query_len] output of each token
    batch: int
    max_query_len: int
    max_seq_len: int

    @classmethod
    def build(
        cls,
        *,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        max_query_len: int,
        max_seq_len: int,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        device = slot_mapping.device
        num_tokens = slot_mapping.shape[0]
        batch = seq_lens.shape[0]
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        q = torch.arange(max_query_len, device=device)
        k = torch.arange(max_seq_len, device=device)

        valid_query = q.unsqueeze(0) < query_lens.unsqueeze(1)
        query_index = (query_start_loc[:-1].unsqueeze(1) + q).masked_fill(~valid_query, 0)

        blocks = block_tables.gather(1, (k // block_size).unsqueeze(0).expand(batch, -1))
        key_slots = blocks * block_size + k % block_size
        key_slots = key_slots.masked_fill(k.unsqueeze(0) >= seq_lens.unsqueeze(1), 0)

        # A query at position p (within its sequence) sees keys 0..p: causal over cached and new tokens.
        query_positions = (seq_lens - query_lens).unsqueeze(1) + q
        mask = k.view(1, 1, -1) <= query_positions.unsqueeze(2)
        if sliding_window is not None:
            mask &= k.view(1, 1, -1) > query_positions.unsqueeze(2) - sliding_window
        # Padding queries attend to key 0 so no row is all -inf (their output is dropped anyway).
        mask[..., 0] |= ~valid_query

        mask = mask.unsqueeze(1)
        key_slots = key_slots.reshape(-1)
        if max_query_len == 1 and num_tokens == batch:
            return cls(slot_mapping, None, key_slots, mask, None, batch, max_query_len, max_seq_len)
        token_batch = torch.repeat_interleave(torch.arange(batch, device=device), query_lens, output_size=num_tokens)
        token_offset = torch.arange(num_tokens, device=device) - query_start_loc[token_batch]
        output_index = token_batch * max_query_len + token_offset
        return cls(slot_mapping, query_index.reshape(-1), key_slots, mask, output_index, batch, max_query_len, max_seq_len)


class Attention(nn.Module):
    """Writes this step's keys/values into the cache, then attends each query to its sequence's keys."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [tokens, num_heads, head_dim]
        k: torch.Tensor,  # [tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.index_copy_(0, metadata.slot_mapping, k)
        value_cache.index_copy_(0, metadata.slot_mapping, v)

        # index_select rather than advanced indexing: the same gather, several times faster on CPU.
        if metadata.query_index is not None:
            q = q.index_select(0, metadata.query_index)
        batch, q_len, k_len = metadata.batch, metadata.max_query_len, metadata.max_seq_len
        queries = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # [batch, heads, q_len, dim]
        keys = key_cache.index_select(0, metadata.key_slots).view(batch, k_len, self.num_kv_heads, self.head_dim)
        values = value_cache.index_select(0, metadata.key_slots).view(batch, k_len, self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            queries,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=metadata.mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
        return out if metadata.output_index is None else out.index_select(0, metadata.output_index)
