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
with 16-byte vector loads along D when the launcher proves the alignment; the partials add
num_splits * (D + 1) fp32 per (b, h), small against the cache once a split holds a few hundred
positions. The scores never leave registers. Dot products are tl.sum reductions (one query row is
below tl.dot's minimum M of 16).

Sources (ideas, not code): "Flash-Decoding for long-context inference" (Dao, Haziza, Massa, Sizov,
2023); FlashAttention-2 (Dao, 2023) for the online softmax; the Triton tutorials for the style.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.compile_report import KernelSpec


@triton.jit
def _decode_split_kernel(
    Q, K, V, SeqLens, O, MidO, MidLse,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_od,
    H, num_splits, split_len, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr, DIRECT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    seqlen = tl.load(SeqLens + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seqlen)

    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    # log2(e) is folded into the scale so the softmax runs on exp2.
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale
    k_row = K + b * stride_kb + h * stride_kh
    v_row = V + b * stride_vb + h * stride_vh

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        mask = mask_n[:, None] & mask_d[None, :]
        offs_n64 = offs_n.to(tl.int64)[:, None]
        k_ptrs = k_row + offs_n64 * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_row + offs_n64 * stride_vt + offs_d[None, :] * stride_vd
        if VEC > 1:
            # The launcher checked base pointers and strides: every run of VEC elements along D is
            # contiguous and 16-byte aligned, which the compiler needs to emit 128-bit loads.
            k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [1, VEC])
            v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [16, 16]), [1, VEC])
        # Masked lanes load 0 and their scores are forced to -inf, so whatever sits in the cache past
        # the row's length (NaN, inf) never reaches the arithmetic.
        k = tl.load(k_ptrs, mask=mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(mask_n, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    # An empty split (start >= seqlen) keeps l_i = 0: it stores o_s = 0 and lse = -inf.
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)
    if DIRECT:
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_d * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_d)
    else:
        mid = bh * num_splits + split
        tl.store(MidO + mid * D_PAD + offs_d, out)
        tl.store(MidLse + mid, tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), -float("inf")))


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, O,
    stride_ob, stride_oh, stride_od,
    H, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D_PAD)
    m = -float("inf")
    l = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for s in range(0, num_splits):
        mid = bh * num_splits + s
        lse = tl.load(MidLse + mid)
        o_s = tl.load(MidO + mid * D_PAD + offs_d)
        m_new = tl.maximum(m, lse)
        # While every split so far is empty m_new is -inf and 2^(-inf - -inf) would be NaN.
        seen = m_new > -float("inf")
        alpha = tl.where(seen, tl.exp2(m - m_new), 0.0)
        w = tl.where(seen, tl.exp2(lse - m_new), 0.0)
        l = l * alpha + w
        acc = acc * alpha + w * o_s
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ------------------------------------------------------------------------------------------- launcher
_MAX_SPLITS = 256
_MIN_SPLIT_LEN = 256  # positions; below this the merge traffic and launch cost outweigh the gain
_WAVES = 4  # programs per SM to aim for: several resident per SM keep enough loads in flight
_DEFAULT_SMS = 132  # H100/H200, used when no CUDA device is present (interpreter runs)


