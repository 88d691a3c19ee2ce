"""The fused ops in plain PyTorch: the truth every Triton kernel is tested against.

These run the CPU path of the model too, and they support autograd (training on CPU goes through them).
They take the validated arguments of the public ops in ``kernels`` (softmax_scale already resolved) and
compute in the input dtype the way PyTorch's own modules do, so the model on CPU matches
``transformers`` to rounding. Pass float64 tensors to get a high-precision reference.
"""

from __future__ import annotations

import math

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
    # read only the filled part of the cache (a free host read on CPU; a sync on a GPU; under torch.compile
    # a data-dependent shape, so the whole cache, masked)
    if not q.is_cuda and not torch.compiler.is_compiling():
        lens = cache_seqlens.tolist()
        filled = max(max(lens), 1)
        k_cache, v_cache = k_cache[:, :, :filled], v_cache[:, :, :filled]
        if min(lens) == filled:
            # every row as long as the longest (always so at batch 1): no mask to build, and SDPA's one
            # call is 15 us where the spelled-out ops below take 55 (1 thread, gpt2's 12 heads; its
            # parallel region costs little more than the one split-K linear opens per projection)
            return F.scaled_dot_product_attention(q, k_cache, v_cache, scale=scale)
    Tmax = k_cache.shape[-2]
    valid = torch.arange(Tmax, device=q.device)[None, :] < cache_seqlens.to(q.device).long()[:, None]  # (B, Tmax)
    # ragged rows spelled out rather than SDPA with a mask: for a single query, CPU SDPA's threaded kernel
    # with a mask cost milliseconds per call on a busy 2-core machine (seen: 5.6 ms vs 0.03 ms)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax, float64 kept for the truth
    scores = torch.matmul(q, k_cache.transpose(-1, -2)).to(acc_dtype) * scale  # (B, H, 1, Tmax)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v_cache.dtype), v_cache)


