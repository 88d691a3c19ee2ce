"""GPT-2's MLP as two GEMMs with fused epilogues, forward and backward.

Forward:
    z = x @ W_fc.T + b_fc                              (M, F), F = 4C: the pre-activation
    g = gelu_tanh(z)                                   (M, F), stored once in the compute dtype
    y = dropout(g @ W_proj.T + b_proj) (+ residual)    (M, C_out)
    gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))      (GPT-2's "gelu_new")
                 = z * sigmoid(2u),  u = sqrt(2/pi) (z + 0.044715 z^3)

The second form needs one exp and has no cancellation; evaluating the sigmoid from exp(-2|u|) only, it
never overflows and saturates to z (z -> +inf) and -0 (z -> -inf). Everything accumulates in fp32; each
output is cast once.

Backward, for the incoming gradient dy:
    d_out   = dy * keep / (1 - p)                      (dy itself without dropout)
    dz      = (d_out @ W_proj) * gelu'(z)              one GEMM with dGELU in its epilogue, which also
                                                       writes g = gelu(z) for the product below
    dW_proj = d_out.T @ g        db_proj = sum over rows of d_out
    dx      = dz @ W_fc          dW_fc   = dz.T @ x        db_fc = sum over rows of dz
    d residual = dy
    gelu'(z) = s + z s (1 - s) d(2u)/dz,   s = sigmoid(2u),   d(2u)/dz = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2)
Weight gradients are written in the weights' own dtype (fp32 master weights get fp32 gradients straight
from the fp32 accumulator), bias gradients are fp32 sums.

What the forward keeps for the backward when autograd records it: x (C values per token) and the
pre-activation z (F = 4C) in the compute dtype, plus the dropout seed: 5C values, 10C bytes in bf16, i.e.
7.5 KB per token and layer at C = 768. g is not kept: the dz GEMM recomputes it from z in its epilogue,
where z is read anyway. (Eager PyTorch keeps x, z and g: 9C values.) Under autocast the bf16 copies of
the two weight matrices are kept as well, as autocast's own matmuls keep theirs.

Dropout (training with resid_pdrop > 0) sits in the second GEMM's epilogue, before the residual add,
so the add stays fused. The mask is never stored: each element's keep bit is one Philox draw keyed by a
seed (drawn from torch's CPU generator, so a checkpoint's RNG state fixes it) and counted by the
element's linear index, and the backward regenerates it.

Memory traffic saved against eager PyTorch (linear, gelu, linear, add), per token: the GELU pass (read +
write of the 4C pre-activation, 8C element moves) and, in the residual add, the write and re-read of y
(2C); and one rounding of h and of y instead of two each. Two launches (three or four under split-K)
instead of four. In the backward the dGELU pass (read z and dg, write dz: 12C moves) and g's storage.

One generic kernel, ``_linear_kernel``, computes epilogue(x @ W.T) for x (M, K) and W (N, K), each read
through two strides with a unit stride either along K (nn.Linear's layouts, the forward) or along its
other dim (X_T / W_T: the transposed views of the backward, e.g. d_out.T or W_fc.T): no operand is ever
copied into another layout. Two regimes:

* prefill (M > 64): large tiles (Hopper wgmma needs 64-row warpgroup tiles), grouped ("swizzled") tile
  order so that GROUP_M row-tiles sweep the same weight columns while they sit in L2.
* decode (M <= 64): 16-row tiles, and split-K when the (M, N) tiles alone cannot fill the GPU: each of
  SPLITS programs per tile reduces a K_PER_SPLIT slice into an fp32 workspace, and
  ``_splitk_epilogue_kernel`` sums the slices and applies the same epilogue. The weights are then
  streamed once by enough programs to reach the memory bandwidth. Weight gradients (K = the tokens,
  thousands; an output as small as a weight) split K the same way.

On CUDA the tile config is autotuned from the small explicit lists below (one autotuner per regime,
power-of-two M bucket and operand layout, keyed on N, K and the K slice); under TRITON_INTERPRET=1 (CPU
tests) the plain jit kernel is launched with an explicit config, so the tests can walk every config. The
ALIGNED variant restates, as hints, the alignment Triton's launch-time specialisation sees for the GPT-2
sizes, so that kernels.compile_report (which compiles without that specialisation) reports the code a
launch runs.

Sources (ideas, no code): the Triton matrix-multiplication tutorial (grouped ordering, wrapped row/column
offsets so that only the store is masked); split-K GEMM as in CUTLASS; Hendrycks & Gimpel, "Gaussian Error
Linear Units" and OpenAI's GPT-2 for the tanh approximation; Salmon et al., "Parallel random numbers: as
easy as 1, 2, 3" (Philox, counter-based, so a mask can be regenerated instead of stored).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._device import sm_count
from kernels.compile_report import KernelSpec


@triton.jit
def _gelu_tanh(z):
    # z * sigmoid(t * ln 2), t = 2u / ln 2 (2 * sqrt(2/pi) * log2(e) = 2.302208198). exp2 only ever sees
    # -|t|, so nothing overflows: sigmoid = 1 / (1 + e) for t >= 0 and e / (1 + e) below, e = 2^-|t|.
    t = z * (2.302208198 + 0.102943239 * z * z)
    e = tl.exp2(-tl.abs(t))
    return z * tl.where(t >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _gelu_tanh_grad(z):
    # d/dz [z s(t ln 2)] = s + z s (1 - s) ln2 dt/dz,  dt/dz = 2.302208198 + 3 * 0.102943239 z^2, with
    # s (1 - s) = e / (1 + e)^2 from the same e = 2^-|t| (no cancellation). Where e underflows the second
    # term is exactly 0 (and z * dt/dz may be huge: the where keeps inf * 0 out).
    t = z * (2.302208198 + 0.102943239 * z * z)
    e = tl.exp2(-tl.abs(t))
    s = tl.where(t >= 0, 1.0, e) / (1.0 + e)
    ds = e / ((1.0 + e) * (1.0 + e)) * (0.6931471805599453 * (2.302208198 + 0.308829717 * z * z))
    return s + tl.where(e > 0, z * ds, 0.0)


@triton.jit
def _dropout_keep(seed, offs_m, offs_n, N, dropout_p):
    # One Philox draw per element: counter = the element's linear index in the (M, N) output (low and high
    # 32 bits), key = seed. Tile shapes do not enter, so the backward's kernel draws the same bits.
    idx = offs_m[:, None] * N + offs_n[None, :]  # int64
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, lo, hi, 0, 0)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _row_ptrs(Base, offs_m, offs_n, stride_m, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = Base + offs_m[:, None] * stride_m + offs_n[None, :]
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, BLOCK_N])
    return ptrs


@triton.jit
def _tile_masks(offs_m, offs_n, M, N, ALIGNED: tl.constexpr):
    n_mask = offs_n < N
    if ALIGNED:  # N % 16 == 0: the mask is constant over 16-column groups, so accesses stay vectorized
        n_mask = tl.max_constancy(n_mask, [16])
    return n_mask, (offs_m < M)[:, None] & n_mask[None, :]


@triton.jit
def _epilogue(acc, Bias, Res, Z, G, offs_m, offs_n, n_mask, mask, N, stride_rm, stride_zm, seed, dropout_p,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
              DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    # acc (+ bias) -> [z stored] -> gelu | dgelu -> dropout -> (+ residual)
    if HAS_BIAS:
        bias_ptrs = Bias + offs_n
        if ALIGNED:
            bias_ptrs = tl.max_contiguous(tl.multiple_of(bias_ptrs, [16]), [BLOCK_N])
        bias = tl.load(bias_ptrs, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if ACTIVATION == "gelu_tanh":
        if STORE_PREACT:  # the backward's z
            tl.store(_row_ptrs(Z, offs_m, offs_n, stride_zm, BLOCK_N, ALIGNED), acc.to(Z.dtype.element_ty), mask=mask)
        acc = _gelu_tanh(acc)
    elif ACTIVATION == "dgelu_tanh":  # acc = dg: dz = dg * gelu'(z), and g = gelu(z) for dW_proj
        z = tl.load(_row_ptrs(Z, offs_m, offs_n, stride_zm, BLOCK_N, ALIGNED), mask=mask, other=0.0).to(tl.float32)
        tl.store(_row_ptrs(G, offs_m, offs_n, stride_zm, BLOCK_N, ALIGNED), _gelu_tanh(z).to(G.dtype.element_ty),
                 mask=mask)
        acc = acc * _gelu_tanh_grad(z)
    if DROPOUT:
        keep = _dropout_keep(seed, offs_m, offs_n, N, dropout_p)
        acc = tl.where(keep, acc * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RESIDUAL:
        r = tl.load(_row_ptrs(Res, offs_m, offs_n, stride_rm, BLOCK_N, ALIGNED), mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    return acc


@triton.jit
def _finish_tile(acc, Bias, Res, Y, Z, G, offs_m, offs_n, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
                 DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    # EPILOGUE: bias, activation, dropout, residual, cast, store. Otherwise store the raw fp32 partial sum.
    n_mask, mask = _tile_masks(offs_m, offs_n, M, N, ALIGNED)
    if EPILOGUE:
        acc = _epilogue(acc, Bias, Res, Z, G, offs_m, offs_n, n_mask, mask, N, stride_rm, stride_zm, seed,
                        dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, BLOCK_N, ALIGNED)
    tl.store(_row_ptrs(Y, offs_m, offs_n, stride_ym, BLOCK_N, ALIGNED), acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """The left and right column halves of a (BLOCK_M, 2 * HALF) register tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))


