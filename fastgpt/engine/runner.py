"""The model stage of a step: the paged KV cache, and one scheduled batch through the model.

The cache is, per layer, k and v pages of shape (num_blocks, block_size, H, D) (FlashAttention's paged
layout; H the heads this process holds, its share under tensor parallelism), allocated once in the model's
dtype and zero-filled: attention masks the slots it must not see, and zeros there stay finite. Each
attention layer gets its pair as ``kv_pages``.

A batch becomes flat tensors, with no padding: the token ids and positions of every scheduled token
(decode rows first), the cache slot of each, each row's block table and cache length after the step,
and the offsets of the prompt chunks. Logits are computed only for the rows that end at their last
token (a chunk in the middle of a prompt needs none). A step made only of decodes replays a CUDA graph
when there is one for its size (cuda_graphs.py). With compile=True the forward is torch.compile'd (and
the CUDA graphs capture the compiled step).
"""

from __future__ import annotations

import torch

from fastgpt.cache import PagedBatch
from fastgpt.engine.cuda_graphs import DecodeGraphs
from fastgpt.engine.scheduler import ScheduledBatch


def local_heads(model) -> int:
    """The attention heads this process holds: all of them, or its share under tensor parallelism."""
    return model.transformer.h[0].attn.n_head


def bytes_per_block(model, block_size: int) -> int:
    """KV-cache bytes of one block in this process: k and v of its heads, every layer."""
    cfg = model.config
    return (2 * cfg.n_layer * block_size * local_heads(model) * cfg.head_dim
            * torch.empty((), dtype=model.dtype).element_size())


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_num_seqs: int, cuda_graphs: bool,
                 compile: bool = False, prepack_weights: bool = True):
        cfg = model.config
        if prepack_weights and model.device.type == "cpu":  # every step's products have several rows
            model.prepack_cpu_weights()
        # torch.compile of the packed forward: one graph with dynamic shapes (tokens, rows and table width
        # change every step), the fastgpt ops as single operators in it (kernels/library.py); a
        # decode-only step, a step with prompt chunks and one needing every token's logits are three
        # specialisations of it, compiled once each
        self.forward = (torch.compile(model.forward_packed, dynamic=True, fullgraph=True) if compile
                        else model.forward_packed)
        self.model, self.block_size, self.device = model, block_size, model.device
        shape = (cfg.n_layer, num_blocks, block_size, local_heads(model), cfg.head_dim)
        self.k_pages = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.v_pages = torch.zeros(shape, dtype=model.dtype, device=self.device)
        for i, block in enumerate(model.transformer.h):
            block.attn.kv_pages = (self.k_pages[i], self.v_pages[i])
        self.max_blocks_per_seq = -(-cfg.n_positions // block_size)
        self.graphs: DecodeGraphs | None = None
        self.graph_error: str | None = None  # why there are no graphs, when they were asked for
        if cuda_graphs and self.device.type == "cuda":
            try:
                self.graphs = DecodeGraphs(model, max_num_seqs, self.max_blocks_per_seq, self.forward)
            except Exception as e:  # e.g. an op that syncs with the host: run eagerly, and say why
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _tensor(self, data, dtype) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy runs asynchronously
            return torch.tensor(data, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
        return torch.tensor(data, dtype=dtype)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, use_graphs: bool = True) -> torch.Tensor:
        """Logits (R, V) of the rows that end at their sequence's last token, in batch order."""
        bs = self.block_size
        ids, pos, slots, lens, rows, tables = [], [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            table = seq.block_table
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lens.append(end)
            tables.append(table)
            if end == len(seq.token_ids):
                rows.append(len(ids) - 1)
        nd, B = batch.num_decodes, len(batch.seqs)
        if use_graphs and self.graphs is not None and nd == B and self.graphs.fits(B):
            logits = self.graphs.run(ids, pos, slots, tables, lens)  # (B, V)
            return logits if len(rows) == B else logits[rows]
        width = max(len(t) for t in tables)
        cu = [0]
        for n in batch.num_new_tokens[nd:]:
            cu.append(cu[-1] + n)
        paged = PagedBatch(
            slot_mapping=self._tensor(slots, torch.long),
            block_table=self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            cache_seqlens=self._tensor(lens, torch.int32),
            num_decodes=nd,
            cu_seqlens_q=self._tensor(cu, torch.int32) if nd < B else None)
        logits_rows = None if len(rows) == len(ids) else self._tensor(rows, torch.long)
        return self.forward(self._tensor(ids, torch.long), self._tensor(pos, torch.long), paged, logits_rows)