def linear(x, weight, bias=None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear: x (..., in), weight (out, in) in either storage order, bias (out,).

    A few rows on a CPU (decode steps: one row per sequence) make a product whose time is the time to read
    the weight once. F.linear hands it to MKL, which runs a one-row product on a single thread whatever
    torch.set_num_threads says (seen in per-thread CPU time, torch 2.13 on a 2-core AMD EPYC), so the other
    cores' memory bandwidth goes unused; a few rows it does thread, but slowly. So the weight is read in S
    contiguous blocks, one per thread, as S independent products that torch.bmm hands to MKL's batched
    GEMM, one per thread:
      * stored (in, out) (GPT.use_cpu_decode_layout), its input features split (split-K):
            y = sum_s x[:, slice_s] @ weight.T[slice_s]    (rows, in/S) @ (in/S, out) each, then summed;
      * stored (out, in), its output rows split: y[:, block_s] = x @ weight[block_s].T.
        MKL threads a few rows itself, but slowly: gpt2's mlp.c_proj (768 x 3072) at 4 / 16 / 32 rows
        took 908 / 1112 / 1470 us through F.linear and 493 / 844 / 1228 us split (2 threads, medians).
    Two rows and more (decode batches, prefill) multiply faster by a oneDNN-packed copy of the weight,
    where one was made (prepack_linear_weight). See linear_plan for when; everything else is F.linear.
    """
    how, splits, packed = _plan(x, weight, bias)
    if how == "packed":
        return _packed_linear(x, weight, bias, packed)
    if how == "split-k":
        return _split_k_linear(x, weight, bias, splits)
    if how == "split-rows":
        return _split_rows_linear(x, weight, bias, splits)
    return F.linear(x, weight, bias)


# Splitting pays while the weight read dominates: split-K measured faster than F.linear up to 64 rows and
# even at 512 (per-thread CPU time, gpt2's c_attn and mlp.c_proj shapes, 2 threads), so prefill-sized
# products stay F.linear; and while a weight's read (>= 1 MB: 30 us and more) outweighs the parallel region
# and the small ops a split adds (~10 us), so a tiny model's products stay F.linear too.
SPLIT_MAX_ROWS = 64
SPLIT_MIN_WEIGHT = 1 << 18  # elements
_MKL = None  # torch.backends.mkl.is_available(), looked up on first use


def linear_plan(x, weight, bias=None) -> tuple[str, int]:
    """How ``linear`` computes this product: ("packed", 1), ("split-k", S), ("split-rows", S) or
    ("f.linear", 1).

    The packed copy is taken for PACKED_MIN_ROWS rows and more, with fp32 throughout, no autocast and
    nothing autograd must see, while the weight is what it was when packed. A split needs: a CPU with more
    than one intra-op thread; fp32 throughout and no autocast (the float64 truth and autocast's casts keep
    F.linear); up to SPLIT_MAX_ROWS rows; a weight of at least SPLIT_MIN_WEIGHT elements whose blocks are
    contiguous, i.e. stored (in, out) for split-K or (out, in) for split-rows; nothing autograd must see;
    and MKL, whose batched GEMM runs the blocks on separate threads (without it torch.bmm loops over them
    on one thread, and F.linear is better). S is the greatest common divisor of the thread count and the
    split dimension (2 for gpt2 on 2 threads), so the blocks are equal."""
    return _plan(x, weight, bias)[:2]


def _plan(x, weight, bias) -> tuple[str, int, torch.Tensor | None]:
    """linear_plan's answer, and the packed copy when the answer is "packed" (looked up once)."""
    global _MKL
    plain = ("f.linear", 1, None)
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return plain
    if torch.is_autocast_enabled("cpu"):  # F.linear casts as autocast says; bmm's partial sums would not
        return plain
    out_features, in_features = weight.shape
    rows = x.numel() // max(in_features, 1)
    if bias is not None and bias.dtype != torch.float32:
        return plain
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return plain
    packed = _packed_copy(weight) if rows >= PACKED_MIN_ROWS else None
    if packed is not None:
        return ("packed", 1, packed)
    if rows > SPLIT_MAX_ROWS or weight.numel() < SPLIT_MIN_WEIGHT:
        return plain
    threads = torch.get_num_threads()
    if threads < 2:
        return plain
    if _MKL is None:
        _MKL = torch.backends.mkl.is_available()
    if not _MKL:
        return plain
    if weight.stride() == (1, out_features):  # (in, out) storage
        splits = math.gcd(threads, in_features)
        return ("split-k", splits, None) if splits > 1 else plain
    if weight.stride() == (in_features, 1):  # (out, in) storage
        splits = math.gcd(threads, out_features)
        return ("split-rows", splits, None) if splits > 1 else plain
    return plain


def _split_k_linear(x, weight, bias, splits: int):
    out_features, in_features = weight.shape
    rows = x.reshape(-1, splits, in_features // splits).transpose(0, 1)  # (S, M, in / S)
    slices = weight.t().view(splits, in_features // splits, out_features)  # (S, in / S, out): no copy
    y = torch.bmm(rows, slices).sum(0)  # (M, out)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def _split_rows_linear(x, weight, bias, splits: int):
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)
    rows = x2.expand(splits, *x2.shape)  # (S, M, in): one copy of x, read S times
    blocks = weight.view(splits, out_features // splits, in_features)  # (S, out / S, in): no copy
    y = torch.bmm(rows, blocks.transpose(1, 2))  # (S, M, out / S)
    y = y.transpose(0, 1).reshape(x2.shape[0], out_features)  # a view at one row, else one small copy
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)


# Prepacked weights. oneDNN reorders a weight once into the blocked layout its GEMM streams, and then
# multiplies a batch of rows by it faster than MKL's sgemm on the plain tensor, split or not. gpt2's
# weights in the model's CPU layout, fp32, 2 threads, each call reading its weight from DRAM, median GB/s
# of weight read, plain -> packed (python -m benchmarks.bench_cpu_matvec --rows M --threads 2, 2026-12-01):
#   rows     c_attn      attn.c_proj    mlp.c_fc     mlp.c_proj    tied head
#      2   16.0 -> 17.2  14.8 -> 15.2  15.6 -> 16.7  16.2 -> 18.7  13.5 -> 21.3
#     32    5.4 -> 9.3    4.1 -> 7.4    4.4 -> 8.7    4.1 -> 5.7    5.3 -> 10.8
#    512    0.7 -> 0.8    0.7 -> 0.8    0.6 -> 0.8    0.7 -> 0.8    0.5 -> 0.7
# At one row the splits above stay ahead (c_attn 296 vs 350 us, the head 5.0 vs 6.5 ms), so one row keeps
# them. A oneDNN call costs ~60 us more than F.linear's, so a small weight stays plain (a 192 x 192 one at
# 8 rows: 16 us plain, 81 packed). oneDNN picks the packed layout for an expected row count: 32 and 512
# measured alike.
PACKED_MIN_ROWS = 2
PACK_MIN_WEIGHT = 1 << 18  # elements: gpt2's smallest projection has 590k, the bundled model's head 786k
PACK_ROWS_HINT = 32
_packed = None  # weight -> (data_ptr, version, shape, stride, packed copy), made on first use


def prepack_linear_weight(weight: torch.Tensor) -> bool:
    """Keep a oneDNN-packed copy of weight (out, in) (CPU, fp32, either storage order) for ``linear`` to
    multiply PACKED_MIN_ROWS rows and more by. The copy costs the weight's bytes again and lives as long
    as the weight does; it is used only while the weight is unchanged (an in-place update such as an
    optimizer step, or a new .data, sends ``linear`` back to the plain weight; pack again to refresh).
    Returns whether a copy was made: False for anything but a 2-D fp32 CPU tensor of PACK_MIN_WEIGHT
    elements or more, for an inference tensor (made under torch.inference_mode: its in-place updates are
    not counted, so a stale copy could not be told), or where this torch build has no oneDNN."""
    global _packed
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if weight.is_inference():
        return False
    if weight.numel() < PACK_MIN_WEIGHT:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)
    except (AttributeError, RuntimeError, NotImplementedError):  # a build without these oneDNN ops
        return False
    if _packed is None:
        from torch.utils.weak import WeakIdKeyDictionary  # tensors compare elementwise: key by identity

        _packed = WeakIdKeyDictionary()
    _packed[weight] = (weight.data_ptr(), weight._version, weight.shape, weight.stride(), packed)
    return True


def _packed_copy(weight: torch.Tensor):
    """weight's packed copy, or None when it has none or has changed since it was packed."""
    entry = None if _packed is None else _packed.get(weight)
    if entry is None:
        return None
    ptr, version, shape, stride, packed = entry
    if (weight.data_ptr(), weight._version, weight.shape, weight.stride()) != (ptr, version, shape, stride):
        return None
    return packed


def _packed_linear(x, weight, bias, packed):
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


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
    y = linear(gelu_tanh(linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)
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


# ------------------------------------------------------------------- what a backward starts from (library)
# The torch.library ops (kernels/library.py) save the same residuals on every backend, so their fake
# implementations, and whichever backend runs the backward, agree: attention's log-sum-exp, LayerNorm's
# mean and rstd, the MLP's pre-activation and dropout seed. These functions are that contract in plain
# PyTorch: a forward that also returns the residuals, and the gradients computed from them (fp32 math,
# float64 kept for the truth). Eager autograd on the reference path never needs them: PyTorch's own
# autograd records the ops above.
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """(B, H, Tq, Tk) scaled scores in fp32 (or float64), -inf where the bottom-right causal mask hides."""
    acc = _acc(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if causal:
        Tq, Tk = q.shape[-2], k.shape[-2]
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Tk - Tq), float("-inf"))
    return s


def flash_attention_lse(q, k, v, causal: bool, softmax_scale: float):
    """(o, lse): o as flash_attention (B, H, Tq, D) in q's dtype, and lse (B, H, Tq), the natural log-sum-exp
    of each row's scaled scores, fp32 (float64 for float64): what the Triton forward stores for its backward."""
    s = _scores(q, k, causal, softmax_scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype))
    return o.to(q.dtype), lse


