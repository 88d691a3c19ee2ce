"""GPT-2's MLP as two GEMMs with fused epilogues.

    h = gelu_tanh(x @ W_fc.T + b_fc)              (M, F), F = 4C, stored once in x's dtype
    y = h @ W_proj.T + b_proj (+ residual)         (M, C_out)
    gelu_tanh(z) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))      (GPT-2's "gelu_new")
                 = z * sigmoid(2u),  u = sqrt(2/pi) (z + 0.044715 z^3)

The second form needs one exp and has no cancellation; evaluating the sigmoid from exp(-2|u|) only, it
never overflows and saturates to z (z -> +inf) and -0 (z -> -inf). Everything accumulates in fp32; each
output is cast once.

Memory traffic saved against eager PyTorch (linear, gelu, linear, add), per token: the GELU pass (read +
write of the 4C pre-activation, 8C element moves) and, in the residual add, the write and re-read of y
(2C); and one rounding of h and of y instead of two each. Two launches (three or four under split-K)
instead of four.

One generic kernel, ``_linear_kernel``, computes act(x @ W.T + b) (+ r) for an nn.Linear weight W (N, K),
row-major, read through its strides as the (K, N) right-hand operand (no transposed copy). Two regimes:

* prefill (M > 64): large tiles (Hopper wgmma needs 64-row warpgroup tiles), grouped ("swizzled") tile
  order so that GROUP_M row-tiles sweep the same weight columns while they sit in L2.
* decode (M <= 64): 16-row tiles, and split-K when the (M, N) tiles alone cannot fill the GPU: each of
  SPLITS programs per tile reduces a K_PER_SPLIT slice into an fp32 workspace, and
  ``_splitk_epilogue_kernel`` sums the slices and applies the same epilogue. The weights are then
  streamed once by enough programs to reach the memory bandwidth.

On CUDA the tile config is autotuned from the small explicit lists below (one autotuner per regime and
power-of-two M bucket, keyed on N, K and the K slice); under TRITON_INTERPRET=1 (CPU tests) the plain jit
kernel is launched with an explicit config, so the tests can walk every config. The ALIGNED variant
restates, as hints, the alignment Triton's launch-time specialisation sees for the GPT-2 sizes, so that
kernels.compile_report (which compiles without that specialisation) reports the code a launch runs.

Sources (ideas, no code): the Triton matrix-multiplication tutorial (grouped ordering, wrapped row/column
offsets so that only the store is masked); split-K GEMM as in CUTLASS; Hendrycks & Gimpel, "Gaussian Error
Linear Units" and OpenAI's GPT-2 for the tanh approximation.
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
def _epilogue(acc, Bias, Res, offs_m, offs_n, n_mask, mask, stride_rm,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    if HAS_BIAS:
        bias_ptrs = Bias + offs_n
        if ALIGNED:
            bias_ptrs = tl.max_contiguous(tl.multiple_of(bias_ptrs, [16]), [BLOCK_N])
        bias = tl.load(bias_ptrs, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if ACTIVATION == "gelu_tanh":
        acc = _gelu_tanh(acc)
    if HAS_RESIDUAL:
        r = tl.load(_row_ptrs(Res, offs_m, offs_n, stride_rm, BLOCK_N, ALIGNED), mask=mask, other=0.0)
        acc = acc + r.to(tl.float32)
    return acc


@triton.jit
def _finish_tile(acc, Bias, Res, Y, offs_m, offs_n, M, N, stride_rm, stride_ym,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    # EPILOGUE: bias, activation, residual, cast, store. Otherwise store the raw fp32 partial sum.
    n_mask, mask = _tile_masks(offs_m, offs_n, M, N, ALIGNED)
    if EPILOGUE:
        acc = _epilogue(acc, Bias, Res, offs_m, offs_n, n_mask, mask, stride_rm,
                        HAS_BIAS, ACTIVATION, HAS_RESIDUAL, BLOCK_N, ALIGNED)
    tl.store(_row_ptrs(Y, offs_m, offs_n, stride_ym, BLOCK_N, ALIGNED), acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    X, W, Bias, Res, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_rm, stride_ys, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Y = act(X @ W.T + Bias) + Res; X (M, K) and W (N, K) have unit stride along K.
    # EPILOGUE=False: store the fp32 partial sum of K-slice program_id(1) at Y + pid_k * stride_ys instead.
    # ALIGNED: the launcher checked what Triton's launch-time specialisation would see (16-byte aligned
    # pointers; N, K, K_PER_SPLIT and row strides multiples of 16). Stating it here makes an ahead-of-time
    # compile (kernels.compile_report) produce the same vectorized, cp.async-pipelined code as a launch.
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
    # duplicated rows/columns are dropped by the masked store.
    offs_am = offs_m % M
    offs_bn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    a_ptrs = X + offs_am[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    b_ptrs = W + offs_bn[None, :] * stride_wn + (k_lo + offs_k)[:, None]
    if ALIGNED:
        a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [1, BLOCK_K])
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
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    Y += pid_k.to(tl.int64) * stride_ys
    if BLOCK_M * BLOCK_N >= 128 * 256:
        # Finish the tile in two column halves: the residual/bias tiles of one half at a time fit in
        # the registers left next to the 128 accumulators per thread (no spills).
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        offs_n0 = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _finish_tile(acc0, Bias, Res, Y, offs_m, offs_n0, M, N, stride_rm, stride_ym,
                     HAS_BIAS, ACTIVATION, HAS_RESIDUAL, EPILOGUE, BLOCK_N // 2, ALIGNED)
        _finish_tile(acc1, Bias, Res, Y, offs_m, offs_n0 + BLOCK_N // 2, M, N, stride_rm, stride_ym,
                     HAS_BIAS, ACTIVATION, HAS_RESIDUAL, EPILOGUE, BLOCK_N // 2, ALIGNED)
    else:
        _finish_tile(acc, Bias, Res, Y, offs_m, offs_n, M, N, stride_rm, stride_ym,
                     HAS_BIAS, ACTIVATION, HAS_RESIDUAL, EPILOGUE, BLOCK_N, ALIGNED)


@triton.jit
def _splitk_epilogue_kernel(
    P, Bias, Res, Y,
    M, N, SPLITS,
    stride_ps, stride_pm, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Y = act(sum_s P[s] + Bias) + Res over one (BLOCK_M, BLOCK_N) tile; P is the fp32 (SPLITS, M, N) workspace.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    _, mask = _tile_masks(offs_m, offs_n, M, N, ALIGNED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, SPLITS):
        # The slice offset goes into the base pointer, so the hinted row pointers stay 16-byte aligned.
        acc += tl.load(_row_ptrs(P, offs_m, offs_n, stride_pm, BLOCK_N, ALIGNED), mask=mask, other=0.0)
        P += stride_ps
    _finish_tile(acc, Bias, Res, Y, offs_m, offs_n, M, N, stride_rm, stride_ym,
                 HAS_BIAS, ACTIVATION, HAS_RESIDUAL, True, BLOCK_N, ALIGNED)


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
_EPI_BLOCK_M, _EPI_BLOCK_N, _EPI_WARPS = 8, 256, 4
_ACTIVATIONS = (None, "gelu_tanh")


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


@functools.cache
def _autotuned(regime: str, m_bucket: int):
    # One autotuner per (regime, M bucket): Triton keys only on kernel arguments, and M itself would
    # re-tune for every prompt length. All of them share the jit function's compiled binaries.
    configs = DECODE_CONFIGS if regime == "decode" else PREFILL_CONFIGS
    return triton.autotune(configs=configs, key=["N", "K", "K_PER_SPLIT"])(_linear_kernel)


def linear_fwd(x, weight, bias=None, *, activation: str | None = None, residual=None,
               config: triton.Config | None = None, split_k: int | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) (+ residual) in one GEMM launch (plus a small reduce under split-K).

    x: (..., K), unit stride along K (copied once otherwise); weight: (N, K) (nn.Linear); bias: (N,) or
    None; activation: None or "gelu_tanh"; residual: None or (..., N). Returns (..., N) in x's dtype.
    config / split_k pin a tile config and the number of K slices (tests); by default the regime's
    list is autotuned on CUDA and its first config is used under the interpreter.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    K = x.shape[-1]
    N = weight.shape[0]
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"weight must have shape (N, {K}), got {tuple(weight.shape)}")
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if residual is not None:
        res = residual.reshape(M, N)
        if res.stride(1) != 1:
            res = res.contiguous()
    else:
        res = y  # never read: HAS_RESIDUAL is False
    b = bias if bias is not None else y  # never read: HAS_BIAS is False

    regime = _regime(M)
    if split_k is not None:
        align = config.kwargs["BLOCK_K"] if config is not None else _SPLIT_ALIGN
        k_per_split = triton.cdiv(triton.cdiv(K, max(1, split_k)), align) * align
    elif regime == "decode":
        k_per_split = _k_per_split(M, N, K, sm_count(x.device))
    else:
        k_per_split = K
    k_per_split = max(k_per_split, 1)
    splits = triton.cdiv(K, k_per_split) if K > 0 else 1
    if config is not None and splits > 1 and k_per_split % config.kwargs["BLOCK_K"]:
        raise ValueError(f"K_PER_SPLIT={k_per_split} is not a multiple of BLOCK_K={config.kwargs['BLOCK_K']}")

    out = y if splits == 1 else torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
    args = (x2, w, b, res, out, M, N, K, k_per_split,
            x2.stride(0), w.stride(0), res.stride(0), out.stride(0) if splits > 1 else 0, out.stride(-2))
    # What Triton's launch-time specialisation checks (16-byte pointers, integers divisible by 16).
    aligned = (all(t.data_ptr() % 16 == 0 for t in (x2, w, b, res, out, y))
               and all(v % 16 == 0 for v in (N, K, k_per_split, *args[9:])))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RESIDUAL=residual is not None,
                EPILOGUE=splits == 1, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                ALIGNED=aligned)

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), splits)

    if config is None and x.is_cuda:
        _autotuned(regime, _m_bucket(M))[grid](*args, **meta)
    else:
        if config is None:
            config = (DECODE_CONFIGS if regime == "decode" else PREFILL_CONFIGS)[0]
        _linear_kernel[grid](*args, **meta, **config.kwargs,
                             num_warps=config.num_warps, num_stages=config.num_stages)

    if splits > 1:
        epi_grid = (triton.cdiv(M, _EPI_BLOCK_M), triton.cdiv(N, _EPI_BLOCK_N))
        _splitk_epilogue_kernel[epi_grid](
            out, b, res, y, M, N, splits, out.stride(0), out.stride(1), res.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RESIDUAL=residual is not None,
            ALIGNED=aligned, BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N, num_warps=_EPI_WARPS)
    return y.reshape(*lead, N)


def gelu_mlp_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, *, residual=None,
                 config: triton.Config | None = None, split_k: int | None = None) -> torch.Tensor:
    """gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias (+ residual): two GEMM launches.

    x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C_out, F); proj_bias: (C_out,);
    residual: None or (..., C_out). Inputs validated by kernels.gelu_mlp. Returns (..., C_out), x's dtype.
    config / split_k are passed to both GEMMs (tests); see linear_fwd.
    """
    h = linear_fwd(x, fc_weight, fc_bias, activation="gelu_tanh", config=config, split_k=split_k)
    return linear_fwd(h, proj_weight, proj_bias, residual=residual, config=config, split_k=split_k)


def compile_specs() -> list[KernelSpec]:
    """Every tile config of both regimes, in the variant its regime launches most, plus a few more.

    All with ALIGNED=True, the GPT-2 family's case (odd sizes get Triton's launch-time specialisation).
    prefill: fc (bias + GELU, fp16) for every config, proj (bias + residual) in bf16 for the first.
    decode: the split-K partial store (fp32 workspace) in fp16 for every config, in bf16 and as fc
    (M = 64 without split) for the first. The split-K reduce in both epilogue variants.
    wgmma needs 64-row warpgroup tiles: MMA is demanded of the configs with BLOCK_M >= 64.
    """
    specs = []
    for regime, configs in (("prefill", PREFILL_CONFIGS), ("decode", DECODE_CONFIGS)):
        for i, cfg in enumerate(configs):
            kw = cfg.kwargs
            tag = f"{regime} M{kw['BLOCK_M']} N{kw['BLOCK_N']} K{kw['BLOCK_K']} w{cfg.num_warps}"
            if regime == "prefill":
                variants = [("fp16", "gelu_tanh", False, True, "fc")]
                variants += [("bf16", "none", True, True, "proj+res")] if i == 0 else []
            else:
                variants = [("fp16", "none", False, False, "splitk")]
                variants += [("bf16", "none", False, False, "splitk"), ("fp16", "gelu_tanh", False, True, "fc")] if i == 0 else []
            for dt, act, has_res, epilogue, what in variants:
                sig = {"X": f"*{dt}", "W": f"*{dt}", "Bias": f"*{dt}", "Res": f"*{dt}",
                       "Y": f"*{dt}" if epilogue else "*fp32",
                       "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32",
                       "stride_xm": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_ys": "i32",
                       "stride_ym": "i32"}
                cx = dict(HAS_BIAS=True, ACTIVATION=act, HAS_RESIDUAL=has_res, EPILOGUE=epilogue,
                          DOT_PRECISION="tf32", ALIGNED=True, **kw)
                sig.update({k: "constexpr" for k in cx})
                specs.append(KernelSpec(name=f"linear {tag} {dt} {what}", fn=_linear_kernel, signature=sig,
                                        constexprs=cx, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                        expect_mma=kw["BLOCK_M"] >= 64))
    for dt, act, has_res in (("fp16", "gelu_tanh", False), ("bf16", "none", True)):
        sig = {"P": "*fp32", "Bias": f"*{dt}", "Res": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32",
               "SPLITS": "i32", "stride_ps": "i32", "stride_pm": "i32", "stride_rm": "i32", "stride_ym": "i32"}
        cx = dict(HAS_BIAS=True, ACTIVATION=act, HAS_RESIDUAL=has_res, ALIGNED=True,
                  BLOCK_M=_EPI_BLOCK_M, BLOCK_N=_EPI_BLOCK_N)
        sig.update({k: "constexpr" for k in cx})
        specs.append(KernelSpec(name=f"splitk reduce M{_EPI_BLOCK_M} N{_EPI_BLOCK_N} {dt} {act}"
                                     f"{' +res' if has_res else ''}", fn=_splitk_epilogue_kernel,
                                signature=sig, constexprs=cx, num_warps=_EPI_WARPS, num_stages=1))
    return specs