@triton.jit
def _finish_cols(acc, col0, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
                 DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr,
                 WIDTH: tl.constexpr, ALIGNED: tl.constexpr):
    """_finish_tile for the WIDTH columns from col0 on."""
    _finish_tile(acc, Bias, Res, Y, Z, G, offs_m, col0 + tl.arange(0, WIDTH), M, N, stride_rm, stride_ym,
                 stride_zm, seed, dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE,
                 WIDTH, ALIGNED)


@triton.jit
def _linear_kernel(
    X, W, Bias, Res, Y, Z, G,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_ys, stride_ym, stride_zm,
    seed, dropout_p,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    X_T: tl.constexpr, W_T: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Y = epilogue(X @ W.T); X (M, K), W (N, K), each with a unit stride along K, or (X_T / W_T) along M / N.
    # EPILOGUE=False: store the fp32 partial sum of K-slice program_id(1) at Y + pid_k * stride_ys instead.
    # ALIGNED: the launcher checked what Triton's launch-time specialisation would see (16-byte aligned
    # pointers; N, K, K_PER_SPLIT, the non-unit strides and, for X_T, M multiples of 16). Stating it here
    # makes an ahead-of-time compile (kernels.compile_report) produce the same vectorized, cp.async-
    # pipelined code as a launch.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles walk the same column-tiles back to back, so their weight tiles are reused from L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped rows/columns keep the operand loads unmasked along M and N (only K is ragged); the
    # duplicated rows/columns are dropped by the masked store. (With M % 16 == 0, as ALIGNED demands of
    # a column-major X, a wrap never splits a 16-row group.)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if ALIGNED and X_T:  # the K step of a column-major operand keeps each pointer 16-byte aligned
        stride_xk = tl.multiple_of(stride_xk, 16)
    if ALIGNED and W_T:
        stride_wk = tl.multiple_of(stride_wk, 16)
    a_ptrs = X + offs_am[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
    b_ptrs = W + offs_bn[None, :] * stride_wn + (k_lo + offs_k)[:, None] * stride_wk
    if ALIGNED:
        if X_T:
            a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [16, 1])
        else:
            a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [1, BLOCK_K])
        if W_T:
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [1, 16])
        else:
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [BLOCK_K, 1])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        # Mask against K, not k_hi: K - k keeps K's divisibility, so the masked loads stay vectorized.
        # (K_PER_SPLIT is a multiple of BLOCK_K, so a tile never crosses into the next slice.)
        k_rem = K - k
        if ALIGNED:
            k_rem = tl.multiple_of(k_rem, 16)
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_rem, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_rem, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    Y += pid_k.to(tl.int64) * stride_ys
    col0 = pid_n.to(tl.int64) * BLOCK_N
    if EPILOGUE and (ACTIVATION == "dgelu_tanh" or DROPOUT or STORE_PREACT):
        # The training epilogues (a second tile read or written, Philox's state) finish the tile in four
        # column quarters, so that their temporaries fit beside the accumulators (no spills).
        Q: tl.constexpr = BLOCK_N // 4
        h0, h1 = _halves(acc, BLOCK_M, BLOCK_N // 2)
        q0, q1 = _halves(h0, BLOCK_M, Q)
        q2, q3 = _halves(h1, BLOCK_M, Q)
        _finish_cols(q0, col0, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                     HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, Q, ALIGNED)
        _finish_cols(q1, col0 + Q, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed,
                     dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, Q, ALIGNED)
        _finish_cols(q2, col0 + 2 * Q, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed,
                     dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, Q, ALIGNED)
        _finish_cols(q3, col0 + 3 * Q, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed,
                     dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, Q, ALIGNED)
    elif BLOCK_M * BLOCK_N >= 128 * 256:
        # Finish the tile in two column halves: the residual/bias tiles of one half at a time fit in
        # the registers left next to the 128 accumulators per thread (no spills).
        H: tl.constexpr = BLOCK_N // 2
        h0, h1 = _halves(acc, BLOCK_M, H)
        _finish_cols(h0, col0, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                     HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, H, ALIGNED)
        _finish_cols(h1, col0 + H, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed,
                     dropout_p, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, H, ALIGNED)
    else:
        _finish_cols(acc, col0, Bias, Res, Y, Z, G, offs_m, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                     HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, EPILOGUE, BLOCK_N, ALIGNED)


@triton.jit
def _splitk_epilogue_kernel(
    P, Bias, Res, Y, Z, G,
    M, N, SPLITS,
    stride_ps, stride_pm, stride_rm, stride_ym, stride_zm, seed, dropout_p,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Y = epilogue(sum_s P[s]) over one (BLOCK_M, BLOCK_N) tile; P is the fp32 (SPLITS, M, N) workspace.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    _, mask = _tile_masks(offs_m, offs_n, M, N, ALIGNED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, SPLITS):
        # The slice offset goes into the base pointer, so the hinted row pointers stay 16-byte aligned.
        acc += tl.load(_row_ptrs(P, offs_m, offs_n, stride_pm, BLOCK_N, ALIGNED), mask=mask, other=0.0)
        P += stride_ps
    _finish_tile(acc, Bias, Res, Y, Z, G, offs_m, offs_n, M, N, stride_rm, stride_ym, stride_zm, seed, dropout_p,
                 HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, HAS_RESIDUAL, True, BLOCK_N, ALIGNED)


@triton.jit
def _dropout_bwd_kernel(DY, DX, M, N, stride_dym, stride_dxm, seed, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx = dy * keep / (1 - p), keep regenerated from (seed, row, column) as the forward's epilogue drew it.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    keep = _dropout_keep(seed, offs_m, offs_n, N, dropout_p)
    dx = tl.where(keep, dy * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_n[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launcher
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Large M: 64/128-row tiles so that sm_90 uses wgmma (a warpgroup owns 64 rows); 128x256 with 8 warps is
# the compute-bound workhorse, the smaller ones keep >= 1 wave of programs for N = 768 at moderate M.
# (128x128 with 4 warps was dropped: 128 fp32 accumulators per thread spill on sm_80.)
PREFILL_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
]
# Register-heavy variants choose among fewer tiles (kernels.compile_report shows the others spilling):
# dGELU and dropout epilogues (a second tile read and written; Philox's state) take 128 x 128 with 8 warps
# (128 x 256 spills on both archs even when finished in quarters, the 4-warp tiles by 8 bytes on sm_80
# under Triton 3.6); weight gradients, with both operands column-major, all but 128 x 256 (which spills on
# sm_80 under Triton 3.6).
HEAVY_EPILOGUE_CONFIGS = [PREFILL_CONFIGS[1]]
TRANSPOSED_CONFIGS = PREFILL_CONFIGS[1:]
# M <= 64: the weights dominate the traffic. Narrow tiles and deep K steps put many programs on the
# weight stream; BLOCK_M 64 covers M in 33..64 with one row-tile.
DECODE_CONFIGS = [
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 32, 128, 4, 4),
    _cfg(16, 128, 128, 4, 3),
    _cfg(64, 64, 128, 4, 3),
]
_DECODE_MAX_M = 64
_SPLIT_ALIGN = 128  # K slices are multiples of every decode BLOCK_K, so no tile straddles two slices
_SPLIT_MIN_K = 256  # below this a slice is too short to amortise its partial-sum write
_WGRAD_MIN_K = 1024  # a weight-gradient slice: tokens per slice, enough to amortise the fp32 workspace
_EPI_BLOCK_M, _EPI_BLOCK_N, _EPI_WARPS = 8, 256, 4
_DROP_BLOCK_M, _DROP_BLOCK_N, _DROP_WARPS = 16, 256, 4
_ACTIVATIONS = (None, "gelu_tanh")  # what linear_fwd offers; the backward's "dgelu_tanh" is internal


def _regime(M: int) -> str:
    return "decode" if M <= _DECODE_MAX_M else "prefill"


def _m_bucket(M: int) -> int:
    return max(16, min(triton.next_power_of_2(M), 16384))


def _k_per_split(M: int, N: int, K: int, num_sms: int) -> int:
    """Decode split-K: double the slices until ~2 programs per SM, keeping slices >= _SPLIT_MIN_K long."""
    tiles = triton.cdiv(M, 16) * triton.cdiv(N, 64)
    splits = 1
    while tiles * splits < 2 * num_sms and K >= 2 * splits * _SPLIT_MIN_K:
        splits *= 2
    return K if splits == 1 else triton.cdiv(triton.cdiv(K, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN


def _weight_grad_splits(M: int, N: int, K: int, num_sms: int) -> int:
    """A weight gradient (M, N) = (out, in) reduces over K = the tokens: a gpt2 MLP's 768 x 3072 is 144
    tiles of 128 x 128, barely one wave on 132 SMs, while K = 8192. Double the K slices until ~2 waves,
    keeping >= _WGRAD_MIN_K tokens per slice."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    splits = 1
    while tiles * splits < 2 * num_sms and K >= 2 * splits * _WGRAD_MIN_K:
        splits *= 2
    return splits


def _configs(regime: str, heavy: bool, both_transposed: bool) -> list:
    if regime == "decode":
        return DECODE_CONFIGS
    if heavy:
        return HEAVY_EPILOGUE_CONFIGS
    return TRANSPOSED_CONFIGS if both_transposed else PREFILL_CONFIGS


@functools.cache
def _autotuned(regime: str, m_bucket: int, x_t: bool, w_t: bool, heavy: bool):
    # One autotuner per (regime, M bucket, operand layout, epilogue weight): Triton keys only on kernel
    # arguments, and M itself would re-tune for every prompt length; a transposed operand wants its own
    # choice. All of them share the jit function's compiled binaries.
    configs = _configs(regime, heavy, x_t and w_t)
    return triton.autotune(configs=configs, key=["N", "K", "K_PER_SPLIT"])(_linear_kernel)


def _operand(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(t, transposed): t as it is when one of its two dims has unit stride, else a row-major copy."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t, False
    if t.stride(0) == 1 or t.shape[0] == 1:
        return t, True
    return t.contiguous(), False


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def gemm(a, w, y, *, bias=None, residual=None, activation: str | None = None, z=None, g=None,
         dropout: tuple[int, float] | None = None, config: triton.Config | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """y (M, N) <- epilogue(a @ w.T) in one GEMM launch (plus a small reduce under split-K); returns y.

    a: (M, K) and w: (N, K), each with a unit stride along K (nn.Linear layouts) or along its other dim
    (a transposed view such as d_out.t(), read in place); other layouts are copied once. y: (M, N) with a
    unit column stride, any float dtype (the fp32 accumulator is cast once on store). The epilogue, in
    order: + bias (N,); activation None, "gelu_tanh" (with z (M, N): the pre-activation is stored there
    too) or "dgelu_tanh" (y = acc * gelu'(z) for z (M, N) read, and gelu(z) written to g (M, N), z's
    strides); dropout = (seed, p); + residual (M, N), which may be y itself (accumulate in place).
    config / split_k pin a tile config and the number of K slices (tests); by default the regime's list
    is autotuned on CUDA and its first config runs under the interpreter.
    """
    M, K = a.shape
    N = w.shape[0]
    if tuple(w.shape) != (N, K):
        raise ValueError(f"weight must have shape (N, {K}), got {tuple(w.shape)}")
    if tuple(y.shape) != (M, N) or (y.stride(1) != 1 and N > 1):
        raise ValueError(f"y must be ({M}, {N}) with unit column stride, got {tuple(y.shape)} {y.stride()}")
    if a.dtype == torch.bfloat16 and not a.is_cuda:
        raise NotImplementedError("bf16 GEMMs need a GPU: Triton's interpreter computes bf16 tl.dot wrongly "
                                  "(triton-lang/triton#11584); use fp16 or fp32 on CPU")
    if M == 0 or N == 0:
        return y
    a, x_t = _operand(a)
    w, w_t = _operand(w)
    res = _unit_cols(residual) if residual is not None else y  # y: never read when HAS_RESIDUAL is False
    in_place = residual is not None and res.data_ptr() == y.data_ptr()
    if z is not None:
        z = _unit_cols(z)
    if g is not None and g.stride() != z.stride():
        raise ValueError("g must have z's strides")
    zz, gg = (z if z is not None else y), (g if g is not None else y)  # never touched unless asked for
    b = bias if bias is not None else y  # never read: HAS_BIAS is False
    seed, p = dropout if dropout is not None else (0, 0.0)

    regime = _regime(M)
    if split_k is not None:
        align = config.kwargs["BLOCK_K"] if config is not None else _SPLIT_ALIGN
        k_per_split = triton.cdiv(triton.cdiv(K, max(1, split_k)), align) * align
    elif regime == "decode":
        k_per_split = _k_per_split(M, N, K, sm_count(a.device))
    else:
        k_per_split = K
    k_per_split = max(k_per_split, 1)
    splits = triton.cdiv(K, k_per_split) if K > 0 else 1
    if config is not None and splits > 1 and k_per_split % config.kwargs["BLOCK_K"]:
        raise ValueError(f"K_PER_SPLIT={k_per_split} is not a multiple of BLOCK_K={config.kwargs['BLOCK_K']}")

    out = y if splits == 1 else torch.empty((splits, M, N), device=a.device, dtype=torch.float32)
    strides = (a.stride(0), a.stride(1), w.stride(0), w.stride(1), res.stride(0),
               out.stride(0) if splits > 1 else 0, out.stride(-2), zz.stride(0))
    args = (a, w, b, res, out, zz, gg, M, N, K, k_per_split, *strides, seed, p)
    # What Triton's launch-time specialisation checks (16-byte pointers, integers divisible by 16): here
    # of every stride but the unit ones, and of M too where it is a column-major operand's contiguous dim.
    unit_strides = (0 if x_t else 1, 2 if w_t else 3)
    ints = [v for i, v in enumerate(strides) if i not in unit_strides] + [N, K, k_per_split] + ([M] if x_t else [])
    aligned = (all(t.data_ptr() % 16 == 0 for t in (a, w, b, res, out, y, zz, gg))
               and all(v % 16 == 0 for v in ints))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation or "none",
                STORE_PREACT=activation == "gelu_tanh" and z is not None, DROPOUT=dropout is not None,
                HAS_RESIDUAL=residual is not None, EPILOGUE=splits == 1,
                DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", X_T=x_t, W_T=w_t, ALIGNED=aligned)

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), splits)

    # An in-place accumulation must run once: the autotuner would time it several times over the same
    # output, so it runs a fixed config (under split-K only the reduce, never tuned, touches y).
    heavy = activation == "dgelu_tanh" or dropout is not None
    if config is None and a.is_cuda and not (in_place and splits == 1):
        _autotuned(regime, _m_bucket(M), x_t, w_t, heavy)[grid](*args, **meta)
    else:
        if config is None:
            config = _configs(regime, heavy, x_t and w_t)[0]
        _linear_kernel[grid](*args, **meta, **config.kwargs,
                             num_warps=config.num_warps, num_stages=config.num_stages)

    if splits > 1:
        epi_grid = (triton.cdiv(M, _EPI_BLOCK_M), triton.cdiv(N, _EPI_BLOCK_N))
        _splitk_epilogue_kernel[epi_grid](
            out, b, res, y, zz, gg, M, N, splits, out.stride(0), out.stride(1), res.stride(0), y.stride(0),
            zz.stride(0), seed, p,
            **{k: meta[k] for k in ("HAS_BIAS", "ACTIVATION", "STORE_PREACT", "DROPOUT", "HAS_RESIDUAL", "ALIGNED")},
            BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N, num_warps=_EPI_WARPS)
    return y


def linear_fwd(x, weight, bias=None, *, activation: str | None = None, residual=None, out_dtype=None,
               save_preact: bool = False, dropout: tuple[int, float] | None = None,
               config: triton.Config | None = None, split_k: int | None = None):
    """act(x @ weight.T + bias) [dropout] (+ residual) in one GEMM launch (plus a small reduce under split-K).

    x: (..., K), unit stride along K (copied once otherwise); weight: (N, K) (nn.Linear), any two strides
    with one of them 1; bias: (N,) or None; activation: None or "gelu_tanh"; dropout: None or (seed, p);
    residual: None or (..., N). Returns (..., N) in out_dtype (default x's dtype); with save_preact
    (needs "gelu_tanh") also the pre-activation x @ weight.T + bias, (..., N) in x's dtype.
    config / split_k: see ``gemm``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if save_preact and activation != "gelu_tanh":
        raise ValueError("save_preact needs activation='gelu_tanh'")
    K = x.shape[-1]
    N = weight.shape[0]
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"weight must have shape (N, {K}), got {tuple(weight.shape)}")
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    x2 = _unit_cols(x.reshape(M, K))
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    z = torch.empty((M, N), device=x.device, dtype=x.dtype) if save_preact else None
    res = residual.reshape(M, N) if residual is not None else None
    gemm(x2, weight, y, bias=bias, residual=res, activation=activation, z=z, dropout=dropout,
         config=config, split_k=split_k)
    y = y.reshape(*lead, N)
    return (y, z.reshape(*lead, N)) if save_preact else y


def gelu_mlp_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, *, residual=None,
                 dropout: tuple[int, float] | None = None, out_dtype=None, save_preact: bool = False,
                 config: triton.Config | None = None, split_k: int | None = None):
    """gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias [dropout] (+ residual): two GEMMs.

    x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C_out, F); proj_bias: (C_out,), weights
    in x's dtype; residual: None or (..., C_out), any float dtype. Returns (..., C_out) in out_dtype
    (default x's dtype); with save_preact also z (..., F), the pre-activation, in x's dtype.
    config / split_k are passed to both GEMMs (tests); see ``gemm``.
    """
    h = linear_fwd(x, fc_weight, fc_bias, activation="gelu_tanh", save_preact=save_preact, config=config,
                   split_k=split_k)
    g, z = h if save_preact else (h, None)
    y = linear_fwd(g, proj_weight, proj_bias, residual=residual, out_dtype=out_dtype, dropout=dropout,
                   config=config, split_k=split_k)
    return (y, z) if save_preact else y


def dropout_bwd(dy: torch.Tensor, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """dy (M, N) * keep / (1 - p) in dtype, keep regenerated from seed as ``gemm``'s dropout drew it."""
    M, N = dy.shape
    dy = _unit_cols(dy)
    dx = torch.empty((M, N), device=dy.device, dtype=dtype)
    if M and N:
        grid = (triton.cdiv(M, _DROP_BLOCK_M), triton.cdiv(N, _DROP_BLOCK_N))
        _dropout_bwd_kernel[grid](dy, dx, M, N, dy.stride(0), dx.stride(0), seed, p,
                                  BLOCK_M=_DROP_BLOCK_M, BLOCK_N=_DROP_BLOCK_N, num_warps=_DROP_WARPS)
    return dx


def gelu_mlp_bwd(dy, x, z, fc_weight, proj_weight, *, dropout: tuple[int, float] | None = None,
                 needs=(True,) * 5, x_dtype=None, weight_dtypes=(None, None), config: triton.Config | None = None):
    """Gradients of gelu_mlp_fwd: (dx, d fc_weight, d fc_bias, d proj_weight, d proj_bias).

    dy: (M, C_out), the output's gradient; x: (M, C) and z: (M, F), as the forward saw and saved them
    (compute dtype); fc_weight (F, C), proj_weight (C_out, F) in the compute dtype. needs: which of the
    five to compute (None for the others). dx comes in x_dtype (default the compute dtype), the weight
    gradients in weight_dtypes (default the compute dtype), the bias gradients in fp32. config pins the
    tile config of every GEMM (tests); weight gradients split K over the tokens (see _weight_grad_splits).
    """
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    cdt = x.dtype
    M, C = x.shape
    F_, C_out = fc_weight.shape[0], proj_weight.shape[0]
    # d_out = dy through dropout's mask, in the compute dtype (the GEMMs' operand dtype)
    if dropout is not None:
        d_out = dropout_bwd(dy, *dropout, dtype=cdt)
    else:
        d_out = _unit_cols(dy.to(cdt))
    d_b2 = d_out.sum(0, dtype=torch.float32) if need_b2 else None
    d_w2 = d_b1 = d_w1 = dx = None
    if need_x or need_w1 or need_b1 or need_w2:
        dz = torch.empty((M, F_), device=x.device, dtype=cdt)
        g = torch.empty((M, F_), device=x.device, dtype=cdt)
        gemm(d_out, proj_weight.t(), dz, activation="dgelu_tanh", z=z, g=g, config=config)  # dz, and g = gelu(z)
        num_sms = sm_count(x.device)
        if need_w2:
            d_w2 = torch.empty((C_out, F_), device=x.device, dtype=weight_dtypes[1] or cdt)
            gemm(d_out.t(), g.t(), d_w2, config=config,
                 split_k=None if config else _weight_grad_splits(C_out, F_, M, num_sms))
        del g
        if need_x:
            dx = torch.empty((M, C), device=x.device, dtype=x_dtype or cdt)
            gemm(dz, fc_weight.t(), dx, config=config)
        if need_w1:
            d_w1 = torch.empty((F_, C), device=x.device, dtype=weight_dtypes[0] or cdt)
            gemm(dz.t(), x.t(), d_w1, config=config, split_k=None if config else _weight_grad_splits(F_, C, M, num_sms))
        if need_b1:
            d_b1 = dz.sum(0, dtype=torch.float32)
    return dx, d_w1, d_b1, d_w2, d_b2


# ------------------------------------------------------------------------------------ autograd.Function
class _GeluMLP(torch.autograd.Function):
    """gelu_mlp_fwd with its backward; casts to the compute dtype inside, so every gradient comes back
    in its input's own dtype (fp32 weights under autocast get fp32 gradients, accumulated in fp32)."""

    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p, seed, compute_dtype):
        C = x.shape[-1]
        x2 = x.reshape(-1, C).to(compute_dtype)
        w1, w2 = fc_weight.to(compute_dtype), proj_weight.to(compute_dtype)
        dropout = (seed, dropout_p) if dropout_p > 0 else None
        out_dtype = compute_dtype if residual is None else torch.promote_types(compute_dtype, residual.dtype)
        y, z = gelu_mlp_fwd(x2, w1, fc_bias, w2, proj_bias, dropout=dropout, out_dtype=out_dtype, save_preact=True,
                            residual=None if residual is None else residual.reshape(-1, w2.shape[0]))
        ctx.save_for_backward(x2, z, w1, w2)
        ctx.dropout = dropout
        ctx.dtypes = (x.dtype, fc_weight.dtype, fc_bias.dtype, proj_weight.dtype, proj_bias.dtype,
                      None if residual is None else residual.dtype)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, z, w1, w2 = ctx.saved_tensors
        x_dt, w1_dt, b1_dt, w2_dt, b2_dt, r_dt = ctx.dtypes
        needs = ctx.needs_input_grad[:5]
        dx, d_w1, d_b1, d_w2, d_b2 = gelu_mlp_bwd(dy.reshape(-1, w2.shape[0]), x2, z, w1, w2, dropout=ctx.dropout,
                                                  needs=needs, x_dtype=x_dt, weight_dtypes=(w1_dt, w2_dt))
        d_res = dy.to(r_dt) if r_dt is not None and ctx.needs_input_grad[5] else None
        return (None if dx is None else dx.reshape(ctx.x_shape), d_w1,
                None if d_b1 is None else d_b1.to(b1_dt), d_w2,
                None if d_b2 is None else d_b2.to(b2_dt), d_res, None, None, None)


def fused_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, *, residual=None, dropout_p: float = 0.0,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What kernels.gelu_mlp runs on the Triton path (inputs validated there): the forward, through
    _GeluMLP when autograd records the call (then z is kept for the backward), else directly.

    x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C_out, F); proj_bias: (C_out,);
    residual: None or (..., C_out). x and the weights are cast to compute_dtype (default x's dtype) for
    the GEMMs, as autocast casts a matmul's inputs; biases are added in fp32. dropout_p > 0 drops the
    branch before the residual add, with a seed drawn from torch's default CPU generator. Returns
    (..., C_out) in compute_dtype, promoted with the residual's dtype when there is one.
    """
    compute_dtype = compute_dtype or x.dtype
    seed = int(torch.randint(0, 2**31 - 1, ())) if dropout_p > 0 else 0
    tensors = (x, fc_weight, fc_bias, proj_weight, proj_bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GeluMLP.apply(*tensors, float(dropout_p), seed, compute_dtype)
    C = x.shape[-1]
    out_dtype = compute_dtype if residual is None else torch.promote_types(compute_dtype, residual.dtype)
    y = gelu_mlp_fwd(x.reshape(-1, C).to(compute_dtype), fc_weight.to(compute_dtype), fc_bias,
                     proj_weight.to(compute_dtype), proj_bias, out_dtype=out_dtype,
                     dropout=(seed, float(dropout_p)) if dropout_p > 0 else None,
                     residual=None if residual is None else residual.reshape(-1, proj_weight.shape[0]))
    return y.reshape(*x.shape[:-1], proj_weight.shape[0])


def compile_specs() -> list[KernelSpec]:
    """Every tile config of both regimes, in the variant its regime launches most, plus the training ones.

    All with ALIGNED=True, the GPT-2 family's case (odd sizes get Triton's launch-time specialisation);
    a launch specialises a unit stride to the constant 1, so the specs do too.
    prefill: fc (bias + GELU, fp16) for every config, proj (bias + residual) in bf16 for the first.
    decode: the split-K partial store (fp32 workspace) in fp16 for every config, in bf16 and as fc
    (M = 64 without split) for the first. The split-K reduce in both epilogue variants.
    training (bf16, the autocast dtype): fc storing z; the backward's dz GEMM (dGELU epilogue, W_proj
    read transposed) for every config it can launch and the first decode one; proj with dropout into an
    fp32 residual stream; dx (W_fc transposed); weight gradients (both operands transposed, fp32 out, whole
    and as split-K partials); the reduce with dGELU and with dropout; the dropout backward.
    wgmma needs 64-row warpgroup tiles: MMA is demanded of the configs with BLOCK_M >= 64.
    """
    def linear_spec(regime, cfg, dt, act, has_res, epilogue, what, *, preact=False, dropout=False,
                    x_t=False, w_t=False, ydt=None, rdt=None):
        kw = cfg.kwargs
        tag = f"{regime} M{kw['BLOCK_M']} N{kw['BLOCK_N']} K{kw['BLOCK_K']} w{cfg.num_warps}"
        ydt = ydt or dt
        sig = {"X": f"*{dt}", "W": f"*{dt}", "Bias": f"*{dt}", "Res": f"*{rdt or dt}",
               "Y": f"*{ydt}" if epilogue else "*fp32", "Z": f"*{dt}", "G": f"*{dt}",
               "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32",
               "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_wk": "i32",
               "stride_rm": "i32", "stride_ys": "i32", "stride_ym": "i32", "stride_zm": "i32",
               "seed": "i32", "dropout_p": "fp32"}
        cx = {("stride_xm" if x_t else "stride_xk"): 1, ("stride_wn" if w_t else "stride_wk"): 1}
        cx.update(HAS_BIAS=act == "gelu_tanh" or has_res, ACTIVATION=act, STORE_PREACT=preact, DROPOUT=dropout,
                  HAS_RESIDUAL=has_res, EPILOGUE=epilogue, DOT_PRECISION="tf32", X_T=x_t, W_T=w_t,
                  ALIGNED=True, **kw)
        sig.update({k: "constexpr" for k in cx})
        return KernelSpec(name=f"linear {tag} {dt} {what}", fn=_linear_kernel, signature=sig, constexprs=cx,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=kw["BLOCK_M"] >= 64)

    def reduce_spec(dt, act, has_res, *, preact=False, dropout=False, rdt=None, ydt=None):
        sig = {"P": "*fp32", "Bias": f"*{dt}", "Res": f"*{rdt or dt}", "Y": f"*{ydt or dt}", "Z": f"*{dt}",
               "G": f"*{dt}", "M": "i32", "N": "i32", "SPLITS": "i32", "stride_ps": "i32", "stride_pm": "i32",
               "stride_rm": "i32", "stride_ym": "i32", "stride_zm": "i32", "seed": "i32", "dropout_p": "fp32"}
        cx = dict(HAS_BIAS=act != "dgelu_tanh", ACTIVATION=act, STORE_PREACT=preact, DROPOUT=dropout,
                  HAS_RESIDUAL=has_res, ALIGNED=True, BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N)
        sig.update({k: "constexpr" for k in cx})
        return KernelSpec(name=f"splitk reduce M{_EPI_BLOCK_M} N{_EPI_BLOCK_N} {dt} {act}"
                               f"{' +res' if has_res else ''}{' +drop' if dropout else ''}{' +z' if preact else ''}",
                          fn=_splitk_epilogue_kernel, signature=sig, constexprs=cx, num_warps=_EPI_WARPS,
                          num_stages=1)

    specs = []
    for regime, configs in (("prefill", PREFILL_CONFIGS), ("decode", DECODE_CONFIGS)):
        for i, cfg in enumerate(configs):
            if regime == "prefill":
                specs.append(linear_spec(regime, cfg, "fp16", "gelu_tanh", False, True, "fc"))
                if i == 0:
                    specs.append(linear_spec(regime, cfg, "bf16", "none", True, True, "proj+res"))
            else:
                specs.append(linear_spec(regime, cfg, "fp16", "none", False, False, "splitk"))
                if i == 0:
                    specs.append(linear_spec(regime, cfg, "bf16", "none", False, False, "splitk"))
                    specs.append(linear_spec(regime, cfg, "fp16", "gelu_tanh", False, True, "fc"))
    specs.append(reduce_spec("fp16", "gelu_tanh", False))
    specs.append(reduce_spec("bf16", "none", True))

    # training: forward variants, then the backward's GEMMs (bf16, what autocast runs)
    p0, d0 = PREFILL_CONFIGS[0], DECODE_CONFIGS[0]
    specs.append(linear_spec("prefill", p0, "bf16", "gelu_tanh", False, True, "fc+z", preact=True))
    for cfg in HEAVY_EPILOGUE_CONFIGS:
        specs.append(linear_spec("prefill", cfg, "bf16", "dgelu_tanh", False, True, "dz (W.T)", w_t=True))
    specs.append(linear_spec("prefill", HEAVY_EPILOGUE_CONFIGS[0], "bf16", "none", True, True, "proj+drop+res32",
                             dropout=True, ydt="fp32", rdt="fp32"))
    specs.append(linear_spec("decode", d0, "bf16", "dgelu_tanh", False, False, "dz (W.T) splitk", w_t=True))
    specs.append(linear_spec("prefill", p0, "bf16", "none", False, True, "dx (W.T)", w_t=True))
    for cfg in TRANSPOSED_CONFIGS:
        specs.append(linear_spec("prefill", cfg, "bf16", "none", False, False, "dW (X.T, W.T) splitk",
                                 x_t=True, w_t=True))
    specs.append(linear_spec("prefill", TRANSPOSED_CONFIGS[0], "bf16", "none", False, True, "dW (X.T, W.T) fp32",
                             x_t=True, w_t=True, ydt="fp32"))
    specs.append(reduce_spec("bf16", "dgelu_tanh", False))
    specs.append(reduce_spec("bf16", "none", True, dropout=True, rdt="fp32", ydt="fp32"))
    drop_sig = {"DY": "*fp32", "DX": "*bf16", "M": "i32", "N": "i32", "stride_dym": "i32", "stride_dxm": "i32",
                "seed": "i32", "dropout_p": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    specs.append(KernelSpec(name=f"dropout bwd M{_DROP_BLOCK_M} N{_DROP_BLOCK_N} fp32->bf16", fn=_dropout_bwd_kernel,
                            signature=drop_sig, constexprs={"BLOCK_M": _DROP_BLOCK_M, "BLOCK_N": _DROP_BLOCK_N},
                            num_warps=_DROP_WARPS, num_stages=1))
    return specs