def flash_attention_backward(do, q, k, v, o, lse, causal: bool, softmax_scale: float):
    """(dq, dk, dv) in q's dtype, from P = exp(S - lse): dV = P^T dO, dS = P (dO V^T - rowsum(dO o)),
    dQ = dS K scale, dK = dS^T Q scale."""
    s = _scores(q, k, causal, softmax_scale)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc)[..., None])  # (B, H, Tq, Tk)
    do_, v_ = do.to(acc), v.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    delta = (do_ * o.to(acc)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do_, v_.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k.to(acc)) * softmax_scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * softmax_scale
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def layer_norm_stats(h: torch.Tensor, eps: float):
    """mean, rstd (M,) of the rows of h (..., N): fp32 (float64 for float64), as the Triton forward stores."""
    h2 = h.reshape(-1, h.shape[-1]).to(_acc(h.dtype))
    return h2.mean(-1), torch.rsqrt(h2.var(-1, unbiased=False) + eps)


def layer_norm_backward(dy, h, weight, mean, rstd):
    """(dx, dweight, dbias) of y = LayerNorm(h) given dy, in fp32 (float64): dx (..., N), the others (N,).
    xhat = (h - mean) rstd; dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy * weight."""
    N = h.shape[-1]
    acc = mean.dtype
    xhat = (h.reshape(-1, N).to(acc) - mean[:, None]) * rstd[:, None]
    dy2 = dy.reshape(-1, N).to(acc)
    g = dy2 * weight.to(acc)
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.view(h.shape), (dy2 * xhat).sum(0), dy2.sum(0)


