"""CUDA graphs of the engine's decode step: a step's hundred-odd kernel launches replayed as one.

A decode step of a small model is launch-bound on a GPU (gpt2: 12 layers x ~8 kernels, each a few
microseconds of work). The step is captured once per batch size of a ladder, 1, 2, 4, 8, then every
multiple of 16 up to max_num_seqs, on static input buffers sized for the largest. A step of B decodes
copies its inputs into the first B rows, pads to the next captured size and replays; a padding row is
token 0 at position 0 with slot -1 (``paged_kv_write`` writes nothing there) and a cache length of 1,
read from whatever block its stale table row names (its output is thrown away). Batches above the
ladder run eagerly. The block table has one static width, enough blocks for the whole context; entries
past a row's last block are never read.

Capture needs ops that never synchronise with the host (the paged kernels are written so). The graphs
share one memory pool and are captured largest first, so the smaller ones reuse its memory; their
logits outputs alias, which is safe because a step consumes its logits before the next replay.
"""

from __future__ import annotations

import torch

from fastgpt.cache import PagedBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:  # the last rung covers max_num_seqs itself
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    @torch.inference_mode()
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, forward=None):
        forward = forward or model.forward_packed  # the runner's: torch.compile'd under Engine(compile=True)
        device = model.device
        self.sizes = graph_batch_sizes(max_num_seqs)
        B = self.sizes[-1]
        self.input_ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((B,), -1, dtype=torch.long, device=device)
        self.block_table = torch.zeros((B, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.cache_seqlens = torch.ones(B, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(self.sizes):
            paged = PagedBatch(self.slot_mapping[:b], self.block_table[:b], self.cache_seqlens[:b], num_decodes=b)

            def step():
                return forward(self.input_ids[:b], self.positions[:b], paged)

            step()  # compile and autotune outside the capture (all slots -1: nothing is written)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = step()
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(device)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            cache_seqlens: list[int]) -> torch.Tensor:
        """Logits (B, V) of B decode rows (a view of the graph's output: read it before the next run)."""
        B = len(ids)
        b = next(s for s in self.sizes if s >= B)
        width = max(len(t) for t in tables)
        pad = b - B
        host = dict(pin_memory=True)
        self.input_ids[:b].copy_(torch.tensor(ids + [0] * pad, **host), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad, **host), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots + [-1] * pad, **host), non_blocking=True)
        self.cache_seqlens[:b].copy_(torch.tensor(cache_seqlens + [1] * pad, dtype=torch.int32, **host),
                                     non_blocking=True)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, **host)
        self.block_table[:B, :width].copy_(table, non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b][:B]
