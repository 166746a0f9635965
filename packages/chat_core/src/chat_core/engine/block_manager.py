"""Hands out fixed-size blocks of the KV cache to sequences, and keeps full blocks for reuse (prefix caching).

With prefix caching, every full block is named by a hash of its tokens and of the hash of the block
before it, so equal hashes mean equal prefixes, and equal prefixes mean equal keys and values. A new
sequence takes the cached blocks of its longest cached prefix and computes only the rest. Blocks
are reference-counted and shared read-only: a sequence writes only into blocks past its cached
prefix, which are its own. A block whose last user is gone keeps its contents and its hash in an
evictable pool, least recently used first out, until its memory is needed for other tokens.

A block is registered under its hash when it is scheduled to be filled, so a sequence admitted in
the same step can already share it: the attention layers write a step's keys and values before any
query of that step reads them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from chat_core.engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens of admitted sequences looked up in the cache (one lookup per admission)
    hits: int = 0  # of those, the tokens found: their keys and values were not computed again
    evictions: int = 0  # cached blocks whose memory went to other tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block(parent: bytes | None, token_ids: SequenceOf[int]) -> bytes:
    """The name of a full block: its tokens and the name of the block before it (None for the first)."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot; got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> the block that holds those tokens
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # unused and unnamed; pop() gives low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unused but named, least recently used first

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses: never filled, or cached and evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks known by their hash, in use or evictable."""
        return len(self._cached)

    # Prefix lookups
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix, leaving at least its last token to compute
        (its logits are needed). Changes nothing but `seq.block_hashes`."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_full_blocks(seq, max_blocks)
        blocks = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # Allocation, in paired verbs
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Further blocks `seq` needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, cached_blocks: SequenceOf[int] = ()) -> bool:
        # A cached block nobody uses is counted as free: taking it leaves one fewer to hand out.
        revived = sum(1 for block in cached_blocks if self._ref_counts[block] == 0)
        return self.blocks_needed(seq, num_tokens) - len(cached_blocks) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: SequenceOf[int] = ()) -> None:
        """Give `seq` blocks for `num_tokens` tokens in all, starting from `cached_blocks` (from
        `find_cached_prefix`) when it has none yet; its full blocks up to `num_tokens` become cached."""
        if seq.block_table and cached_blocks:
            raise ValueError(f"sequence {seq.seq_id} already has blocks; cached blocks only start a block table")
        if not self.can_allocate(seq, num_tokens, cached_blocks):
            raise RuntimeError(
                f"KV cache exhausted: sequence {seq.seq_id} needs {self.blocks_needed(seq, num_tokens)} blocks, "
                f"{self.num_free_blocks} free"
            )
        if not seq.block_table:
            self._admit(seq, cached_blocks)
        seq.block_table.extend(self._take_free_block() for _ in range(self.blocks_needed(seq, num_tokens)))
        self._register_full_blocks(seq, num_tokens)

    def free(self, seq: Sequence) -> None:
        """Give back `seq`'s blocks; those still used by others stay, cached ones become evictable."""
        # Last blocks first into the pool, so they are evicted before the prefix they extend.
        for block in reversed(seq.block_table):
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} of sequence {seq.seq_id} was freed more often than taken")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._block_hashes[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def forget_uncomputed_blocks(self, seq: Sequence) -> None:
        """Uncache the blocks of `seq` past its computed tokens: named when scheduled, they were not (all)
        written, because the step that was to fill them failed."""
        first = seq.num_computed_tokens // self.block_size
        for block in seq.block_table[first : seq.num_registered_blocks]:
            block_hash = self._block_hashes[block]
            if block_hash is not None:
                del self._cached[block_hash]
                self._block_hashes[block] = None
        seq.num_registered_blocks = min(seq.num_registered_blocks, first)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use stay with their sequences)."""
        for block in self._evictable:
            self._free.append(block)
        self._evictable.clear()
        self._cached.clear()
        self._block_hashes = [None] * self.num_blocks

    # Internals
    def _admit(self, seq: Sequence, cached_blocks: SequenceOf[int]) -> None:
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.num_registered_blocks = len(cached_blocks)
        if self.enable_prefix_caching:
            self.stats.queries += seq.num_tokens
            self.stats.hits += len(cached_blocks) * self.block_size

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hashes[block]]
            self._block_hashes[block] = None
            self.stats.evictions += 1
        self._ref_counts[block] = 1
        return block

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        self._hash_full_blocks(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block_hash, block = seq.block_hashes[index], seq.block_table[index]
            # A block computed twice (two equal prompts admitted together) stays this sequence's own.
            if block_hash not in self._cached:
                self._cached[block_hash] = block
                self._block_hashes[block] = block_hash
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _hash_full_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_blocks` blocks (which must be full)."""
        size = self.block_size
        for index in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, seq.token_ids(index * size, size)))