def dropout_keep(shape, seed: int, p: float, device) -> torch.Tensor:
    """The boolean keep-mask a seed stands for on the reference path (its own generator: no global RNG)."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= p


def gelu_tanh_grad(z: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh / dz = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2), t = tanh(c (z + a z^3))."""
    c, a = math.sqrt(2.0 / math.pi), 0.044715
    t = torch.tanh(c * (z + a * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * a * z * z)


def gelu_mlp_preact(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p: float, seed: int):
    """(out, z): gelu_mlp with the pre-activation z = x @ fc_weight.T + fc_bias (..., F) kept, and its
    dropout drawn from seed (dropout_keep) so that the backward can draw it again. All in x's dtype."""
    z = F.linear(x, fc_weight, fc_bias)
    y = F.linear(gelu_tanh(z), proj_weight, proj_bias)
    if dropout_p > 0:
        y = y * dropout_keep(y.shape, seed, dropout_p, y.device) / (1.0 - dropout_p)
    return (y if residual is None else y + residual), z


def gelu_mlp_backward(dy, x, z, fc_weight, proj_weight, dropout_p: float, seed: int):
    """(dx, d fc_weight, d fc_bias, d proj_weight, d proj_bias) of gelu_mlp_preact's branch, fp32 (float64):
    x (M, C), z (M, F), dy (M, C_out)."""
    acc = _acc(x.dtype)
    dy = dy.to(acc)
    if dropout_p > 0:
        dy = dy * dropout_keep(dy.shape, seed, dropout_p, dy.device) / (1.0 - dropout_p)
    z = z.to(acc)
    x, w1, w2 = x.to(acc), fc_weight.to(acc), proj_weight.to(acc)
    dz = (dy @ w2) * gelu_tanh_grad(z)  # (M, F)
    return dz @ w1, dz.t() @ x, dz.sum(0), dy.t() @ gelu_tanh(z), dy.sum(0)
