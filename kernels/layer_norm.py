"""Residual add + LayerNorm over the last dim, fused into one pass over memory.

Math, per row of N values (x, and optionally the residual r, flattened to (M, N)):

    h    = x + r                      (fp32; stored in x's dtype when there is a residual)
    mean = sum(h) / N
    var  = sum((h - mean)^2) / N      (centred: exact enough for -20 + 0.5*randn or 1e4*randn rows,
                                       where E[h^2] - E[h]^2 cancels away the variance in fp32)
    rstd = 1 / sqrt(var + eps)
    y    = (h - mean) * rstd * weight + bias      (from the fp32 h, not from the rounded stored h)

Statistics are fp32 whatever the input dtype; weight and bias may have another dtype than x (an fp32
master copy with fp16 activations) and are upcast on load. mean and rstd (M,) fp32 can be written for a
later backward.

Memory traffic. Unfused, `h = x + r; y = layer_norm(h)` reads x, r, writes h, reads h again, writes y:
5 row-sized transfers. Here each input is read once and each output written once (4 with a residual,
2 without), which is the floor for this op, so the kernel is judged against copy bandwidth.

Two regimes, chosen on the host from N by `_config` (a table, so there is no autotuning at start-up):

* `_ln_fwd_rows`: the whole row stays in registers (N up to 16384 when a power-of-two block holds it);
  BLOCK_M rows per program for small N so a program moves a few KB and the grid fills the GPU.
* `_ln_fwd_looped`: wider rows go through BLOCK_N chunks twice. Pass one merges per-chunk (count, mean,
  centred sum of squares) with Chan's parallel-variance update, so the variance is still centred; pass
  two re-reads the inputs, which the first pass has just brought into L2, and writes y.

Layout rule: the last dim must be contiguous and the leading dims must collapse to one row stride (any
`x[..., a:b, :]`-style view of a contiguous tensor does); otherwise the launcher copies that input once
with `reshape` / `contiguous`. Rows may have any stride, so a slice of a wider buffer is read in place.

16-byte vector loads: when every row pointer is 16-byte aligned and N and the row strides are multiples
of VEC = 16 / itemsize, the launcher passes that VEC and the kernel states the alignment to the compiler
(`tl.multiple_of` / `tl.max_contiguous` / `tl.max_constancy`), which then emits ld.global.v4 even for
N that a launch would not specialise as divisible by 16. Otherwise VEC = 1: correct, narrower loads.

Sources (ideas, no code): the Triton "Layer Normalization" tutorial (row-per-program fused LayerNorm);
Chan, Golub and LeVeque, "Algorithms for computing the sample variance" (merging partial variances);
Welford, "Note on a method for calculating corrected sums of squares and products".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.compile_report import KernelSpec


@triton.constexpr_function
def _group_align(vec, bits):
    """Byte alignment of every VEC-element group of a 16-byte aligned array of `bits`-bit elements."""
    return min(16, vec * bits // 8)


@triton.jit
def _ln_fwd_rows(
    X, R, W, B, Y, H, Mean, Rstd,
    stride_xm, stride_rm, stride_ym, stride_hm,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    # weight/bias may be wider or narrower than x: their VEC-groups start VEC * itemsize bytes apart.
    WA: tl.constexpr = _group_align(VEC, W.dtype.element_ty.primitive_bitwidth)
    BA: tl.constexpr = _group_align(VEC, B.dtype.element_ty.primitive_bitwidth)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x_ptr = X + rows[:, None] * stride_xm + cols[None, :]
    r_ptr = R + rows[:, None] * stride_rm + cols[None, :]
    y_ptr = Y + rows[:, None] * stride_ym + cols[None, :]
    h_ptr = H + rows[:, None] * stride_hm + cols[None, :]
    w_ptr = W + cols
    b_ptr = B + cols
    if VEC > 1:
        # The launcher proved 16-byte aligned row starts and N a multiple of VEC. Saying so (pointer
        # divisibility is in bytes) gives 16-byte accesses whatever N and the strides specialised to.
        x_ptr = tl.max_contiguous(tl.multiple_of(x_ptr, [1, 16]), [1, VEC])
        r_ptr = tl.max_contiguous(tl.multiple_of(r_ptr, [1, 16]), [1, VEC])
        y_ptr = tl.max_contiguous(tl.multiple_of(y_ptr, [1, 16]), [1, VEC])
        h_ptr = tl.max_contiguous(tl.multiple_of(h_ptr, [1, 16]), [1, VEC])
        mask = tl.max_constancy(mask, [1, VEC])
        col_ok = tl.max_constancy(col_ok, [VEC])
        w_ptr = tl.max_contiguous(tl.multiple_of(w_ptr, [WA]), [VEC])
        b_ptr = tl.max_contiguous(tl.multiple_of(b_ptr, [BA]), [VEC])

    h = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr, h.to(H.dtype.element_ty), mask=mask)

    mean = tl.sum(h, axis=1) / N
    # Padding columns must not add (0 - mean)^2 to the variance.
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)  # libdevice rsqrt does not interpret on CPU
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)

    w = tl.load(w_ptr, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr, mask=col_ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_of_h(X, R, c, N, HAS_RESIDUAL: tl.constexpr, VEC: tl.constexpr):
    """h = x (+ residual) in fp32 over the columns c of one row, and the mask of those inside it."""
    ok = c < N
    if VEC > 1:
        ok = tl.max_constancy(ok, VEC)
    h = tl.load(X + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + c, mask=ok, other=0.0).to(tl.float32)
    return h, ok


@triton.jit
def _ln_fwd_looped(
    X, R, W, B, Y, H, Mean, Rstd,
    stride_xm, stride_rm, stride_ym, stride_hm,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    WA: tl.constexpr = _group_align(VEC, W.dtype.element_ty.primitive_bitwidth)
    BA: tl.constexpr = _group_align(VEC, B.dtype.element_ty.primitive_bitwidth)
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xm
    R += row * stride_rm
    Y += row * stride_ym
    H += row * stride_hm
    if VEC > 1:
        # As in _ln_fwd_rows: the launcher proved 16-byte aligned rows; the row bases above lost that.
        X = tl.multiple_of(X, 16)
        R = tl.multiple_of(R, 16)
        Y = tl.multiple_of(Y, 16)
        H = tl.multiple_of(H, 16)
    cols = tl.arange(0, BLOCK_N)

    # Pass 1: per-chunk mean and centred sum of squares, merged (Chan et al.) into the running pair.
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        h, ok = _chunk_of_h(X, R, c, N, HAS_RESIDUAL, VEC)
        if HAS_RESIDUAL:
            tl.store(H + c, h.to(H.dtype.element_ty), mask=ok)
        n_a = start * 1.0  # a loop index is a plain int under the interpreter: no .to()
        n_b = tl.minimum(N - start, BLOCK_N) * 1.0
        n = n_a + n_b
        mean_b = tl.sum(h, axis=0) / n_b
        d = tl.where(ok, h - mean_b, 0.0)
        delta = mean_b - mean
        mean += delta * (n_b / n)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (n_a * (n_b / n))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    if STORE_STATS:
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    # Pass 2: re-read the inputs (not the rounded h) so y comes from the fp32 sum.
    for start in range(0, N, BLOCK_N):
        c = start + cols
        h, ok = _chunk_of_h(X, R, c, N, HAS_RESIDUAL, VEC)
        w_ptr = W + c
        b_ptr = B + c
        if VEC > 1:
            w_ptr = tl.max_contiguous(tl.multiple_of(w_ptr, [WA]), [VEC])
            b_ptr = tl.max_contiguous(tl.multiple_of(b_ptr, [BA]), [VEC])
        w = tl.load(w_ptr, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr, mask=ok, other=0.0).to(tl.float32)
        y = (h - mean) * rstd * w + b
        tl.store(Y + c, y.to(Y.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launcher
# (BLOCK_N, BLOCK_M, num_warps) for the register regime, smallest block that holds the row. A program
# keeps ~16-32 fp32 values of h per thread: enough loads in flight per thread, no spills (see
# compile_specs). Small rows batch BLOCK_M rows so a program moves >= 4096 elements.
_ROW_CONFIGS = (
    (128, 32, 4),
    (256, 16, 4),
    (512, 8, 4),
    (1024, 4, 4),
    (2048, 2, 8),
    (4096, 1, 8),
    (8192, 1, 16),
    (16384, 1, 16),
)
_LOOPED_CONFIG = (4096, 1, 8)  # chunk, rows per program, warps: rows wider than the last row config
_STAGES = {"rows": 1, "looped": 2}  # no loop to pipeline in "rows"; the looped one streams chunks


def _config(N: int) -> tuple[str, int, int, int]:
    """(regime, BLOCK_N, BLOCK_M, num_warps) for rows of N elements."""
    for block_n, block_m, warps in _ROW_CONFIGS:
        if N <= block_n:
            return "rows", block_n, block_m, warps
    return ("looped",) + _LOOPED_CONFIG


def _as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(M, N) view with a contiguous last dim; copies once only when no such view exists."""
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def layer_norm_fwd(x, weight, bias, *, eps: float, residual=None, return_stats: bool = False):
    """LayerNorm over the last dim of x (..., N), fused with `h = x + residual` when residual is given.

    weight, bias: (N,), any float dtype (upcast on load). residual: None or x's shape and dtype.
    Returns y; (y, h) with a residual; with return_stats the same followed by mean, rstd (M,) fp32.
    y and h have x's shape and dtype and are contiguous.
    """
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    h = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(M, device=x.device, dtype=torch.float32) if return_stats else None
    rstd = torch.empty(M, device=x.device, dtype=torch.float32) if return_stats else None

    if M > 0 and N > 0:
        x2 = _as_rows(x, N)
        r2 = _as_rows(residual, N) if residual is not None else None
        w = weight.contiguous()
        b = bias.contiguous()
        vec = 16 // x.element_size()
        tensors = [t for t in (x2, r2, y, h, w, b) if t is not None]
        strides = [x2.stride(0)] + ([r2.stride(0)] if r2 is not None else [])
        aligned = (N % vec == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)
                   and all(s % vec == 0 for s in strides))
        regime, block_n, block_m, warps = _config(N)
        args = (x2, r2 if r2 is not None else x2, w, b, y, h if h is not None else y,
                mean if mean is not None else y, rstd if rstd is not None else y,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0)
        flags = dict(HAS_RESIDUAL=residual is not None, STORE_STATS=return_stats,
                     BLOCK_N=block_n, VEC=vec if aligned else 1, num_warps=warps, num_stages=_STAGES[regime])
        if regime == "rows":
            _ln_fwd_rows[(triton.cdiv(M, block_m),)](*args, M, N, eps, BLOCK_M=block_m, **flags)
        else:
            _ln_fwd_looped[(M,)](*args, N, eps, **flags)
    elif return_stats:
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))

    y = y.view(x.shape)
    out = (y,) if h is None else (y, h.view(x.shape))
    if return_stats:
        out = out + (mean, rstd)
    return out[0] if len(out) == 1 else out


