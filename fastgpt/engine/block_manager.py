"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching by chained hashes.

The cache holds num_blocks blocks of block_size token slots (in every layer's pages, see runner.py). A
sequence owns a block table, its blocks in position order: position p lives in slot
    block_table[p // block_size] * block_size + p % block_size.
Nothing here touches a tensor; this is the allocator the scheduler asks.

Prefix caching. Once all block_size tokens of a block have been computed, the block gets a hash chained
over the whole prefix, hash((hash of the previous block, its token ids)), so equal hashes mean equal
prefixes. A new sequence walks its full blocks and reuses each one whose hash is known, stopping at the
first miss; a hit also compares the token ids (and the parent hash), so a hash collision cannot hand it
another prefix's keys. The block holding a sequence's last token is never matched: that token's logits
are needed, so at least one token is always computed. Shared blocks are only read: a sequence writes at
positions past what it matched.

Freed blocks. A block whose count drops to 0 is free. If it has a hash it stays findable (a later
request with the same prefix takes it back without recomputing) until it is evicted: fresh blocks come
first from the free blocks without a hash, then from the cached ones, least recently freed first. Every
free block counts in ``num_free_blocks``, cached or not: any of them can be handed out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

ROOT_HASH = -1  # the parent hash of a sequence's first block


def block_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints is deterministic (no per-process salt), and 64 bits wide
    return hash((parent_hash, token_ids))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed (prefix caching on)
    parent_hash: int = ROOT_HASH
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------------------------------- lookup
    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of token_ids, in order; the block of the last token
        is never among them. Changes nothing (``take`` claims them)."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent = self.block_size, [], ROOT_HASH
        for i in range((len(token_ids) - 1) // bs):  # full blocks that end before the last token
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent_hash != parent:
                break  # a hash collision: not this prefix
            hits.append(block_id)
            parent = h
        return hits

    def can_take(self, hits: list[int], num_fresh: int) -> bool:
        """Whether ``take(hits, num_fresh)`` would succeed: hits that sit free use up free blocks too."""
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return reclaimed + num_fresh <= self.num_free_blocks

    # ------------------------------------------------------------------------------------- allocation
    def take(self, hits: list[int], num_fresh: int) -> list[int]:
        """Claim the matched blocks (one more reference each) and num_fresh new ones: hits + fresh ids."""
        if not self.can_take(hits, num_fresh):
            raise RuntimeError(f"out of KV-cache blocks: {num_fresh} fresh needed, {self.num_free_blocks} free")
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free_cached[b]
            block.ref_count += 1
        return hits + [self._fresh() for _ in range(num_fresh)]

    def _fresh(self) -> int:
        if self.free_uncached:
            block = self.blocks[self.free_uncached.popleft()]
        else:  # evict the least recently freed cached block
            block = self.blocks[self.free_cached.popitem(last=False)[0]]
            del self.cached[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, ROOT_HASH, ()
        block.ref_count = 1
        return block.block_id

    def share(self, block_ids: list[int]) -> list[int]:
        """One more reference to blocks already in use (a forked sample reading its parent's prompt)."""
        for b in block_ids:
            if self.blocks[b].ref_count < 1:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self.blocks[b].ref_count += 1
        return list(block_ids)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. The tail goes first, so under memory pressure a sequence's
        last blocks are evicted before its first ones (the prefix others are likeliest to share)."""
        for b in reversed(block_ids):
            block = self.blocks[b]
            if block.ref_count < 1:
                raise RuntimeError(f"block {b} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.free_cached[b] = None
                else:
                    self.free_uncached.append(b)

    # --------------------------------------------------------------------------------- prefix caching
    def cache_full_blocks(self, block_ids: list[int], token_ids: list[int], first: int, end: int,
                          parent_hash: int) -> int:
        """Give blocks first..end-1 of a table (full and computed) their chained hashes; returns the hash
        of block end-1, the parent of the next. A block whose prefix another block already holds stays
        unhashed (it is freed as a plain block); the chain goes on through the hash all the same."""
        if not self.enable_prefix_caching:
            return parent_hash
        bs = self.block_size
        for i in range(first, end):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent_hash, tokens)
            block = self.blocks[block_ids[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.parent_hash, block.token_ids = h, parent_hash, tokens
                self.cached[h] = block.block_id
            parent_hash = h
        return parent_hash
