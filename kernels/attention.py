"""Prefill flash attention forward: o = softmax(q k^T * scale [+ causal mask]) v, one pass over K/V.

Math (online softmax, FlashAttention-2 forward). For one block of BLOCK_M query rows the kernel walks
the keys in blocks of BLOCK_N and keeps, per row, the running maximum m, the running denominator l and
the unnormalised output acc (fp32):

    s     = (q k_j^T) * scale * log2(e)          scores in the base-2 domain, so exp2 replaces exp
    m'    = max(m, rowmax(s))
    p     = exp2(s - m')                         every exponent is <= 0: no overflow at any logit size
    alpha = exp2(m - m')                         rescales what was accumulated against the old maximum
    l     = alpha * l + rowsum(p)
    acc   = alpha * acc + p v_j

and at the end o = acc / l and lse = (m + log2 l) * ln 2 (the natural log-sum-exp of the scaled
scores, stored in fp32 for a backward pass). A row whose maximum is still -inf (every key masked so
far) subtracts 0 instead, so it contributes exp2(-inf) = 0 rather than NaN.

Causal masking is aligned bottom-right (query i sees keys j <= i + Tk - Tq). Key blocks wholly above
the diagonal are never visited (the loop stops at the last key the block's lowest row can see); blocks
wholly below it run a loop with no mask at all; only the few blocks straddling the diagonal or the end
of the keys pay for the mask. Causal programs are scheduled longest rows first.

Memory traffic saved: the (Tq, Tk) score and probability matrices never leave the SM. Per (batch, head)
the kernel reads Q once, K and V once per query block, writes O once: O(T * D) bytes instead of the
O(T^2) a materialised softmax reads and writes several times. Q/K/V are read through their own four
strides, so a (B, T, 3, H, D) fused-qkv projection permuted to (B, H, T, D) is attended without a copy.

Head dims that are not a power of two are padded to one (at least 16, what tl.dot needs) with masked
loads. fp16/bf16 inputs use tensor-core dots with fp32 accumulation; fp32 inputs use IEEE-precision
dots (not TF32) so results match fp32 PyTorch.

Launch: grid (B*H, cdiv(Tq, BLOCK_M)). Tensors with 16-byte aligned head bases and row strides (the
normal case, fused-qkv views included) load rows as 128-bit vectors, pipelined through shared memory,
and autotune over CONFIGS_16; odd head dims and misaligned or feature-strided views take one smaller
tile that stays spill-free with scalar loads; fp32 has its own small tiles.

Backward (FlashAttention-2's, without atomics). With S = scale * q k^T, P = softmax(S), o = P v and dO
the upstream gradient:

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta),  delta = rowsum(dO * o)
    dQ = scale * dS K  dK = scale * dS^T Q

P is never stored: each block recomputes it from the saved log-sum-exp as exp2(s * log2(e) - lse *
log2(e)), which equals the forward's normalised P (same scores, same base-2 domain). A preprocess
computes delta (fp32, (B, H, Tq)). Then two kernels, each owning what it writes, so no gradient is
summed across programs: dK/dV programs hold a block of keys and walk the queries that see them
(causal: query blocks wholly above the diagonal are skipped, one strip of BLOCK_N rows straddling it is
masked, the rest runs unmasked); dQ programs hold a block of queries and walk their keys as the
forward does. The dQ pass recomputes q k^T and dO v^T: 7 block matmuls to the 5 of an atomic
accumulation of dQ, bought for plain stores (autotuning may rerun a launch) and no fp32 dQ buffer.

Memory: the forward saves q, k, v (already alive as the projection's output), o and lse (4 bytes a
row): O(T * D) per head, never the (Tq, Tk) matrix SDPA's math path keeps. The backward allocates
delta (4 bytes a row) and the gradients. When q, k, v are views of one (B, T, 3, H, D) projection, the
autograd input is that tensor and the three gradients are written into views of one buffer shaped
like it, so its gradient needs no stack through unbind (one read + write of 3 * B * T * H * D
elements saved per layer). Traffic per (batch, head): the dK/dV pass reads K, V once and Q, dO, lse,
delta once per key block; the dQ pass reads Q, dO once and K, V once per query block.

Sources (ideas, no code): Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023); the
Triton fused-attention tutorial; Milakov & Gimelshein, "Online normalizer calculation for softmax".
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels.compile_report import KernelSpec

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                    offs_m, offs_n, d_mask, lo, hi, diag, T_K, qk_scale,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            n_ok = (start_n + offs_n) < T_K
            k = tl.load(k_ptrs, mask=d_mask[:, None] & n_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        if q.dtype == tl.float32:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        s = qk * qk_scale
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with every key so far masked keeps m = -inf; subtracting 0 keeps p = 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if q.dtype == tl.float32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


# A row stride of 1 (D == 1, or a feature-strided view) would otherwise be specialised into a constant
# at launch, and a constant has no .to(): keep the row strides runtime values.
@triton.jit(do_not_specialize=["stride_qm", "stride_kn", "stride_vn", "stride_om"])
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, T_Q, T_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    if IS_CAUSAL:
        # the last query blocks see the most keys: launch them first so the tail of the grid is short work
        start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        start_m = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh
    stride_qm = stride_qm.to(tl.int64)
    stride_kn = stride_kn.to(tl.int64)
    stride_vn = stride_vn.to(tl.int64)
    stride_om = stride_om.to(tl.int64)
    if ALIGNED:
        # The launcher checked 16-byte aligned head bases and row strides (what Triton's own launch
        # specialisation finds for such tensors, restated so compile_specs shows the code that runs):
        # rows then load as 128-bit vectors, which cp.async needs to pipeline the K/V tiles.
        VEC: tl.constexpr = 128 // Q.dtype.element_ty.primitive_bitwidth
        q_base = tl.multiple_of(q_base, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        o_base = tl.multiple_of(o_base, 16)
        stride_qm = tl.multiple_of(stride_qm, VEC)
        stride_kn = tl.multiple_of(stride_kn, VEC)
        stride_vn = tl.multiple_of(stride_vn, VEC)
        stride_om = tl.multiple_of(stride_om, VEC)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < T_Q

    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    # K is read transposed, (BLOCK_D, BLOCK_N), so q @ k needs no in-register transpose
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = T_K - T_Q  # bottom-right alignment: row i sees keys j <= i + diag
    if IS_CAUSAL:
        # blocks ending at or before the block's first row's last key need no mask; nothing past the
        # last row's last key is visited. start_m * BLOCK_M < T_Q keeps mask_lo <= hi <= T_K; the clamp
        # only matters for Tq > Tk (rows that see no key), which the public op rejects.
        hi = tl.minimum(T_K, (start_m + 1) * BLOCK_M + diag)
        mask_lo = tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = T_K
        mask_lo = T_K // BLOCK_N * BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, offs_n, d_mask, 0, mask_lo, diag, T_K, qk_scale,
                                    False, IS_CAUSAL, EVEN_D, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, offs_n, d_mask, mask_lo, hi, diag, T_K, qk_scale,
                                    True, IS_CAUSAL, EVEN_D, BLOCK_N)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln 2: back from base 2 to natural log
        tl.store(LSE + pid_bh * T_Q + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["stride_om", "stride_dom"])
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, (B*H, Tq): the dP-correction every dS entry of its row subtracts."""
    pid_bh = tl.program_id(0).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    o_base = O + off_b * stride_ob + off_h * stride_oh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    stride_om = stride_om.to(tl.int64)
    stride_dom = stride_dom.to(tl.int64)
    if ALIGNED:
        VEC: tl.constexpr = 128 // O.dtype.element_ty.primitive_bitwidth
        o_base = tl.multiple_of(o_base, 16)
        do_base = tl.multiple_of(do_base, 16)
        stride_om = tl.multiple_of(stride_om, VEC)
        stride_dom = tl.multiple_of(stride_dom, VEC)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    if HEAD_DIM == BLOCK_D:
        mask = m_ok[:, None]
    else:
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T_Q + offs_m, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                         offs_n, offs_mb, d_mask, lo, hi, diag, T_Q, qk_scale,
                         MASK_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk += dS^T q, dv += P^T dO over query blocks [lo, hi), recomputing P^T from the saved lse.

    Works on the transposed scores (keys x queries) so every product is a plain (or B-transposed) dot.
    Query rows past Tq load as zeros with lse = delta = 0: their P^T column is exp2(0) = 1 but both dO and
    (dP^T - delta) are 0 there, so they add nothing. Key rows past Tk are never stored, so they need no
    mask either (their zero scores make exp2(-lse), which may overflow for a row far below zero: harmless
    in rows nothing reads)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        m_ok = offs_m < T_Q
        if EVEN_D:  # the rows' bound only; padded features too otherwise
            mask = m_ok[:, None]
        else:
            mask = m_ok[:, None] & d_mask[None, :]
        q = tl.load(q_ptrs + start_m * stride_qm, mask=mask, other=0.0)
        lse2 = tl.load(lse_row + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634  # to base 2
        if q.dtype == tl.float32:
            qkT = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            qkT = tl.dot(k, tl.trans(q))
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M), each <= 1
        if MASK_CAUSAL:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=mask, other=0.0)
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)
        if q.dtype == tl.float32:
            dv = tl.dot(pT, do, dv, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT, q, dk, input_precision="ieee")
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["stride_qm", "stride_kn", "stride_vn", "stride_dom", "stride_dkn", "stride_dvn"])
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, T_Q, T_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch*head, block of BLOCK_N keys): dK and dV of those keys, summed over every
    query that sees them, in registers; each is stored once, so no atomics are needed."""
    pid_bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N  # causal: low key blocks see the most queries and launch first
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dk_base = DK + off_b * stride_dkb + off_h * stride_dkh
    dv_base = DV + off_b * stride_dvb + off_h * stride_dvh
    stride_qm = stride_qm.to(tl.int64)
    stride_kn = stride_kn.to(tl.int64)
    stride_vn = stride_vn.to(tl.int64)
    stride_dom = stride_dom.to(tl.int64)
    stride_dkn = stride_dkn.to(tl.int64)
    stride_dvn = stride_dvn.to(tl.int64)
    if ALIGNED:  # as in the forward: 16-byte bases and row strides, checked by the launcher
        VEC: tl.constexpr = 128 // Q.dtype.element_ty.primitive_bitwidth
        q_base = tl.multiple_of(q_base, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        do_base = tl.multiple_of(do_base, 16)
        dk_base = tl.multiple_of(dk_base, 16)
        dv_base = tl.multiple_of(dv_base, 16)
        stride_qm = tl.multiple_of(stride_qm, VEC)
        stride_kn = tl.multiple_of(stride_kn, VEC)
        stride_vn = tl.multiple_of(stride_vn, VEC)
        stride_dom = tl.multiple_of(stride_dom, VEC)
        stride_dkn = tl.multiple_of(stride_dkn, VEC)
        stride_dvn = tl.multiple_of(stride_dvn, VEC)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    if EVEN_D:
        kv_mask = (offs_n < T_K)[:, None]
    else:
        kv_mask = (offs_n < T_K)[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    q_ptrs = q_base + offs_mb[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = do_base + offs_mb[:, None] * stride_dom + offs_d[None, :] * stride_dod
    lse_row = LSE + pid_bh * T_Q
    delta_row = DELTA + pid_bh * T_Q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = T_K - T_Q  # bottom-right alignment: query i sees keys j <= i + diag
    if IS_CAUSAL:
        # Query rows below start_n - diag see none of these keys and are skipped; from there on, one
        # BLOCK_N-row strip straddles the diagonal and needs the mask; every row from
        # start_n + BLOCK_N - 1 - diag on sees all of them. lo < Tq because start_n < Tk.
        lo = tl.maximum(start_n - diag, 0)
        mid = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - lo, 0), BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                                      offs_n, offs_mb, d_mask, lo, tl.minimum(mid, T_Q), diag, T_Q, qk_scale,
                                      True, EVEN_D, BLOCK_M)
    else:
        mid = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qm, stride_dom,
                                  offs_n, offs_mb, d_mask, mid, T_Q, diag, T_Q, qk_scale,
                                  False, EVEN_D, BLOCK_M)

    dk = dk * sm_scale  # dS was taken w.r.t. the scaled scores
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn,
                       offs_m, offs_n, d_mask, lo, hi, diag, T_K, qk_scale,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """dq += dS k over key blocks [lo, hi). MASKED blocks apply the key bound (a padded key's zero
    score would give exp2(-lse), which overflows for very negative rows) and the causal mask."""
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            n_ok = (start_n + offs_n) < T_K
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=d_mask[:, None] & n_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vn, mask=d_mask[:, None] & n_ok[None, :], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start_n * stride_kn)  # (BLOCK_D, BLOCK_N)
            vT = tl.load(vT_ptrs + start_n * stride_vn)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=d_mask[:, None], other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vn, mask=d_mask[:, None], other=0.0)
        if q.dtype == tl.float32:
            qk = tl.dot(q, kT, input_precision="ieee")
        else:
            qk = tl.dot(q, kT)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if IS_CAUSAL:
                keep = keep & ((start_n + offs_n)[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        if q.dtype == tl.float32:
            dp = tl.dot(do, vT, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds, tl.trans(kT), dq, input_precision="ieee")
        else:
            dp = tl.dot(do, vT)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.jit(do_not_specialize=["stride_qm", "stride_kn", "stride_vn", "stride_dom", "stride_dqm"])
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, T_Q, T_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch*head, block of BLOCK_M queries): dQ of those rows over the keys they see,
    the same walk as the forward (unmasked blocks, then the diagonal and the key tail)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    if IS_CAUSAL:
        start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows first, as in the forward
    else:
        start_m = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    stride_qm = stride_qm.to(tl.int64)
    stride_kn = stride_kn.to(tl.int64)
    stride_vn = stride_vn.to(tl.int64)
    stride_dom = stride_dom.to(tl.int64)
    stride_dqm = stride_dqm.to(tl.int64)
    if ALIGNED:
        VEC: tl.constexpr = 128 // Q.dtype.element_ty.primitive_bitwidth
        q_base = tl.multiple_of(q_base, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        do_base = tl.multiple_of(do_base, 16)
        dq_base = tl.multiple_of(dq_base, 16)
        stride_qm = tl.multiple_of(stride_qm, VEC)
        stride_kn = tl.multiple_of(stride_kn, VEC)
        stride_vn = tl.multiple_of(stride_vn, VEC)
        stride_dom = tl.multiple_of(stride_dom, VEC)
        stride_dqm = tl.multiple_of(stride_dqm, VEC)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_ok = offs_m < T_Q
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    if EVEN_D:
        mask = m_ok[:, None]
    else:
        mask = m_ok[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse2 = tl.load(LSE + pid_bh * T_Q + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * T_Q + offs_m, mask=m_ok, other=0.0)
    # K and V read transposed, (BLOCK_D, BLOCK_N), so q @ kT and dO @ vT need no in-register transpose
    kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = T_K - T_Q
    if IS_CAUSAL:  # the forward's split: see _attn_fwd
        hi = tl.minimum(T_K, (start_m + 1) * BLOCK_M + diag)
        mask_lo = tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = T_K
        mask_lo = T_K // BLOCK_N * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn,
                            offs_m, offs_n, d_mask, 0, mask_lo, diag, T_K, qk_scale,
                            False, IS_CAUSAL, EVEN_D, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kn, stride_vn,
                            offs_m, offs_n, d_mask, mask_lo, hi, diag, T_K, qk_scale,
                            True, IS_CAUSAL, EVEN_D, BLOCK_N)
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=mask)



# --------------------------------------------------------------------------------------------- launcher
def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Tensor-core configs for aligned fp16/bf16 (the normal case), most preferred first: on CUDA the
# autotuner times every survivor of _prune once per (Tq, Tk) bucket, D, causal; under the interpreter
# the first survivor runs. M128 x N128 with 8 warps is the usual Hopper winner; the 4-warp ones suit
# short sequences; the last, the smallest, is what an A100 runs at D=128 and the fallback of _prune.
CONFIGS_16 = [
    _cfg(128, 128, 8, 3),
    _cfg(128, 64, 8, 3),
    _cfg(128, 64, 4, 3),
    _cfg(64, 64, 4, 3),
    _cfg(128, 128, 8, 2),
    _cfg(64, 64, 8, 3),
]
# fp16/bf16 tensors whose rows cannot load as 128-bit vectors (odd D, misaligned views): scalar loads
# need many more address registers, and this tile is the one that stays spill-free up to D=128.
CONFIGS_UNALIGNED = [_cfg(64, 32, 8, 2)]
# fp32 runs IEEE dots on the FMA units, whose operand layouts are register-hungry: small tiles only.
CONFIGS_32 = [
    _cfg(32, 16, 8, 2),
    _cfg(16, 16, 4, 2),
]
_SMEM_DEFAULT = 227 * 1024  # H100/H200 per-block opt-in limit; an A100 has 163 KB


def head_dim_block(head_dim: int) -> int:
    """The head-dim tile of every attention kernel: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _config_list(dtype: torch.dtype, aligned: bool) -> list:
    if dtype == torch.float32:
        return CONFIGS_32
    return CONFIGS_16 if aligned else CONFIGS_UNALIGNED


