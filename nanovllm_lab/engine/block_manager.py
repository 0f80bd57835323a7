"""Paged KV-cache blocks with prefix caching.

A full block is identified by a chained xxhash of its tokens and its predecessor's hash, so equal prefixes
map to equal blocks. A hash is registered only once the block's K/V has been computed (never for a block
still waiting for its chunk of prefill), and a hit is confirmed by comparing tokens, so a hash collision
cannot hand out wrong K/V. Freed blocks keep their hash (and stay findable) until they are reused.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm_lab.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


def chain_hash(token_ids: list[int], prefix: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix != -1:
        h.update(prefix.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Insertion order = least recently freed first, so cached blocks survive as long as possible.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.used_block_ids: set[int] = set()
        self.num_cache_hit_tokens = 0  # lifetime counter, for tests and stats

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its old content is about to be overwritten
        block.reset()
        self.used_block_ids.add(block_id)
        return block_id

    def _lookup(self, seq: Sequence, i: int, prefix: int) -> tuple[int, int]:
        """(block id or -1, hash) for full block i of seq if its K/V are cached."""
        tokens = seq.block(i)
        if len(tokens) < self.block_size:
            return -1, -1
        h = chain_hash(tokens, prefix)
        block_id = self.hash_to_block_id.get(h, -1)
        if block_id != -1 and self.blocks[block_id].token_ids != tokens:
            block_id = -1  # collision
        return block_id, h

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        prefix, hit = -1, True
        for i in range(seq.num_blocks):
            block_id, h = self._lookup(seq, i, prefix) if hit else (-1, -1)
            if block_id == -1:
                hit = False
                seq.block_table.append(self._take_free_block())
                continue
            block = self.blocks[block_id]
            if block_id in self.used_block_ids:
                block.ref_count += 1
            else:
                del self.free_block_ids[block_id]
                block.ref_count = 1
                self.used_block_ids.add(block_id)
            seq.block_table.append(block_id)
            seq.num_hashed_blocks = i + 1
            prefix = h
        hit_tokens = seq.num_hashed_blocks * self.block_size
        # At least the last token must be computed: its logits pick the next token.
        seq.num_cached_tokens = min(hit_tokens, seq.num_tokens - 1)
        self.num_cache_hit_tokens += seq.num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used_block_ids.discard(block_id)
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence) -> None:
        """Make room for the sequence's last token (decode)."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())

    def mark_computed(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed in the last step."""
        prefix = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else -1
        for i in range(seq.num_hashed_blocks, seq.num_cached_tokens // self.block_size):
            tokens = seq.block(i)
            h = chain_hash(tokens, prefix)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block_id[h] = block.block_id
            seq.num_hashed_blocks = i + 1
            prefix = h
