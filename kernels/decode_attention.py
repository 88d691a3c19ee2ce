"""Split-KV decode attention ("flash-decoding"): one new query per row against a KV cache.

For each row b and head h, with n = cache_seqlens[b] valid cache positions,

    o = sum_j softmax_j(q . k_j * scale) v_j,      j < n.

One query row gives the GPU almost no parallelism per (b, h), so the cache is cut along time into
``num_splits`` chunks processed by separate programs. Split s of a row runs the online softmax over
its chunk and writes a partial output o_s (fp32, already normalised) and its log-sum-exp
lse_s = m_s + log2(l_s) (base 2, since the kernel works with exp2). A second small kernel merges

    o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),     M = max_s lse_s.

A split that starts at or past n reads nothing and writes lse = -inf and o_s = 0, so it gets zero
weight (and no 0/0). The split count comes from Tmax, B*H and the SM count, never from the values in
cache_seqlens: no host sync, and static shapes for CUDA graphs. With one split the first kernel
writes the output itself and the merge is skipped.

Memory traffic: the op is bandwidth-bound. K and V are each read once, n * D elements per (b, h),
with 16-byte vector loads along D when the launcher proves the alignment, and each program asks for
its next tile before it works on the current one. The loop keeps one online-softmax state (running
max, sum, output row) per row slot of the tile, so it needs no reduction across warps and no
barrier; the slots are combined once, after the loop. Scores never leave registers. The partials
add num_splits * (D + 1) fp32 writes and reads per (b, h): under 1% of the cache traffic once a
split holds a few hundred positions. Dot products are tl.sum reductions (one query row is below
tl.dot's minimum M of 16).

Sources (ideas, not code): "Flash-Decoding for long-context inference" (Dao, Haziza, Massa, Sizov,
2023); FlashAttention-2 (Dao, 2023) for the online softmax; the Triton tutorials for the style.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._device import sm_count
from kernels.attention import head_dim_block
from kernels.compile_report import KernelSpec


@triton.jit
def _load_kv(KRow, VRow, offs_n, end, offs_d, mask_d, stride_kt, stride_kd, stride_vt, stride_vd,
             VEC: tl.constexpr):
    mask = (offs_n < end)[:, None] & mask_d[None, :]
    offs_n64 = offs_n.to(tl.int64)[:, None]
    k_ptrs = KRow + offs_n64 * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = VRow + offs_n64 * stride_vt + offs_d[None, :] * stride_vd
    if VEC > 1:
        # The launcher checked base pointers and strides: every run of VEC elements along D is
        # contiguous and 16-byte aligned, which the compiler needs to emit 128-bit loads.
        k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [1, VEC])
        v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [16, 16]), [1, VEC])
    # Masked lanes load 0 (their scores are then forced to -inf), so whatever sits in the cache past
    # the row's length (NaN, inf) never reaches the arithmetic.
    return tl.load(k_ptrs, mask=mask, other=0.0), tl.load(v_ptrs, mask=mask, other=0.0)


@triton.jit
def _decode_split_kernel(
    Q, K, V, SeqLens, O, MidO, MidLse,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_od,
    H, T_max, num_splits, split_len, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr, DIRECT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    # Lengths are not checked on the host (that would sync); clamping keeps a bad one in bounds.
    seqlen = tl.minimum(tl.load(SeqLens + b), T_max)
    start = split * split_len
    end = tl.minimum(start + split_len, seqlen)

    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    # log2(e) is folded into the scale so the softmax runs on exp2.
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale
    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh
    o_row = O + b * stride_ob + h * stride_oh
    mid = bh * num_splits + split

    # Each row slot of the tile keeps its own running max, sum and output (FlashAttention's online
    # softmax, per slot): the loop needs no reduction across warps, hence no barrier. The slots are
    # combined once, after the loop.
    m_i = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    offs_n = start + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_row, v_row, offs_n, end, offs_d, mask_d, stride_kt, stride_kd, stride_vt, stride_vd, VEC)
    for _ in range(start, end, BLOCK_N):
        # Ask for the next tile before using this one (Triton pipelines only loads that feed tl.dot):
        # each warp then waits on all its loads at once, not one by one, and four programs per SM
        # keep ~64 KB in flight per SM, what HBM needs. Past the end the loads are masked off.
        k_next, v_next = _load_kv(k_row, v_row, offs_n + BLOCK_N, end, offs_d, mask_d,
                                  stride_kt, stride_kd, stride_vt, stride_vd, VEC)
        mask_n = offs_n < end
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(mask_n, s, -float("inf"))
        m_new = tl.maximum(m_i, s)
        # A slot that has seen only masked positions stays at -inf; subtracting 0 instead keeps its
        # 2^(-inf - -inf) from turning into NaN.
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
        k, v = k_next, v_next
        offs_n += BLOCK_N

    m = tl.max(m_i, 0)
    w = tl.exp2(m_i - tl.where(m == -float("inf"), 0.0, m))
    l = tl.sum(l_i * w, 0)
    # An empty split (start >= seqlen) has l = 0: it stores o_s = 0 and lse = -inf.
    nonempty = l > 0.0
    out = tl.sum(acc * w[:, None], 0) / tl.where(nonempty, l, 1.0)
    if DIRECT:
        tl.store(o_row + offs_d * stride_od, out.to(O.dtype.element_ty), mask=mask_d)
    else:
        tl.store(MidO + mid * D_PAD + offs_d, out)
        tl.store(MidLse + mid, tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), -float("inf")))


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, O,
    stride_ob, stride_oh, stride_od,
    H, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D_PAD)
    offs_s = tl.arange(0, BLOCK_S)
    m = -float("inf")
    l = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    # BLOCK_S splits per step: their loads are independent, so one round trip serves them all.
    for s0 in range(0, num_splits, BLOCK_S):
        mask_s = s0 + offs_s < num_splits
        mid = bh * num_splits + s0 + offs_s
        lse = tl.load(MidLse + mid, mask=mask_s, other=-float("inf"))
        o_s = tl.load(MidO + mid[:, None] * D_PAD + offs_d[None, :], mask=mask_s[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        # While every split so far is empty m_new is -inf and 2^(-inf - -inf) would be NaN.
        seen = m_new > -float("inf")
        alpha = tl.where(seen, tl.exp2(m - m_new), 0.0)
        w = tl.where(seen, tl.exp2(lse - m_new), 0.0)
        l = l * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ------------------------------------------------------------------------------------------- launcher
_MAX_SPLITS = 256
_MIN_SPLIT_LEN = 128  # positions; below this the merge traffic and launch cost outweigh the gain
_CTAS_PER_SM = 4  # resident split programs per SM: 8 warps at <= 64 registers (see compile_report)
_MAX_WAVES = 2  # of resident programs; more splits only add merge work
_MERGE_BLOCK_S = 16


def _block_config(d_pad: int, vec: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): 4096-element K and V tiles, 16 per thread, so that four programs fit
    on an SM with the next tiles in flight. Without vector loads every element carries its own
    64-bit address, so that path (caches not 16-byte aligned) takes half the rows."""
    elements = 4096 if vec > 1 else 2048
    return max(16, min(256, elements // d_pad)), 8


def _vec(t: torch.Tensor) -> int:
    """Elements per 16-byte load when every D-run of t (B, H, T, D) starts 16-byte aligned, else 1."""
    vec = 16 // t.element_size()
    if t.stride(3) != 1 or t.shape[3] % vec or t.data_ptr() % 16:
        return 1
    if any(s % vec for s, n in zip(t.stride()[:3], t.shape[:3]) if n > 1):  # a size-1 dim never steps
        return 1
    return vec


def _split_plan(B: int, H: int, Tmax: int, block_n: int, sms: int, num_splits: int | None) -> tuple[int, int]:
    """(num_splits, split_len) from the static shapes only (never from the lengths: no host sync)."""
    if num_splits is not None:
        num_splits = int(num_splits)
        if not 1 <= num_splits <= min(Tmax, 65535):  # 65535: the CUDA grid's second dimension
            raise ValueError(f"num_splits must be in 1..min(Tmax={Tmax}, 65535), got {num_splits}")
        return num_splits, triton.cdiv(Tmax, num_splits)
    return _auto_split_plan(B * H, Tmax, block_n, sms)


@functools.lru_cache(maxsize=1024)
def _auto_split_plan(bh: int, Tmax: int, block_n: int, sms: int) -> tuple[int, int]:
    # With equal chunks, time ~ (waves of resident programs) * (positions per chunk), i.e.
    # cdiv(bh * n, slots) / n per position: pick the n that minimises it, the smallest on a tie.
    slots = sms * _CTAS_PER_SM
    n_max = max(1, min(triton.cdiv(Tmax, _MIN_SPLIT_LEN), _MAX_SPLITS, triton.cdiv(_MAX_WAVES * slots, bh)))
    n = min(range(1, n_max + 1), key=lambda n: (triton.cdiv(bh * n, slots) / n, n))
    split_len = triton.cdiv(triton.cdiv(Tmax, n), block_n) * block_n
    return triton.cdiv(Tmax, split_len), split_len


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float,
                         num_splits: int | None = None) -> torch.Tensor:
    """q (B,H,1,D), k_cache/v_cache (B,H,Tmax,D) any strides, cache_seqlens int32 (B,) -> o (B,H,1,D).

    Inputs are validated by ``kernels.decode_attention``. num_splits=None picks the split count from
    the shapes and the SM count; tests pass it to force one or several splits.
    """
    B, H, _, D = q.shape
    Tmax = k_cache.shape[2]
    if Tmax > 2**30:
        raise ValueError(f"k_cache has Tmax={Tmax} positions; at most 2**30 are supported (int32 positions)")
    d_pad = head_dim_block(D)
    vec = min(_vec(k_cache), _vec(v_cache))
    block_n, num_warps = _block_config(d_pad, vec)
    n_splits, split_len = _split_plan(B, H, Tmax, block_n, sm_count(q.device), num_splits)
    seqlens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()

    o = torch.empty((B, H, 1, D), device=q.device, dtype=q.dtype)
    direct = n_splits == 1
    if direct:
        mid_o = mid_lse = o  # never touched: DIRECT compiles the partial stores out
    else:
        mid_o = torch.empty((B * H, n_splits, d_pad), device=q.device, dtype=torch.float32)
        mid_lse = torch.empty((B * H, n_splits), device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B * H, n_splits)](
        q, k_cache, v_cache, seqlens, o, mid_o, mid_lse,
        q.stride(0), q.stride(1), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        o.stride(0), o.stride(1), o.stride(3),
        H, Tmax, n_splits, split_len, float(softmax_scale) * math.log2(math.e),
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=block_n, VEC=vec, DIRECT=direct,
        num_warps=num_warps, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(B * H,)](
            mid_o, mid_lse, o, o.stride(0), o.stride(1), o.stride(3), H, n_splits,
            HEAD_DIM=D, D_PAD=d_pad, BLOCK_S=_MERGE_BLOCK_S, num_warps=4, num_stages=1,
        )
    return o