def _smem_estimate(cfg: triton.Config, block_d: int, elt: int) -> int:
    """The Q tile plus num_stages buffered K and V tiles (matches the compiler's count, see compile_specs)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (bm * block_d + 2 * cfg.num_stages * bn * block_d) * elt


def _prune(configs, named_args, **kwargs):
    """Drop configs whose query block dwarfs Tq, whose tiles overflow shared memory, or whose fp32
    accumulator needs more registers a thread than leave room for the rest: 64 on Hopper (wgmma keeps
    less beside it), 32 before (the compile report shows those spilling on sm_80). Keeps >= 1."""
    t_q, q = named_args["T_Q"], named_args["Q"]
    block_d = kwargs["BLOCK_D"]
    smem, acc_regs = _SMEM_DEFAULT, 64
    if q.is_cuda:
        props = torch.cuda.get_device_properties(q.device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024  # older torch: the least
        acc_regs = 64 if props.major >= 9 else 32

    def ok(c):
        bm = c.kwargs["BLOCK_M"]
        return (bm <= max(64, triton.next_power_of_2(t_q))
                and bm * block_d <= acc_regs * 32 * c.num_warps
                and _smem_estimate(c, block_d, q.element_size()) <= smem)

    return [c for c in configs if ok(c)] or [configs[-1]]


_TUNERS: dict = {}


def _tuner(configs: list, t_q: int, t_k: int):
    """One autotuner per (config list, Tq <= 64, Tk power-of-two bucket), so a new prompt length reuses
    its bucket's choice instead of re-timing every config; the tuner's key adds D, causal and dtypes."""
    bucket = (id(configs), t_q <= 64, triton.next_power_of_2(t_k))
    if bucket not in _TUNERS:
        _TUNERS[bucket] = triton.autotune(
            configs=configs,
            key=["HEAD_DIM", "IS_CAUSAL", "STORE_LSE", "ALIGNED"],
            prune_configs_by={"early_config_prune": _prune},
        )(_attn_fwd)
    return _TUNERS[bucket]


def _aligned(*ts) -> bool:
    """Unit feature stride, 16-byte aligned base and batch/head/row strides (size-1 dims never step)."""
    vec = 16 // ts[0].element_size()
    return all(t.data_ptr() % 16 == 0 and t.stride(3) == 1
               and all(st % vec == 0 or n == 1 for st, n in zip(t.stride()[:3], t.shape[:3]))
               for t in ts)


def flash_attention_fwd(q, k, v, *, causal: bool, softmax_scale: float, return_lse: bool = False,
                        config: triton.Config | None = None):
    """q (B, H, Tq, D), k/v (B, H, Tk, D), any strides, validated by kernels.flash_attention.

    Returns o (B, H, Tq, D) contiguous in q's dtype, and with return_lse also lse (B, H, Tq) fp32, the
    natural log-sum-exp of each row's scaled scores. config forces one entry of the config list that
    applies to these tensors (tests walk them all); otherwise the autotuner picks on CUDA and the first
    config surviving _prune runs under the interpreter.
    """
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise NotImplementedError("bf16 flash_attention needs a GPU: Triton's interpreter computes bf16 "
                                  "tl.dot wrongly (triton-lang/triton#11584); use fp16 or fp32 on CPU")
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    o = torch.empty((B, H, T_q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_q) if return_lse else (1,), dtype=torch.float32, device=q.device)
    aligned = _aligned(q, k, v, o)
    configs = _config_list(q.dtype, aligned)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T_q, T_k, float(softmax_scale) * LOG2E)
    meta = dict(HEAD_DIM=D, BLOCK_D=head_dim_block(D), IS_CAUSAL=bool(causal),
                STORE_LSE=bool(return_lse), ALIGNED=aligned)

    def grid(m):
        n_m = triton.cdiv(T_q, m["BLOCK_M"])
        if n_m > 65535:
            raise ValueError(f"Tq={T_q} needs {n_m} query blocks of {m['BLOCK_M']}; a grid allows 65535")
        return (B * H, n_m)

    if config is None and q.is_cuda:
        _tuner(configs, T_q, T_k)[grid](*args, **meta)
    else:
        if config is None:
            config = _prune(configs, {"T_Q": T_q, "Q": q}, **meta)[0]
        elif config not in configs:
            raise ValueError(f"config {config} is not in the list for {q.dtype}, aligned={aligned}")
        _attn_fwd[grid(config.kwargs)](*args, **meta, **config.kwargs,
                                       num_warps=config.num_warps, num_stages=config.num_stages)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------- backward launcher
# Backward block configs. dK/dV programs hold BLOCK_N keys and step through BLOCK_M queries; dQ programs
# hold BLOCK_M queries and step through BLOCK_N keys. Each row also records the largest BLOCK_D the
# config compiles for without spills on sm_90 and on sm_80 (0: not at all), as the compile report
# measured them (compile_specs covers each at that size): the register use of these kernels does not
# follow a simple formula on sm_80, whose mma operands live in registers, so the table is the rule.
# Most preferred first; on CUDA the autotuner times every survivor of _bwd_prune.
_BWD_REACH: dict = {}


def _bwd_table(rows) -> list:
    """triton.Configs from rows (BLOCK_M, BLOCK_N, warps, stages, max BLOCK_D on sm_90, on sm_80)."""
    configs = []
    for block_m, block_n, num_warps, num_stages, d90, d80 in rows:
        cfg = _cfg(block_m, block_n, num_warps, num_stages)
        _BWD_REACH[id(cfg)] = {9: d90, 8: d80}
        configs.append(cfg)
    return configs


DKDV_CONFIGS_16 = _bwd_table([
    (32, 128, 8, 3, 128, 64),  # 128 keys a program: the fewest passes over Q and dO
    (64, 128, 8, 2, 64, 64),
    (64, 64, 8, 3, 128, 128),
    (32, 64, 4, 3, 128, 64),
    (32, 64, 8, 3, 128, 128),
])
DQ_CONFIGS_16 = _bwd_table([
    (128, 64, 8, 3, 128, 0),
    (128, 32, 8, 3, 128, 64),
    (128, 128, 8, 2, 64, 0),
    (64, 64, 8, 2, 128, 128),
    (64, 32, 8, 2, 128, 128),
])
# fp16/bf16 rows that cannot load as 128-bit vectors have no list: flash_attention_bwd stages them
# through row-aligned copies, because every scalar-load tile that keeps sm_90's wgmma (a 64-row held
# block) spilled at D = 128 under Triton 3.6 in the compile report, and smaller ones lose the wgmma.
# fp32: IEEE dots on the FMA units, small tiles as in the forward; one each, as fp32 is the parity
# path, not a speed target.
DKDV_CONFIGS_32 = _bwd_table([(16, 32, 8, 2, 128, 128)])
DQ_CONFIGS_32 = _bwd_table([(32, 16, 8, 2, 128, 128)])
_BWD_LISTS = {
    "dkdv": {"16": DKDV_CONFIGS_16, "32": DKDV_CONFIGS_32},
    "dq": {"16": DQ_CONFIGS_16, "32": DQ_CONFIGS_32},
}


def _bwd_config_list(kernel: str, dtype: torch.dtype) -> list:
    return _BWD_LISTS[kernel]["32" if dtype == torch.float32 else "16"]


def _bwd_smem_estimate(kernel: str, cfg: triton.Config, block_d: int, elt: int) -> int:
    """dK/dV: the held K and V tiles plus num_stages buffered Q, dO tiles and their fp32 lse and delta
    rows; dQ: Q and dO plus buffered K and V (the compiler's count, see compile_specs, to within 1 KB)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if kernel == "dkdv":
        return (2 * bn * block_d + 2 * cfg.num_stages * bm * block_d) * elt + 2 * cfg.num_stages * bm * 4
    return (2 * bm * block_d + 2 * cfg.num_stages * bn * block_d) * elt


def _bwd_prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        """Drop configs whose held block dwarfs its sequence, that spill at this BLOCK_D on this GPU's
        architecture (sm_90 rules for the interpreter and anything newer), or that overflow shared
        memory. Keeps >= 1."""
        t_held = named_args["T_K"] if kernel == "dkdv" else named_args["T_Q"]
        q = named_args["Q"]
        block_d = kwargs["BLOCK_D"]
        smem, arch = _SMEM_DEFAULT, 9
        if q.is_cuda:
            props = torch.cuda.get_device_properties(q.device)
            smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
            arch = 9 if props.major >= 9 else 8

        def ok(c):
            held = c.kwargs["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"]
            return (held <= max(64, triton.next_power_of_2(t_held))
                    and _BWD_REACH[id(c)][arch] >= block_d
                    and _bwd_smem_estimate(kernel, c, block_d, q.element_size()) <= smem)

        return [c for c in configs if ok(c)] or [configs[-1]]

    return prune


_BWD_TUNERS: dict = {}


def _bwd_tuner(kernel: str, configs: list, t_q: int, t_k: int):
    """One autotuner per (kernel, config list, Tq and Tk power-of-two buckets); the key adds D, causal,
    alignment and dtypes. Every config rewrites its outputs in full (no accumulation into them), so
    timing one config after another leaves the right gradients."""
    bucket = (kernel, id(configs), triton.next_power_of_2(t_q), triton.next_power_of_2(t_k))
    if bucket not in _BWD_TUNERS:
        _BWD_TUNERS[bucket] = triton.autotune(
            configs=configs,
            key=["HEAD_DIM", "IS_CAUSAL", "ALIGNED"],
            prune_configs_by={"early_config_prune": _bwd_prune(kernel)},
        )(_attn_bwd_dkdv if kernel == "dkdv" else _attn_bwd_dq)
    return _BWD_TUNERS[bucket]


def _launch_bwd(kernel: str, args: tuple, meta: dict, grid_bh: int, q, config):
    """Launch one backward kernel: the autotuner on CUDA, else `config` or the first survivor of the prune.
    args end with (H, T_Q, T_K, qk_scale, sm_scale), positional so the prune can read them."""
    fn = _attn_bwd_dkdv if kernel == "dkdv" else _attn_bwd_dq
    configs = _bwd_config_list(kernel, q.dtype)
    t_q, t_k = args[-4], args[-3]
    held, n_rows = ("BLOCK_N", t_k) if kernel == "dkdv" else ("BLOCK_M", t_q)

    def grid(m):
        n_blocks = triton.cdiv(n_rows, m[held])
        if n_blocks > 65535:
            raise ValueError(f"{n_rows} positions need {n_blocks} blocks of {m[held]}; a grid allows 65535")
        return (grid_bh, n_blocks)

    if config is None and q.is_cuda:
        _bwd_tuner(kernel, configs, t_q, t_k)[grid](*args, **meta)
        return
    if config is None:
        config = _bwd_prune(kernel)(configs, {"T_Q": t_q, "T_K": t_k, "Q": q}, **meta)[0]
    elif config not in configs:
        raise ValueError(f"{kernel} config {config} is not in the list for {q.dtype}")
    fn[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                            num_stages=config.num_stages)


def flash_attention_bwd(do, q, k, v, o, lse, *, causal: bool, softmax_scale: float, grads=None,
                        need_dq: bool = True, dkdv_config: triton.Config | None = None,
                        dq_config: triton.Config | None = None):
    """Gradients of o = attention(q, k, v) given do = dL/do.

    q, o, do (B, H, Tq, D), k/v (B, H, Tk, D), any strides; lse (B, H, Tq) fp32 from
    flash_attention_fwd(..., return_lse=True) on the same inputs. Returns (dq, dk, dv) in q's dtype,
    written into `grads` when given (three tensors of q's, k's, v's shapes, e.g. the views of one fused
    (B, T, 3, H, D) buffer), else into new tensors (contiguous, or with padded rows where 16-bit rows of
    D elements are not a whole number of 16 bytes); dq is None without need_dq. The configs force one
    entry of each kernel's list (tests walk them all), as in flash_attention_fwd.
    """
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise NotImplementedError("bf16 flash_attention needs a GPU: Triton's interpreter computes bf16 "
                                  "tl.dot wrongly (triton-lang/triton#11584); use fp16 or fp32 on CPU")
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    if grads is None:
        grads = (_empty_rows((B, H, T_q, D), q) if need_dq else None, _empty_rows((B, H, T_k, D), q),
                 _empty_rows((B, H, T_k, D), q))
    block_d = head_dim_block(D)

    # delta = rowsum(dO * O): a pass over two (Tq, D) tensors, about 4k elements a program
    delta = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)
    pre_rows = max(16, 4096 // block_d)
    _attn_bwd_preprocess[(B * H, triton.cdiv(T_q, pre_rows))](
        o, do, delta, *o.stride(), *do.stride(), H, T_q,
        HEAD_DIM=D, BLOCK_D=block_d, ALIGNED=_aligned(o, do), BLOCK_M=pre_rows, num_warps=4)

    # 16-bit rows that cannot load as 128-bit vectors (odd D, misaligned views, feature strides) are
    # staged through copies with padded rows: O(T * D) more traffic on a rare path, where the
    # scalar-load tiles of these kernels spill on sm_90 at D = 128 (the compile report shows it)
    staged = q.dtype != torch.float32 and not _aligned(*(t for t in (q, k, v, do, *grads) if t is not None))
    if staged:
        q, k, v, do = (_staged(t, copy=True) for t in (q, k, v, do))
        outputs, grads = grads, tuple(None if g is None else _staged(g, copy=False) for g in grads)
    dq, dk, dv = grads
    aligned = _aligned(q, k, v, do, dk, dv, *((dq,) if dq is not None else ()))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal), ALIGNED=aligned)
    sizes = (H, T_q, T_k, float(softmax_scale) * LOG2E, float(softmax_scale))
    _launch_bwd("dkdv", (q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                         *dk.stride(), *dv.stride(), *sizes), meta, B * H, q, dkdv_config)
    if dq is not None:
        _launch_bwd("dq", (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                           *dq.stride(), *sizes), meta, B * H, q, dq_config)
    if staged:
        for out, g in zip(outputs, grads):
            if out is not None and out is not g:
                out.copy_(g)
        return outputs
    return dq, dk, dv


