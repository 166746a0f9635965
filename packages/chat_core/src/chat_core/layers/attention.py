"""Attention over a paged KV cache, for a batch that mixes prefills and decodes of any lengths.

The tokens of all scheduled sequences are packed one after another ([num_tokens, ...], no padding in
the linear layers). The KV cache of a layer is one pool of slots, [2, num_slots, num_kv_heads,
head_dim]; a sequence's keys live in the slots of its blocks (its block table). Each step the runner
builds one `AttentionMetadata` (shared by every layer), whose kind is the implementation that suits
the step and the device:

- `PaddedAttentionMetadata` (any step, any device; the reference): gathers each sequence's queries
  and keys into a padded [batch, len] view for `scaled_dot_product_attention`. Prefill and mixed steps.
- `BlockwiseDecodeMetadata` (decode steps on CPU): reads only the blocks each sequence uses, so work
  and memory traffic grow with the tokens actually cached, not with batch x longest sequence. Where the
  lengths are close (padding would add at most 2/3 to the keys read), the padded view's fused
  attention is faster on CPU (measured: 1.4-1.5x at batch 8 of equal lengths, 0.9x at lengths spread
  from 64 to 512), so a decode step is padded then: its traffic stays within 5/3 of the tokens cached.
- `SplitAttentionMetadata` (prefill and mixed steps where padding would compute far more scores than needed:
  a long prompt chunk beside many decodes): the decodes attended by the decode kernel, the prefills padded
  together or one by one (`attention_groups` decides, on the host).
- `BatchInvariantAttentionMetadata` (every step, CPU, when the engine's `batch_invariant` is set): the
  padded layout with arithmetic that gives each token the same bits whatever else the step holds.
- `TritonDecodeMetadata` (decode steps on CUDA, `paged_attention_triton`): a kernel that walks each
  sequence's block table in place; its shapes are fixed per batch size, so CUDA graphs can replay it.
- `NativeDecodeMetadata` (decode steps on CPU with float32 queries and a float32 or bfloat16 cache, where
  the native kernels are built):
  one call (`native_ops.decode_attention`) writes the new keys and values and walks each sequence's block
  table in place, with a running softmax: no gather, no padding, no per-layer index tensors.

Under `torch.compile` (the compiled CPU decode step, `worker/compiled_decode.py`) the cache write and the
attention are one opaque op, `chat_core::cached_attention`: the compiler fuses the small ops around it
and leaves the gathers, whose shapes change every step, to the eager code above.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from chat_core.layers import native_kernels, native_ops


@dataclass(frozen=True)
class AttentionMetadata(ABC):
    slot_mapping: torch.Tensor  # [tokens]: the cache slot each new token's key/value is written to

    kind: ClassVar[str]  # its name in `chat_core::cached_attention`

    def op_tensors(self) -> list[torch.Tensor]:
        """Its tensors besides `slot_mapping`, from which `from_op_tensors` rebuilds it (every size it
        needs is a tensor's shape, so a compiled graph passes it on without specialising on lengths)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run inside a compiled graph")

    @classmethod
    def from_op_tensors(cls, slot_mapping: torch.Tensor, tensors: list[torch.Tensor]) -> AttentionMetadata:
        raise NotImplementedError(f"{cls.__name__} cannot run inside a compiled graph")

    @staticmethod
    def of_kind(kind: str, slot_mapping: torch.Tensor, tensors: list[torch.Tensor]) -> AttentionMetadata:
        """The metadata `kind` rebuilt from `slot_mapping` and its `op_tensors()`."""
        return _METADATA_KINDS[kind].from_op_tensors(slot_mapping, tensors)

    @abstractmethod
    def attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; caches: [num_slots, kv_heads, head_dim] -> [tokens, heads * head_dim]."""

    def write_and_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Writes the step's keys and values k, v [tokens, kv_heads, head_dim] to their slots of kv_cache
        [2, num_slots, kv_heads, head_dim], then `attend`s."""
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        # Rounded to the cache's dtype (`kv_cache_dtype`) as written, to nearest even like the native kernel.
        key_cache.index_copy_(0, self.slot_mapping, k.to(key_cache.dtype))
        value_cache.index_copy_(0, self.slot_mapping, v.to(value_cache.dtype))
        return self.attend(q, key_cache, value_cache, scale)

    @staticmethod
    def build(
        *,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        max_query_len: int,
        max_seq_len: int,
        sliding_window: int | None = None,
        pad_slot: int = 0,
        decode_kernel: str | None = None,
        batch_invariant: bool = False,
        cache_dtype: torch.dtype | None = None,
        query_dtype: torch.dtype = torch.float32,
        host_query_lens: Sequence[int] | None = None,
        host_seq_lens: Sequence[int] | None = None,
    ) -> AttentionMetadata:
        """The metadata of one step. A pure decode step (one new token per sequence) uses `decode_kernel`
        ("native", "blockwise", "triton" or "padded"; None picks by device, the cache's and queries' dtypes and
        lengths);
        anything else the padded reference, split into parts where padding would waste too much
        (`attention_groups`; only when the step's lengths are given on the host, `host_query_lens`/`host_seq_lens`).
        `batch_invariant`: every step, of any kind, batch-invariant attention.
        `pad_slot`: a cache slot holding finite numbers, read where a padded view needs a key."""
        if batch_invariant:
            padded_len, block_tables = BatchInvariantAttentionMetadata.pad_keys(max_seq_len, block_tables, block_size)
            return BatchInvariantAttentionMetadata.from_tables(
                query_start_loc, seq_lens, block_tables, slot_mapping, block_size, max_query_len, padded_len, sliding_window, pad_slot
            )
        num_tokens, batch = slot_mapping.shape[0], seq_lens.shape[0]
        if max_query_len == 1 and num_tokens == batch:
            kernel = decode_kernel or _default_decode_kernel(seq_lens, max_seq_len, block_size, cache_dtype, query_dtype)
            if kernel == "native":
                return NativeDecodeMetadata(slot_mapping, seq_lens, block_tables, block_size, sliding_window)
            if kernel == "triton":
                return TritonDecodeMetadata(slot_mapping, seq_lens, block_tables, block_size, sliding_window)
            if kernel == "blockwise":
                return BlockwiseDecodeMetadata.from_tables(slot_mapping, seq_lens, block_tables, block_size, sliding_window)
        groups = attention_groups(host_query_lens, host_seq_lens) if host_query_lens is not None and host_seq_lens is not None else None
        if groups is not None:
            assert host_query_lens is not None and host_seq_lens is not None
            parts = []
            token_starts = list(itertools.accumulate(host_query_lens, initial=0))
            for rows in groups:
                # Index tensors from host lists: a prefill step may copy a few small arrays (a decode step never splits).
                row_index = torch.tensor(rows, dtype=torch.int64, device=slot_mapping.device)
                token_index = torch.cat([torch.arange(token_starts[r], token_starts[r + 1]) for r in rows]).to(slot_mapping.device)
                query_lens = [host_query_lens[r] for r in rows]
                part = AttentionMetadata.build(
                    query_start_loc=torch.tensor(list(itertools.accumulate(query_lens, initial=0)), device=slot_mapping.device),
                    seq_lens=seq_lens.index_select(0, row_index),
                    block_tables=block_tables.index_select(0, row_index),
                    slot_mapping=slot_mapping.index_select(0, token_index),
                    block_size=block_size,
                    max_query_len=max(query_lens),
                    max_seq_len=max(host_seq_lens[r] for r in rows),
                    sliding_window=sliding_window,
                    pad_slot=pad_slot,
                    decode_kernel=decode_kernel,
                    cache_dtype=cache_dtype,
                    query_dtype=query_dtype,
                )
                parts.append((token_index, part))
            return SplitAttentionMetadata(slot_mapping, tuple(parts))
        return PaddedAttentionMetadata.from_tables(
            query_start_loc, seq_lens, block_tables, slot_mapping, block_size, max_query_len, max_seq_len, sliding_window, pad_slot
        )


# A step with a prefill is one padded call unless padding every sequence to the longest query and the longest
# history would compute over this many times the scores the step needs.
MAX_PADDED_SCORES_PER_SCORE = 4


def attention_groups(query_lens: Sequence[int], seq_lens: Sequence[int]) -> list[list[int]] | None:
    """How a step with a prefill splits its sequences (rows) for attention: None to pad them all together
    (cheap enough: at most `MAX_PADDED_SCORES_PER_SCORE` times the scores needed), else lists of rows, each
    attended by one call: the decodes (one new token each) together, then the prefills together, or each
    alone where padding them together is past the limit too.

    Padded, a 2000-token prompt chunk beside 63 decodes of 8000-token histories would compute (and on CUDA's math
    kernel hold) 64 x 2000 x 8000 scores per head, 60x the 2000 x 8000 + 63 x 8000 it needs."""

    def padding_wastes(rows: list[int]) -> bool:
        padded = len(rows) * max(query_lens[r] for r in rows) * max(seq_lens[r] for r in rows)
        return padded > MAX_PADDED_SCORES_PER_SCORE * sum(query_lens[r] * seq_lens[r] for r in rows)

    rows = list(range(len(query_lens)))
    if not rows or max(query_lens) == 1 or not padding_wastes(rows):
        return None
    decodes = [r for r in rows if query_lens[r] == 1]
    prefills = [r for r in rows if query_lens[r] > 1]
    groups = [decodes] if decodes else []
    return groups + ([[r] for r in prefills] if padding_wastes(prefills) else [prefills])


# A CPU decode step is padded when the keys it would read padded are at most this many times those cached.
MAX_PADDED_KEYS_PER_CACHED_KEY = 5 / 3


def cpu_decode_kernels(cache_dtype: torch.dtype | None, query_dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The kinds a CPU decode step takes by default with a cache and queries of these dtypes: the native kernel
    takes float32 queries and a float32 or bfloat16 cache."""
    native = query_dtype == torch.float32 and cache_dtype in (torch.float32, torch.bfloat16) and native_kernels.available()
    return ("native",) if native else ("padded", "blockwise")


def _default_decode_kernel(
    seq_lens: torch.Tensor, max_seq_len: int, block_size: int, cache_dtype: torch.dtype | None, query_dtype: torch.dtype
) -> str:
    if seq_lens.device.type == "cuda":
        return "triton" if triton_supports(block_size) else "blockwise"
    if cpu_decode_kernels(cache_dtype, query_dtype) == ("native",):
        return "native"
    padded_keys = seq_lens.shape[0] * max_seq_len  # seq_lens is on the host here: no device sync
    return "padded" if padded_keys <= MAX_PADDED_KEYS_PER_CACHED_KEY * int(seq_lens.sum()) else "blockwise"


@dataclass(frozen=True)
class PaddedAttentionMetadata(AttentionMetadata):
    # [batch * max_query_len]: token index of each (sequence, query) pair; None when every sequence
    # feeds exactly one token (a pure decode step), where the tokens already are that layout.
    query_index: torch.Tensor | None
    key_slots: torch.Tensor  # [batch * max_seq_len]: cache slot of each (sequence, key) pair
    mask: torch.Tensor  # [batch, 1, max_query_len, max_seq_len]: True where a query may attend to a key
    output_index: torch.Tensor | None  # [tokens]: row of the [batch * max_query_len] output of each token
    batch: int
    max_query_len: int
    max_seq_len: int

    kind: ClassVar[str] = "padded"

    def op_tensors(self) -> list[torch.Tensor]:
        if self.query_index is None or self.output_index is None:
            return [self.key_slots, self.mask]
        return [self.key_slots, self.mask, self.query_index, self.output_index]

    @classmethod
    def from_op_tensors(cls, slot_mapping, tensors):
        key_slots, mask, *indices = tensors
        query_index, output_index = indices if indices else (None, None)
        batch, _, max_query_len, max_seq_len = mask.shape
        return cls(slot_mapping, query_index, key_slots, mask, output_index, batch, max_query_len, max_seq_len)

    @classmethod
    def from_tables(
        cls,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        max_query_len: int,
        max_seq_len: int,
        sliding_window: int | None,
        pad_slot: int,
    ) -> PaddedAttentionMetadata:
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
        key_slots = key_slots.masked_fill(k.unsqueeze(0) >= seq_lens.unsqueeze(1), pad_slot)

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

    def attend(self, q, key_cache, value_cache, scale):
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = key_cache.shape[1]
        # index_select rather than advanced indexing: the same gather, several times faster on CPU.
        if self.query_index is not None:
            q = q.index_select(0, self.query_index)
        batch, q_len, k_len = self.batch, self.max_query_len, self.max_seq_len
        queries = q.view(batch, q_len, num_heads, head_dim).transpose(1, 2)  # [batch, heads, q_len, dim]
        keys = key_cache.index_select(0, self.key_slots).view(batch, k_len, num_kv_heads, head_dim).to(q.dtype)
        values = value_cache.index_select(0, self.key_slots).view(batch, k_len, num_kv_heads, head_dim).to(q.dtype)
        grouped = num_heads != num_kv_heads
        if grouped and q.is_cuda:
            # CUDA's fused kernels that take a mask take no grouped heads: with enable_gqa the call would fall to
            # the math kernel, which holds every score. Keys and values repeated per query head instead.
            keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=2)
            values = values.repeat_interleave(num_heads // num_kv_heads, dim=2)
            grouped = False
        out = F.scaled_dot_product_attention(
            queries,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=self.mask,
            scale=scale,
            enable_gqa=grouped,
        )
        out = out.transpose(1, 2).reshape(-1, num_heads * head_dim)
        return out if self.output_index is None else out.index_select(0, self.output_index)


# Batch-invariant attention multiplies probabilities by values this many keys at a time (see below).
INVARIANT_KEY_CHUNK = 64


@dataclass(frozen=True)
class BatchInvariantAttentionMetadata(PaddedAttentionMetadata):
    """The padded layout, computed so that a token's output has the same bits whatever else is in the step:
    the batch's size and other sequences' lengths, whether the token is decoded or prefilled, in which chunk.

    Padded attention is not: `scaled_dot_product_attention` and a plain padded softmax-times-values sum over
    the batch's padded length, in an order that depends on it. Here every reduction is one whose order does
    not depend on what surrounds a token (each checked by tests/test_batch_invariance.py, bit for bit):
    - scores: a matrix product per kv head over head_dim, with at least two query rows (one row takes a
      matrix-vector kernel that sums in another order) and the keys row-major [head_dim, keys]: the BLAS then
      gives each row the same bits for any count of rows and of keys;
    - softmax over the padded row: its vector kernel adds the masked keys' exact zeros lane by lane, so the
      padding's length changes nothing (rows are padded to at least one vector, 64 keys);
    - probabilities x values: products over fixed chunks of `INVARIANT_KEY_CHUNK` keys (a longer reduction is
      split by the BLAS at points that depend on its length), added chunk after chunk in key order; the
      padding's chunks add exact zeros.
    Costs more than the default kinds (measured in the README); the linear layers must be row-invariant too,
    which the engine's `batch_invariant` option sees to (`QuantizationPlan`).
    """

    kind: ClassVar[str] = "batch_invariant"

    @staticmethod
    def pad_keys(max_seq_len: int, block_tables: torch.Tensor, block_size: int) -> tuple[int, torch.Tensor]:
        """The padded key length `from_tables` must be given (whole chunks), and block tables that cover it
        (keys past every sequence's end are read from `pad_slot` and masked)."""
        padded_len = -(-max(max_seq_len, 1) // INVARIANT_KEY_CHUNK) * INVARIANT_KEY_CHUNK
        missing_blocks = -(-padded_len // block_size) - block_tables.shape[1]
        if missing_blocks > 0:
            block_tables = F.pad(block_tables, (0, missing_blocks))
        return padded_len, block_tables

    def attend(self, q, key_cache, value_cache, scale):
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = key_cache.shape[1]
        group = num_heads // num_kv_heads
        if self.query_index is not None:
            q = q.index_select(0, self.query_index)
        batch, q_len, k_len = self.batch, self.max_query_len, self.max_seq_len
        copies = 2 if q_len * group == 1 else 1  # a lone query row is multiplied twice, as two rows
        queries = q.float().view(batch, q_len, num_kv_heads, group, 1, head_dim).expand(-1, -1, -1, -1, copies, -1)
        queries = queries.permute(0, 2, 1, 3, 4, 5).reshape(batch, num_kv_heads, q_len * group * copies, head_dim)
        keys = key_cache.index_select(0, self.key_slots).float().view(batch, k_len, num_kv_heads, head_dim)
        values = value_cache.index_select(0, self.key_slots).float().view(batch, k_len, num_kv_heads, head_dim)

        # Keys laid out [head_dim, keys] row-major: with them transposed, two query rows sum in another order than more.
        scores = torch.matmul(queries, keys.permute(0, 2, 3, 1).contiguous()).mul_(scale)  # [batch, kv, rows, k_len]
        hidden = ~self.mask.view(batch, 1, q_len, 1, k_len)
        scores = scores.view(batch, num_kv_heads, q_len, group * copies, k_len).masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)

        rows, chunks = q_len * group * copies, k_len // INVARIANT_KEY_CHUNK
        probs = probs.view(batch, num_kv_heads, rows, chunks, INVARIANT_KEY_CHUNK).transpose(2, 3)
        values = values.view(batch, chunks, INVARIANT_KEY_CHUNK, num_kv_heads, head_dim).permute(0, 3, 1, 2, 4)
        partial = torch.matmul(probs, values)  # [batch, kv, chunks, rows, head_dim]
        out = partial[:, :, 0]
        for chunk in range(1, chunks):
            out = out + partial[:, :, chunk]
        out = out.view(batch, num_kv_heads, q_len, group, copies, head_dim)[:, :, :, :, 0]
        out = out.permute(0, 2, 1, 3, 4).reshape(batch * q_len, num_heads * head_dim).to(q.dtype)
        return out if self.output_index is None else out.index_select(0, self.output_index)


@dataclass(frozen=True)
class BlockwiseDecodeMetadata(AttentionMetadata):
    """One new token per sequence; keys read block by block, only the blocks each sequence uses.

    The used blocks of all sequences are listed one after another (`blocks`, with the sequence each
    belongs to in `block_seq`); a softmax per sequence runs over its blocks' scores.
    """

    blocks: torch.Tensor  # [used blocks]: cache block ids, sequence by sequence
    block_seq: torch.Tensor  # [used blocks]: the sequence of each
    hidden: torch.Tensor  # [used blocks, block_size]: True for a key the new token does not see
    batch: int
    block_size: int

    kind: ClassVar[str] = "blockwise"

    def op_tensors(self) -> list[torch.Tensor]:
        return [self.blocks, self.block_seq, self.hidden]

    @classmethod
    def from_op_tensors(cls, slot_mapping, tensors):
        blocks, block_seq, hidden = tensors
        return cls(slot_mapping, blocks, block_seq, hidden, slot_mapping.shape[0], hidden.shape[1])

    @classmethod
    def from_tables(
        cls, slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int, sliding_window: int | None
    ) -> BlockwiseDecodeMetadata:
        device = seq_lens.device
        batch, max_blocks = block_tables.shape
        blocks_per_seq = (seq_lens + block_size - 1) // block_size
        used = torch.arange(max_blocks, device=device).unsqueeze(0) < blocks_per_seq.unsqueeze(1)
        blocks = block_tables[used]  # row by row: each sequence's blocks in order
        block_seq = torch.arange(batch, device=device).repeat_interleave(blocks_per_seq)
        block_start = (torch.arange(max_blocks, device=device).unsqueeze(0).expand(batch, -1)[used] * block_size).unsqueeze(1)
        positions = block_start + torch.arange(block_size, device=device)  # [used blocks, block_size]
        seq_len = seq_lens.index_select(0, block_seq).unsqueeze(1)
        visible = positions < seq_len
        if sliding_window is not None:  # the new token, at seq_len - 1, sees the last `sliding_window` keys
            visible &= positions >= seq_len - sliding_window
        return cls(slot_mapping, blocks, block_seq, ~visible, batch, block_size)

    def attend(self, q, key_cache, value_cache, scale):
        batch, num_heads, head_dim = q.shape
        num_kv_heads = key_cache.shape[1]
        group = num_heads // num_kv_heads
        keys = key_cache.view(-1, self.block_size, num_kv_heads, head_dim).index_select(0, self.blocks)
        values = value_cache.view(-1, self.block_size, num_kv_heads, head_dim).index_select(0, self.blocks)
        # Slots past a sequence's end may never have been written (any bits, NaN included): mask, don't add.
        values = values.float().masked_fill_(self.hidden.view(*self.hidden.shape, 1, 1), 0.0)
        keys, values = keys.float().permute(0, 2, 3, 1), values.transpose(1, 2)  # [n, kv, dim, bs], [n, kv, bs, dim]
        queries = q.float().view(batch, num_kv_heads, group, head_dim)
        if batch == 1:  # one softmax over every block: no per-sequence reductions needed
            scores = torch.matmul(queries, keys.permute(1, 2, 0, 3).reshape(num_kv_heads, head_dim, -1)) * scale
            probs = scores.masked_fill_(self.hidden.view(1, 1, -1), float("-inf")).softmax(dim=-1)
            out = torch.matmul(probs, values.transpose(0, 1).reshape(num_kv_heads, -1, head_dim))
            return out.reshape(1, num_heads * head_dim).to(q.dtype)
        scores = torch.matmul(queries.index_select(0, self.block_seq), keys) * scale
        scores = scores.masked_fill_(self.hidden.view(-1, 1, 1, self.block_size), float("-inf"))
        block_max = scores.amax(dim=-1)  # [n, kv, group]
        seq_max = torch.full((batch, num_kv_heads, group), float("-inf"), device=q.device)
        seq_max = seq_max.scatter_reduce_(0, self.block_seq.view(-1, 1, 1).expand_as(block_max), block_max, "amax")
        probs = torch.exp(scores - seq_max.index_select(0, self.block_seq).unsqueeze(-1))
        denominator = torch.zeros_like(seq_max).index_add_(0, self.block_seq, probs.sum(dim=-1))
        out = torch.zeros(batch, num_kv_heads, group, head_dim, device=q.device)
        out.index_add_(0, self.block_seq, torch.matmul(probs, values))
        return (out / denominator.unsqueeze(-1)).reshape(batch, num_heads * head_dim).to(q.dtype)


@dataclass(frozen=True)
class SplitAttentionMetadata(AttentionMetadata):
    """A step attended in parts (`attention_groups`): each part's tokens (`token_index`, into the step's) by a
    metadata of its own over its sequences, the outputs put back in token order. Every key and value of the
    step is written first, so a part reads its sequences' whole histories."""

    parts: tuple[tuple[torch.Tensor, AttentionMetadata], ...]

    kind: ClassVar[str] = "split"

    def attend(self, q, key_cache, value_cache, scale):
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for token_index, part in self.parts:
            out.index_copy_(0, token_index, part.attend(q.index_select(0, token_index), key_cache, value_cache, scale).to(q.dtype))
        return out


def triton_supports(block_size: int) -> bool:
    """The Triton kernel reads whole blocks as tiles: a power of two of at least 16 slots."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


@dataclass(frozen=True)
class TritonDecodeMetadata(AttentionMetadata):
    """One new token per sequence, attended by a Triton kernel that reads the block table in place."""

    seq_lens: torch.Tensor  # [batch] int
    block_tables: torch.Tensor  # [batch, max blocks] int
    block_size: int
    sliding_window: int | None

    kind: ClassVar[str] = "triton"

    def attend(self, q, key_cache, value_cache, scale):
        from chat_core.layers.paged_attention_triton import paged_decode_attention

        out = paged_decode_attention(q, key_cache, value_cache, self.block_tables, self.seq_lens, self.block_size, scale, self.sliding_window)
        return out.view(q.shape[0], -1)


@dataclass(frozen=True)
class NativeDecodeMetadata(AttentionMetadata):
    """One new token per sequence, float32 queries and a float32 or bfloat16 cache on CPU: the native kernel
    writes the new keys and values and reads each sequence's keys through its block table in place
    (`native_ops.decode_attention`)."""

    seq_lens: torch.Tensor  # [batch] int64
    block_tables: torch.Tensor  # [batch, max blocks] int64
    block_size: int
    sliding_window: int | None
    # (block_size, sliding_window or 0) as a tensor: how a compiled graph passes them (rebuilt metadata holds
    # only this; its integers are read when the op runs, never while tracing)
    sizes: torch.Tensor | None = None

    kind: ClassVar[str] = "native"

    def op_tensors(self) -> list[torch.Tensor]:
        sizes = self.sizes if self.sizes is not None else torch.tensor([self.block_size, self.sliding_window or 0])
        return [self.seq_lens, self.block_tables, sizes]

    @classmethod
    def from_op_tensors(cls, slot_mapping, tensors):
        seq_lens, block_tables, sizes = tensors
        return cls(slot_mapping, seq_lens, block_tables, 0, None, sizes)

    def attend(self, q, key_cache, value_cache, scale):
        return self._call(q, None, None, key_cache, value_cache, scale)

    def write_and_attend(self, q, k, v, kv_cache, scale):
        return self._call(q, k, v, kv_cache[0], kv_cache[1], scale)

    def _call(self, q, k, v, key_cache, value_cache, scale):  # type: ignore[no-untyped-def]
        block_size, window = self.sizes.tolist() if self.sizes is not None else (self.block_size, self.sliding_window)
        tables, lens = self.block_tables, self.seq_lens
        return native_ops.decode_attention(q, k, v, key_cache, value_cache, self.slot_mapping, tables, lens, block_size, window or None, scale)


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
        if torch.compiler.is_compiling():
            tensors = metadata.op_tensors()
            return torch.ops.chat_core.cached_attention(q, k, v, kv_cache, metadata.slot_mapping, metadata.kind, tensors, self.scale)
        return metadata.write_and_attend(q, k, v, kv_cache, self.scale)


_METADATA_KINDS: dict[str, type[AttentionMetadata]] = {
    kind.kind: kind
    for kind in (PaddedAttentionMetadata, BatchInvariantAttentionMetadata, BlockwiseDecodeMetadata, TritonDecodeMetadata, NativeDecodeMetadata)
}


# `chat_core::cached_attention`: `AttentionMetadata.write_and_attend` as one op that a compiled graph calls
# without looking inside. Registered through `torch.library.Library` (a few microseconds per call) rather than
# `torch.library.custom_op` (about 20): it is called once per layer per step.
_LIBRARY = torch.library.Library("chat_core", "FRAGMENT")
_LIBRARY.define(
    "cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, str kind, Tensor[] tensors, "
    "float scale) -> Tensor"
)


def _cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kind: str,
    tensors: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    return AttentionMetadata.of_kind(kind, slot_mapping, tensors).write_and_attend(q, k, v, kv_cache, scale)


_LIBRARY.impl("cached_attention", _cached_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("chat_core::cached_attention")
def _(q, k, v, kv_cache, slot_mapping, kind, tensors, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
