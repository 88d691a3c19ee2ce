"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (max_num_batched_tokens) and a sequence budget (max_num_seqs). A
sequence's tokens are computed in order: the next step takes up to the budget's worth of its uncomputed
ones. A decode is the one-token case; a long prompt is prefilled in chunks over several steps (chunked
prefill), and decodes of other sequences run in the same steps beside it.

    1. Running sequences first, oldest first, each taking min(uncomputed, budget left) tokens. When one
       needs a block and none is free, the newest running sequence is preempted: its blocks are freed
       and it goes to the front of the waiting queue, to be recomputed from its tokens later (the prefix
       cache often still holds its blocks). If the newest is the one asking, it preempts itself.
    2. Then, unless something was preempted this step, waiting sequences in order, while the budgets and
       the free blocks allow: each takes its cached prefix from the block manager (no compute for those
       tokens) and blocks for the chunk it computes now; later chunks take blocks as they go.

The scheduled sequences come back with the one-token rows first (decodes), then the longer chunks, so
the model can send the leading rows through decode attention (see GPT.forward_packed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastgpt.engine.block_manager import BlockManager
from fastgpt.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # one-token rows first
    num_new_tokens: list[int]  # tokens each computes this step, from its num_computed on
    num_decodes: int  # the leading rows computing a single token

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            need = bm.blocks_for(seq.num_computed + n) - len(seq.block_table)
            while need > bm.num_free_blocks and self.running[-1] is not seq:
                self.preempt(self.running[-1])
                preempted = True
            if need > bm.num_free_blocks:  # nothing newer left to preempt
                self.preempt(seq)
                preempted = True
                break
            if need > 0:
                seq.block_table += bm.take([], need)
            picked.append((seq, n))
            budget -= n
            i += 1

        slots = sum(s.num_slots for s in self.running)
        while not preempted and self.waiting and budget > 0:
            seq = self.waiting[0]
            if slots + seq.num_slots > self.max_num_seqs:
                break
            hits = bm.match_prefix(seq.token_ids)
            cached = len(hits) * bm.block_size
            n = min(len(seq.token_ids) - cached, budget)
            fresh = bm.blocks_for(cached + n) - len(hits)
            if not bm.can_take(hits, fresh):
                break
            seq.block_table = bm.take(hits, fresh)
            seq.num_computed = cached
            seq.num_hashed_blocks = len(hits)
            if hits:
                seq.last_hash = bm.blocks[hits[-1]].hash
            self.prefix_cache_hit_tokens += cached
            self.waiting.popleft()
            self.running.append(seq)
            slots += seq.num_slots
            picked.append((seq, n))
            budget -= n

        if not picked:
            return None
        picked.sort(key=lambda p: p[1] != 1)  # stable: decodes first, otherwise in order
        return ScheduledBatch([s for s, _ in picked], [n for _, n in picked],
                              sum(1 for _, n in picked if n == 1))

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first for recompute."""
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.reset_cache_state()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """seq is done (finished or aborted): it leaves the queues and its blocks are freed."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq.block_table)
            seq.block_table = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