def _empty_rows(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, T, D) tensor of like's dtype whose rows start on 16 bytes: 16-bit rows of D
    elements that are not a whole number of 16 bytes are padded (it is then a view of the first D
    columns; the kernels mask features >= D, so the padding is never read)."""
    D = shape[3]
    vec = 16 // like.element_size()
    width = D if like.dtype == torch.float32 else -(-D // vec) * vec
    return torch.empty((*shape[:3], width), dtype=like.dtype, device=like.device)[..., :D]


def _staged(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """t itself when its rows load as 128-bit vectors, else a row-aligned stand-in (t's values copied in
    when `copy`)."""
    if _aligned(t):
        return t
    buf = _empty_rows(tuple(t.shape), t)
    return buf.copy_(t) if copy else buf


# -------------------------------------------------------------------------------------------- autograd
def _on_device(t: torch.Tensor):
    """Launch on the tensor's CUDA device (the backward may run on another thread's current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _FlashAttention(torch.autograd.Function):
    """o = attention(q, k, v). Saves q, k, v, o and the (B, H, Tq) fp32 log-sum-exp; the backward
    recomputes P block by block from them, so no (Tq, Tk) tensor is ever kept."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float):
        o, lse = flash_attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no backward of their own
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        with _on_device(q):
            dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, causal=ctx.causal, softmax_scale=ctx.softmax_scale,
                                             need_dq=ctx.needs_input_grad[0])
        return dq, dk, dv, None, None


class _FlashAttentionFusedQKV(torch.autograd.Function):
    """The same op when q, k, v are the three (B, H, T, D) views of one (B, T, 3, H, D) tensor qkv (the
    model's projection, see _fused_qkv_base). Autograd sees qkv itself as the input, and the backward
    writes dq, dk, dv into the matching views of one buffer shaped like qkv: its gradient arrives whole,
    without the copy that stacking three separate gradients back through unbind would cost."""

    @staticmethod
    def forward(ctx, qkv, view, causal: bool, softmax_scale: float):
        q, k, v = _views_of(qkv, view)
        o, lse = flash_attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
        ctx.save_for_backward(qkv, o, lse)
        ctx.view, ctx.causal, ctx.softmax_scale = view, causal, softmax_scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        with _on_device(qkv):
            flash_attention_bwd(do, *_views_of(qkv, ctx.view), o, lse, causal=ctx.causal,
                                softmax_scale=ctx.softmax_scale, grads=_views_of(dqkv, ctx.view))
        return dqkv, None, None, None


def _views_of(base: torch.Tensor, view: tuple):
    """The q, k, v views (shape, stride, element offsets from base's start) of a contiguous base."""
    shape, stride, offsets = view
    return tuple(base.as_strided(shape, stride, base.storage_offset() + off) for off in offsets)


def _fused_qkv_base(q, k, v):
    """The tensor qkv when q, k, v are exactly qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4) unbound
    (q, k, v in that order), contiguous and nothing more, and all three are differentiable views of it
    (grad_fn set: their gradient reaches qkv through view ops alone); else None. The three views then
    cover every element of qkv once, so a buffer shaped like it is fully written by dq, dk, dv."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.requires_grad:
        return None
    if any(t.grad_fn is None for t in (q, k, v)) or not base.is_contiguous():
        return None
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or base.numel() != 3 * B * T * H * D:
        return None
    want = (T * 3 * H * D, D, 3 * H * D, 1)
    for i, t in enumerate((q, k, v)):
        if any(n > 1 and st != w for n, st, w in zip(t.shape, t.stride(), want)):
            return None
        if t.storage_offset() - base.storage_offset() != i * H * D:
            return None
    return base


def flash_attention(q, k, v, *, causal: bool, softmax_scale: float) -> torch.Tensor:
    """The Triton path of kernels.flash_attention (validated there): q (B, H, Tq, D), k/v (B, H, Tk, D)
    -> o (B, H, Tq, D). The plain forward when autograd records nothing; else the differentiable op,
    through the fused-qkv form when q, k, v are views of one projection."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return flash_attention_fwd(q, k, v, causal=causal, softmax_scale=softmax_scale)
    qkv = _fused_qkv_base(q, k, v)
    if qkv is not None:
        view = (tuple(q.shape), tuple(q.stride()), tuple(t.storage_offset() - qkv.storage_offset() for t in (q, k, v)))
        return _FlashAttentionFusedQKV.apply(qkv, view, causal, softmax_scale)
    return _FlashAttention.apply(q, k, v, causal, softmax_scale)


def compile_specs() -> list[KernelSpec]:
    """Every config of every list at its heaviest head dim (the most registers and shared memory),
    in both causal modes and both 16-bit dtypes between them, plus the small and padded head dims."""

    def spec(cfg, dtype, d, causal, aligned=True, lse=False, unit_d=True, archs=(90, 80)):
        sig = {name: "*" + dtype for name in ("Q", "K", "V", "O")}
        sig["LSE"] = "*fp32"
        for t in "qkvo":
            for dim in ("b", "h", "m" if t in "qo" else "n"):
                sig[f"stride_{t}{dim}"] = "i32"
            # a launch specialises a unit stride to the constant 1; o's always is
            sig[f"stride_{t}d"] = "constexpr" if unit_d or t == "o" else "i32"
        sig.update(H="i32", T_Q="i32", T_K="i32", qk_scale="fp32")
        constexprs = {f"stride_{t}d": 1 for t in "qkvo" if sig[f"stride_{t}d"] == "constexpr"}
        constexprs.update(HEAD_DIM=d, BLOCK_D=head_dim_block(d), IS_CAUSAL=causal,
                          STORE_LSE=lse, ALIGNED=aligned, **cfg.kwargs)
        sig.update({name: "constexpr" for name in ("HEAD_DIM", "BLOCK_D", "IS_CAUSAL", "STORE_LSE",
                                                   "ALIGNED", "BLOCK_M", "BLOCK_N")})
        name = (f"flash_fwd M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} D{d} {dtype}"
                + " causal" * causal + " unaligned" * (not aligned) + " strided-d" * (not unit_d) + " lse" * lse)
        return KernelSpec(name=name, fn=_attn_fwd, signature=sig, constexprs=constexprs,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          expect_mma=dtype != "fp32", expect_v4_loads=aligned, archs=archs)

    c1, c2, c3, c4, c5, c6 = CONFIGS_16
    (u1,), (f1, f2) = CONFIGS_UNALIGNED, CONFIGS_32
    hopper = (90,)  # _prune keeps these off sm_80 (accumulator registers or shared memory)
    forward = [
        spec(c1, "fp16", 64, True), spec(c1, "bf16", 128, False, archs=hopper),
        spec(c2, "bf16", 64, True), spec(c2, "fp16", 128, True, archs=hopper),
        spec(c3, "fp16", 64, False, archs=hopper), spec(c3, "fp16", 32, False),
        spec(c4, "fp16", 128, False, archs=hopper), spec(c4, "fp16", 64, True), spec(c4, "fp16", 16, True),
        spec(c5, "fp16", 128, True, archs=hopper), spec(c5, "bf16", 64, False),
        spec(c6, "fp16", 128, True),
        # padded head dim (BLOCK_D 128, masked feature loads) with the log-sum-exp store
        spec(c2, "fp16", 80, True, lse=True, archs=hopper), spec(c6, "bf16", 80, True, lse=True),
        spec(u1, "fp16", 128, True, aligned=False), spec(u1, "bf16", 64, False, aligned=False),
        spec(u1, "fp16", 128, False, aligned=False, unit_d=False),  # q/k/v transposed in their last dims
        spec(f1, "fp32", 128, True), spec(f1, "fp32", 128, False, aligned=False),
        spec(f2, "fp32", 128, True, lse=True),
    ]
    return forward + _backward_compile_specs()


_BWD_KERNELS = {  # name -> (kernel, its tensors in argument order)
    "dkdv": (_attn_bwd_dkdv, ("q", "k", "v", "do", "dk", "dv")),
    "dq": (_attn_bwd_dq, ("q", "k", "v", "do", "dq")),
}


def _backward_compile_specs() -> list[KernelSpec]:
    """Every backward config at the largest head dim its table row admits on each architecture (what
    _bwd_prune lets run there), causal (both loops), alternating the 16-bit dtypes; plus a non-causal
    padded head dim, fp32 unaligned and feature-strided variants, and the preprocess."""

    def spec(kernel, cfg, dtype, d, causal=True, aligned=True, unit_d=True, archs=(90, 80)):
        fn, tensors = _BWD_KERNELS[kernel]
        sig = {t.upper(): "*" + dtype for t in tensors}
        sig.update(LSE="*fp32", DELTA="*fp32")
        constexprs = {}
        for t in tensors:
            for dim in ("b", "h", "m" if t in ("q", "do", "dq") else "n"):
                sig[f"stride_{t}{dim}"] = "i32"
            # a launch specialises a unit stride to the constant 1; the gradients' always is
            if unit_d or t.startswith("d"):
                sig[f"stride_{t}d"] = "constexpr"
                constexprs[f"stride_{t}d"] = 1
            else:
                sig[f"stride_{t}d"] = "i32"
        sig.update(H="i32", T_Q="i32", T_K="i32", qk_scale="fp32", sm_scale="fp32")
        constexprs.update(HEAD_DIM=d, BLOCK_D=head_dim_block(d), IS_CAUSAL=causal,
                          ALIGNED=aligned, **cfg.kwargs)
        sig.update({name: "constexpr" for name in ("HEAD_DIM", "BLOCK_D", "IS_CAUSAL", "ALIGNED", "BLOCK_M",
                                                   "BLOCK_N")})
        name = (f"flash_bwd_{kernel} M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} D{d} {dtype}"
                + " causal" * causal + " unaligned" * (not aligned) + " strided-d" * (not unit_d))
        return KernelSpec(name=name, fn=fn, signature=sig, constexprs=constexprs,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          expect_mma=dtype != "fp32", expect_v4_loads=aligned, archs=archs)

    specs = []
    for kernel in ("dkdv", "dq"):
        lists = _BWD_LISTS[kernel]
        for kind, dtypes in (("16", ("fp16", "bf16")), ("32", ("fp32",))):
            # 16-bit rows are always aligned (staged otherwise); fp32 runs both ways: dK/dV's compile
            # aligned, dQ's unaligned (and feature-strided, below)
            aligned = kind == "16" or kernel == "dkdv"
            for i, cfg in enumerate(lists[kind]):
                dtype, reach = dtypes[i % len(dtypes)], _BWD_REACH[id(cfg)]
                if reach[9] == reach[8]:
                    specs.append(spec(kernel, cfg, dtype, reach[9], aligned=aligned))
                else:
                    specs += [spec(kernel, cfg, dtype, d, aligned=aligned, archs=(arch,))
                              for arch, d in ((90, reach[9]), (80, reach[8])) if d]
        # a padded head dim (BLOCK_D 128, masked feature loads), non-causal, on the fallback config
        specs.append(spec(kernel, lists["16"][-1], "bf16", 80, causal=False))
    # fp32 q/k/v transposed in their last dims (feature stride not 1)
    specs.append(spec("dq", DQ_CONFIGS_32[0], "fp32", 128, aligned=False, unit_d=False, archs=(90,)))

    def preprocess(dtype, d, aligned=True, unit_d=True):
        sig = {"O": "*" + dtype, "DO": "*" + dtype, "DELTA": "*fp32"}
        for t in ("o", "do"):
            sig.update({f"stride_{t}b": "i32", f"stride_{t}h": "i32", f"stride_{t}m": "i32"})
            sig[f"stride_{t}d"] = "constexpr" if unit_d or t == "o" else "i32"
        sig.update(H="i32", T_Q="i32", HEAD_DIM="constexpr", BLOCK_D="constexpr", ALIGNED="constexpr",
                   BLOCK_M="constexpr")
        block_d = head_dim_block(d)
        constexprs = {f"stride_{t}d": 1 for t in ("o", "do") if sig[f"stride_{t}d"] == "constexpr"}
        constexprs.update(HEAD_DIM=d, BLOCK_D=block_d, ALIGNED=aligned, BLOCK_M=max(16, 4096 // block_d))
        name = f"flash_bwd_preprocess D{d} {dtype}" + " unaligned" * (not aligned) + " strided-d" * (not unit_d)
        return KernelSpec(name=name, fn=_attn_bwd_preprocess, signature=sig, constexprs=constexprs, num_warps=4,
                          num_stages=1, expect_v4_loads=aligned)

    return specs + [preprocess("bf16", 128), preprocess("fp32", 33, aligned=False, unit_d=False)]