def _block_config(d_pad: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): a K tile of ~16 KB, enough bytes in flight per program."""
    block_n = max(16, min(256, 16384 // (d_pad * itemsize)))
    return block_n, 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _vec(t: torch.Tensor, d: int, strides: tuple) -> int:
    """Elements per 16-byte load when every D-run of t starts 16-byte aligned, else 1."""
    vec = 16 // t.element_size()
    if t.stride(-1) != 1 or d % vec or t.data_ptr() % 16 or any(s % vec for s in strides):
        return 1
    return vec


def _split_plan(B: int, H: int, Tmax: int, block_n: int, sms: int, num_splits: int | None) -> tuple[int, int]:
    """(num_splits, split_len) from the static shapes only."""
    if num_splits is not None:
        num_splits = int(num_splits)
        if not 1 <= num_splits <= Tmax:
            raise ValueError(f"num_splits must be in 1..Tmax={Tmax}, got {num_splits}")
        return num_splits, triton.cdiv(Tmax, num_splits)
    want = triton.cdiv(_WAVES * sms, B * H)
    n = max(1, min(want, triton.cdiv(Tmax, _MIN_SPLIT_LEN), _MAX_SPLITS))
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
    if Tmax >= 2**31:
        raise ValueError(f"k_cache has Tmax={Tmax} positions; at most 2**31 - 1 are supported")
    d_pad = max(16, triton.next_power_of_2(D))
    block_n, num_warps = _block_config(d_pad, k_cache.element_size())
    n_splits, split_len = _split_plan(B, H, Tmax, block_n, _num_sms(q.device), num_splits)
    vec = min(_vec(k_cache, D, k_cache.stride()[:3]), _vec(v_cache, D, v_cache.stride()[:3]))
    seqlens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()

    o = torch.empty((B, H, 1, D), device=q.device, dtype=q.dtype)
    direct = n_splits == 1
    if direct:
        mid_o = mid_lse = o  # unused
    else:
        mid_o = torch.empty((B * H, n_splits, d_pad), device=q.device, dtype=torch.float32)
        mid_lse = torch.empty((B * H, n_splits), device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B * H, n_splits)](
        q, k_cache, v_cache, seqlens, o, mid_o, mid_lse,
        q.stride(0), q.stride(1), q.stride(3),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        o.stride(0), o.stride(1), o.stride(3),
        H, n_splits, split_len, float(softmax_scale) * math.log2(math.e),
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=block_n, VEC=vec, DIRECT=direct,
        num_warps=num_warps, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(B * H,)](
            mid_o, mid_lse, o, o.stride(0), o.stride(1), o.stride(3), H, n_splits,
            HEAD_DIM=D, D_PAD=d_pad, num_warps=1, num_stages=1,
        )
    return o


def compile_specs() -> list[KernelSpec]:
    """Every launch config: each (D_PAD, itemsize) block config, aligned (VEC) and not, direct and split."""
    ptr = lambda dt: f"*{dt}"  # noqa: E731
    specs = []

    def split_spec(dt, D, vec, direct, itemsize=2):
        d_pad = max(16, triton.next_power_of_2(D))
        block_n, warps = _block_config(d_pad, itemsize)
        sig = {"Q": ptr(dt), "K": ptr(dt), "V": ptr(dt), "SeqLens": "*i32", "O": ptr(dt),
               "MidO": "*fp32", "MidLse": "*fp32"}
        for n in ("stride_qb", "stride_qh", "stride_qd", "stride_kb", "stride_kh", "stride_kt", "stride_kd",
                  "stride_vb", "stride_vh", "stride_vt", "stride_vd", "stride_ob", "stride_oh", "stride_od"):
            sig[n] = "i32"
        sig.update({"H": "i32", "num_splits": "i32", "split_len": "i32", "qk_scale": "fp32"})
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

    for D in (16, 32, 64, 128):
        specs.append(split_spec("fp16", D, 8, False))
    specs.append(split_spec("fp16", 64, 8, True))
    specs.append(split_spec("fp16", 128, 8, True))
    specs.append(split_spec("bf16", 128, 8, False))
    specs.append(split_spec("fp32", 64, 4, False, itemsize=4))
    specs.append(split_spec("fp32", 128, 4, True, itemsize=4))
    specs.append(split_spec("fp16", 36, 1, False))  # D not a multiple of 8: scalar loads, D_PAD 64
    specs.append(split_spec("fp16", 100, 1, False))  # D_PAD 128, masked tail

    for D in (64, 128):
        d_pad = max(16, triton.next_power_of_2(D))
        sig = {"MidO": "*fp32", "MidLse": "*fp32", "O": "*fp16", "stride_ob": "i32", "stride_oh": "i32",
               "stride_od": "constexpr", "H": "i32", "num_splits": "i32", "HEAD_DIM": "constexpr",
               "D_PAD": "constexpr"}
        specs.append(KernelSpec(
            name=f"decode_merge D{D} fp16", fn=_decode_merge_kernel, signature=sig,
            constexprs={"stride_od": 1, "HEAD_DIM": D, "D_PAD": d_pad}, num_warps=1, num_stages=1,
        ))
    return specs
