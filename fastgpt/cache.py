"""Static key/value cache: allocated once for (max batch, max length), written in place, never grown.

Static shapes keep every decode step identical (the precondition for capturing it in a CUDA graph) and
avoid the quadratic copying of a cache that is concatenated one token at a time.

``PagedBatch`` is the engine's counterpart: the indexing of one packed batch into a paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch: int, n_head: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_head, max_len, head_dim)  # (B, nh, Tmax, hs)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at positions input_pos (T,); return the caches (B, nh, Tmax, hs).

        B may be smaller than max_batch: the leading rows are used.
        """
        B = k.shape[0]
        k_cache, v_cache = self.k_cache[:B], self.v_cache[:B]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache


@dataclass
class PagedBatch:
    """Where one packed ragged batch of the engine reads and writes its keys and values.

    The batch is N tokens of B sequences, back to back; each attention layer holds its own pages
    (``CausalSelfAttention.kv_pages``: k and v, (num_blocks, block_size, H, D) each) and this says how to
    index them (see fastgpt/engine/block_manager.py for the layout). The first num_decodes sequences
    compute one token each (decode rows); the others compute chunks of their prompts.
    """

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each token; -1 writes nothing (graph padding)
    block_table: torch.Tensor  # (B, max_blocks) int32
    cache_seqlens: torch.Tensor  # (B,) int32: positions in the cache after this step's writes
    num_decodes: int  # the leading rows, one token each
    cu_seqlens_q: torch.Tensor | None = None  # (B - num_decodes + 1,) int32: the other rows' token offsets
