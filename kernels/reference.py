"""The fused ops in plain PyTorch: the truth every Triton kernel is tested against.

These run the CPU path of the model too, and they support autograd (training on CPU goes through them).
They take the validated arguments of the public ops in ``kernels`` (softmax_scale already resolved) and
compute in the input dtype the way PyTorch's own modules do, so the model on CPU matches
``transformers`` to rounding. Pass float64 tensors to get a high-precision reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attention(q, k, v, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ bottom-right causal mask]) v.  q (B,H,Tq,D), k/v (B,H,Tk,D) -> (B,H,Tq,D)."""
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if causal and Tq > 1:
        if Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        # bottom-right alignment: query i sees keys j <= i + (Tk - Tq)
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + (Tk - Tq), scale=scale)
    # one causal query at the bottom-right corner sees every key
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale: float | None = None) -> torch.Tensor:
    """q (B,H,1,D) against the first cache_seqlens[b] positions of k/v_cache (B,H,Tmax,D) -> (B,H,1,D)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if not q.is_cuda:  # read only the filled part of the cache (a free host read on CPU; a sync on a GPU)
        filled = max(int(cache_seqlens.max()), 1)
        k_cache, v_cache = k_cache[:, :, :filled], v_cache[:, :, :filled]
    Tmax = k_cache.shape[-2]
    valid = torch.arange(Tmax, device=q.device)[None, :] < cache_seqlens.to(q.device).long()[:, None]  # (B, Tmax)
    # spelled out rather than SDPA: for a single query, CPU SDPA's threaded kernel cost milliseconds
    # per call on a busy 2-core machine (seen: 5.6 ms vs 0.03 ms for these three small ops)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax, float64 kept for the truth
    scores = torch.matmul(q, k_cache.transpose(-1, -2)).to(acc_dtype) * scale  # (B, H, 1, Tmax)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v_cache.dtype), v_cache)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """y = LayerNorm(x) or, with residual, (y, h) with h = x + residual, y = LayerNorm(h)."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), bias.to(h.dtype), eps), h


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None, dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias) (+ residual)."""
    y = F.linear(gelu_tanh(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)
    if dropout_p > 0:
        y = F.dropout(y, dropout_p, training=True)
    return y if residual is None else y + residual


def linear_cross_entropy(x, weight, targets, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets): the (N, V) logits materialised, the softmax in fp32 at least.

    x (..., C), weight (V, C), targets (...) int64 -> a 0-dim loss (mean over the counted rows, or sum)."""
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)


# ------------------------------------------------------------------------------- paged KV cache (engine)
def _row_keys(pages: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions of one sequence: pages (num_blocks, bs, H, D), its table row -> (n, H, D).

    index_select along the block dim copies whole blocks (one memcpy each); advanced indexing of the
    same blocks ran ~9x slower on CPU (torch 2.13, 1 thread)."""
    nb = -(-n // pages.shape[1])
    idx = table_row[:nb].long().clamp(0, pages.shape[0] - 1)  # entries past the last block: never used
    return pages.index_select(0, idx).view(-1, pages.shape[2], pages.shape[3])[:n]


def paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens, softmax_scale: float | None = None):
    """q (B,H,1,D) against the first cache_seqlens[b] positions of row b's pages -> (B,H,1,D).

    Position p of row b lives in k_pages[block_table[b, p // bs], p % bs] (bs = k_pages.shape[1]).
    One row at a time, gathering only that row's blocks: padding every row to the longest and going
    through batched matmuls on the strided result cost 4x more on CPU (B=32, 300 positions, gpt2 heads)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for b, n in enumerate(cache_seqlens.tolist()):
        k = _row_keys(k_pages, block_table[b], n)  # (n, H, D)
        v = _row_keys(v_pages, block_table[b], n)
        scores = torch.bmm(q[b], k.permute(1, 2, 0)).to(acc_dtype) * scale  # (H, 1, n)
        out[b] = torch.bmm(scores.softmax(dim=-1).to(v.dtype), v.transpose(0, 1))  # (H, 1, D)
    return out


def paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens,
                            softmax_scale: float | None = None):
    """Packed queries q (total_q, H, D) of B sequences -> (total_q, H, D).

    Sequence b owns q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]: its last q_len_b positions among its
    cache_seqlens[b] keys (their keys already written), causal bottom-right."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(cache_seqlens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        k = _row_keys(k_pages, block_table[b], n).transpose(0, 1)[None]  # (1, H, n, D)
        v = _row_keys(v_pages, block_table[b], n).transpose(0, 1)[None]
        qb = q[lo:hi].transpose(0, 1)[None]  # (1, H, q_len, D)
        out[lo:hi] = flash_attention(qb, k, v, causal=True, softmax_scale=softmax_scale)[0].transpose(0, 1)
    return out


def paged_kv_write(k, v, k_pages, v_pages, slot_mapping) -> None:
    """Write k, v (N, H, D) into slots slot_mapping (N,) of the pages, in place.

    Slot s is position s % bs of block s // bs; a negative slot (a padding token) writes nothing."""
    slots = slot_mapping.long()
    if bool((slots < 0).any()):  # only CUDA-graph batches carry padding; filtering costs two copies
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    H, D = k_pages.shape[2], k_pages.shape[3]
    k_pages.view(-1, H, D).index_copy_(0, slots, k.to(k_pages.dtype))
    v_pages.view(-1, H, D).index_copy_(0, slots, v.to(v_pages.dtype))
