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

Sources (ideas, no code): Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023); the
Triton fused-attention tutorial; Milakov & Gimelshein, "Online normalizer calculation for softmax".
"""

from __future__ import annotations

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
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), IS_CAUSAL=bool(causal),
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
        constexprs.update(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), IS_CAUSAL=causal,
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
    return [
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