def compile_specs() -> list[KernelSpec]:
    """Every launch config: each D_PAD block config with vector loads and without, split and direct."""
    specs = []

    def split_spec(dt, D, vec, direct):
        d_pad = head_dim_block(D)
        block_n, warps = _block_config(d_pad, vec)
        mid = f"*{dt}" if direct else "*fp32"  # with one split the launcher passes o as the unused partials
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "SeqLens": "*i32", "O": f"*{dt}",
               "MidO": mid, "MidLse": mid}
        for n in ("stride_qb", "stride_qh", "stride_qd", "stride_kb", "stride_kh", "stride_kt", "stride_kd",
                  "stride_vb", "stride_vh", "stride_vt", "stride_vd", "stride_ob", "stride_oh", "stride_od"):
            sig[n] = "i32"
        sig.update({"H": "i32", "T_max": "i32", "num_splits": "i32", "split_len": "i32", "qk_scale": "fp32"})
        constexprs = {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_N": block_n, "VEC": vec, "DIRECT": direct}
        # The JIT turns unit strides into constants; a contiguous-D cache always has them.
        for n in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):
            sig[n] = "constexpr"
            constexprs[n] = 1
        sig.update({k: "constexpr" for k in ("HEAD_DIM", "D_PAD", "BLOCK_N", "VEC", "DIRECT")})
        mode = "direct" if direct else "split"
        return KernelSpec(
            name=f"decode_split N{block_n} D{D} {dt} vec{vec} {mode}", fn=_decode_split_kernel,
            signature=sig, constexprs=constexprs, num_warps=warps, num_stages=2, expect_v4_loads=vec > 1,
        )

    # Block configs differ by D_PAD and by vector loads or not: walk them all in split mode, with
    # HEAD_DIM = D_PAD for the vector path (fp16, and fp32 whose tiles take twice the registers) and
    # an odd head dim for the scalar one.
    for d_pad, odd in ((16, 5), (32, 17), (64, 33), (128, 97)):
        specs.append(split_spec("fp16", d_pad, 8, False))
        specs.append(split_spec("fp32", d_pad, 4, False))
        specs.append(split_spec("fp16", odd, 1, False))
    specs.append(split_spec("bf16", 128, 8, False))
    specs.append(split_spec("fp16", 64, 8, True))  # one split: the output is stored directly
    specs.append(split_spec("fp16", 128, 8, True))

    for D in (16, 32, 64, 128):
        d_pad = head_dim_block(D)
        sig = {"MidO": "*fp32", "MidLse": "*fp32", "O": "*fp16", "stride_ob": "i32", "stride_oh": "i32",
               "stride_od": "constexpr", "H": "i32", "num_splits": "i32", "HEAD_DIM": "constexpr",
               "D_PAD": "constexpr", "BLOCK_S": "constexpr"}
        specs.append(KernelSpec(
            name=f"decode_merge S{_MERGE_BLOCK_S} D{D} fp16", fn=_decode_merge_kernel, signature=sig,
            constexprs={"stride_od": 1, "HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_S": _MERGE_BLOCK_S},
            num_warps=4, num_stages=1,
        ))
    return specs
