"""The paged cache's allocator: reference counts, the chained prefix hash, LRU eviction of freed blocks."""

import pytest

from fastgpt.engine import block_manager as bm_module
from fastgpt.engine.block_manager import ROOT_HASH, BlockManager

BS = 4


def cached_sequence(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Blocks for tokens, all computed and offered to the prefix cache (as the engine does after a step)."""
    table = bm.take([], bm.blocks_for(len(tokens)))
    bm.cache_full_blocks(table, tokens, 0, len(tokens) // bm.block_size, ROOT_HASH)
    return table


def test_reference_counts_and_sharing():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = bm.take([], 3)
    assert len(set(a)) == 3 and bm.num_free_blocks == 3
    assert all(bm.blocks[b].ref_count == 1 for b in a)
    shared = bm.share(a[:2])
    assert [bm.blocks[b].ref_count for b in a] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[b].ref_count for b in a] == [1, 1, 0] and bm.num_free_blocks == 4
    bm.free(shared)
    assert bm.num_free_blocks == 6
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free([a[0]])
    with pytest.raises(RuntimeError, match="cannot be shared"):
        bm.share([a[0]])
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.take([], 7)


def test_prefix_hit_reuses_blocks_and_never_the_last_one():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(10, 22))  # 12 tokens: three full blocks
    table = cached_sequence(bm, tokens)
    # the same 12 tokens again: the third block holds the last token, so only two blocks match
    assert bm.match_prefix(tokens) == table[:2]
    # one more token: now all three full blocks end before the last token
    assert bm.match_prefix(tokens + [5]) == table
    # a prompt that diverges inside block 2 matches block 1 only
    assert bm.match_prefix(tokens[:5] + [99] + tokens[6:] + [5]) == table[:1]
    # a hit takes a reference; shared blocks of a live sequence are not free blocks
    hits = bm.match_prefix(tokens + [5])
    assert bm.can_take(hits, 1)
    got = bm.take(hits, 1)
    assert got[:3] == table and [bm.blocks[b].ref_count for b in table] == [2, 2, 2]


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cached_sequence(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    # the same second block behind another first block is another prefix: no match at all
    assert bm.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0]) == []
    # the first block alone still matches
    assert len(bm.match_prefix([1, 2, 3, 4, 0, 0, 0, 0, 0])) == 1


def test_a_hash_collision_is_caught_by_comparing_token_ids(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=4, block_size=BS)
    cached_sequence(bm, [1, 2, 3, 4, 0])
    assert len(bm.match_prefix([1, 2, 3, 4, 0])) == 1
    assert bm.match_prefix([4, 3, 2, 1, 0]) == []


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = cached_sequence(bm, [1, 1, 1, 1])
    b = cached_sequence(bm, [2, 2, 2, 2])
    c = bm.take([], 1)  # never hashed
    bm.free(a)
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 3  # cached-but-free blocks count as free
    # still findable after being freed
    assert bm.match_prefix([1, 1, 1, 1, 0]) == a and bm.match_prefix([2, 2, 2, 2, 0]) == b
    # fresh blocks come from the unhashed ones first: the cache survives
    fresh = bm.take([], 2)
    assert c[0] in fresh
    assert set(fresh) - set(c) == set(a)  # then the least recently freed cached block (a) is evicted
    assert bm.match_prefix([1, 1, 1, 1, 0]) == []
    assert bm.match_prefix([2, 2, 2, 2, 0]) == b
    # a hit on a free cached block takes it back out of the free pool
    assert bm.can_take(b, 0) and not bm.can_take(b, 1)
    bm.take(b, 0)
    assert bm.num_free_blocks == 0 and bm.blocks[b[0]].ref_count == 1


def test_prefix_caching_off_matches_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    cached_sequence(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [] and not bm.cached