def compile_specs() -> list[KernelSpec]:
    """Every block configuration `_config` can pick, for sm_90 / sm_80.

    fp16 and bf16 in the heaviest variant (residual + stats, 16-byte path) for every config; fp32, the
    no-residual form and the VEC = 1 fallback on the configs where register pressure or layout differs
    most. Specs from N >= 768 in 16-bit types must show ld.global.v4.
    """
    def sig(dt, wdt, looped, stats):
        st = "*fp32" if stats else f"*{dt}"  # without stats the launcher passes y there (never written)
        s = {"X": f"*{dt}", "R": f"*{dt}", "W": f"*{wdt}", "B": f"*{wdt}", "Y": f"*{dt}", "H": f"*{dt}",
             "Mean": st, "Rstd": st,
             "stride_xm": "i32", "stride_rm": "i32", "stride_ym": "i32", "stride_hm": "i32"}
        if not looped:
            s["M"] = "i32"
        s.update({"N": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "STORE_STATS": "constexpr"})
        if not looped:
            s["BLOCK_M"] = "constexpr"
        s.update({"BLOCK_N": "constexpr", "VEC": "constexpr"})
        return s

    def spec(regime, block_n, block_m, warps, dt, wdt=None, residual=True, stats=True, aligned=True):
        wdt = wdt or dt
        looped = regime == "looped"
        vec = (16 // {"fp16": 2, "bf16": 2, "fp32": 4}[dt]) if aligned else 1
        consts = {"HAS_RESIDUAL": residual, "STORE_STATS": stats, "BLOCK_N": block_n, "VEC": vec}
        if not looped:
            consts["BLOCK_M"] = block_m
        name = (f"ln_{regime} N{block_n} M{block_m} {dt}" + (f" w{wdt}" if wdt != dt else "")
                + (" +res" if residual else "") + (" +stats" if stats else "") + f" vec{vec}")
        return KernelSpec(name=name, fn=_ln_fwd_looped if looped else _ln_fwd_rows,
                          signature=sig(dt, wdt, looped, stats), constexprs=consts, num_warps=warps,
                          num_stages=_STAGES[regime],
                          expect_v4_loads=aligned and dt in ("fp16", "bf16") and block_n >= 1024)

    configs = [("rows",) + c for c in _ROW_CONFIGS] + [("looped",) + _LOOPED_CONFIG]
    specs = []
    for c in configs:
        specs.append(spec(*c, "fp16"))
        specs.append(spec(*c, "bf16"))
    for c in (configs[3], configs[7], configs[8]):  # N <= 1024 (batched rows), 16384, looped
        specs.append(spec(*c, "fp32"))
        specs.append(spec(*c, "fp16", wdt="fp32", residual=False, stats=False))
        specs.append(spec(*c, "fp16", aligned=False))
    return specs
