"""Residual add + LayerNorm over the last dim, fused into one pass over memory.

Math, per row of N values (x, and optionally the residual r, flattened to (M, N)):

    h    = x + r                      (fp32; stored in x's dtype when there is a residual)
    mean = sum(h) / N
    var  = sum((h - mean)^2) / N      (centred: exact enough for -20 + 0.5*randn or 1e4*randn rows,
                                       where E[h^2] - E[h]^2 cancels away the variance in fp32)
    rstd = 1 / sqrt(var + eps)
    y    = (h - mean) * rstd * weight + bias      (from the fp32 h, not from the rounded stored h)

Statistics are fp32 whatever the input dtype; weight and bias may have another dtype than x (an fp32
master copy with fp16 activations) and are upcast on load. x, the residual and the outputs may each have
their own dtype (under autocast: a bf16 branch, an fp32 residual stream h, a bf16 y for the next matmul).
mean and rstd (M,) fp32 are written when a backward will need them.

Backward, per row, for the incoming gradients dy (of y) and dh_out (of the returned h, when it is used):

    xhat = (h - mean) * rstd                       (h as stored: x, or x + r in h's dtype)
    g    = dy * weight
    dh   = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_out
    dx   = d residual = dh                         (the add passes the gradient to both inputs)
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy

Each program of the backward walks a strided set of row blocks and keeps its share of dweight and dbias
in registers (fp32); it writes one row of partial sums, and a (programs, N) sum finishes them: no atomics.
The backward reads h, dy (and dh_out) once and writes dx (and d residual when its dtype differs) once.

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

Sources (ideas, no code): the Triton "Layer Normalization" tutorial (row-per-program fused LayerNorm
and its backward); Liger-Kernel's LayerNorm (per-program partial weight gradients, summed after);
Chan, Golub and LeVeque, "Algorithms for computing the sample variance" (merging partial variances);
Welford, "Note on a method for calculating corrected sums of squares and products".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._device import sm_count
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


@triton.jit
def _vec_rows(Base, rows, cols, stride, VEC: tl.constexpr):
    """Pointers to a (rows, cols) tile of a row-major tensor, with the 16-byte groups stated (see above)."""
    ptrs = Base + rows[:, None] * stride + cols[None, :]
    if VEC > 1:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, 16]), [1, VEC])
    return ptrs


@triton.jit
def _ln_bwd_rows(
    DY, DHO, H, W, Mean, Rstd, DX, DR, DW, DB,
    stride_dym, stride_dhm, stride_hm, stride_dxm, stride_drm,
    M, N, BLOCKS_PER_PROGRAM,
    HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    # Program p handles row blocks p, p + P, p + 2P, ... (P programs) and writes row p of the (P, N)
    # partial dweight / dbias. DHO is the incoming gradient of h (HAS_DH), DR the residual's gradient
    # when it needs a dtype of its own (HAS_DR); otherwise dx serves both inputs.
    WA: tl.constexpr = _group_align(VEC, W.dtype.element_ty.primitive_bitwidth)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_ptr = W + cols
    if VEC > 1:
        col_ok = tl.max_constancy(col_ok, [VEC])
        w_ptr = tl.max_contiguous(tl.multiple_of(w_ptr, [WA]), [VEC])
    w = tl.load(w_ptr, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, BLOCKS_PER_PROGRAM):
        rows = (pid + i * num_programs).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        if VEC > 1:
            mask = tl.max_constancy(mask, [1, VEC])
        h = tl.load(_vec_rows(H, rows, cols, stride_hm, VEC), mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(_vec_rows(DY, rows, cols, stride_dym, VEC), mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]  # 0 in the padding: dy and w load as 0 there
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dh += tl.load(_vec_rows(DHO, rows, cols, stride_dhm, VEC), mask=mask, other=0.0).to(tl.float32)
        tl.store(_vec_rows(DX, rows, cols, stride_dxm, VEC), dh.to(DX.dtype.element_ty), mask=mask)
        if HAS_DR:
            tl.store(_vec_rows(DR, rows, cols, stride_drm, VEC), dh.to(DR.dtype.element_ty), mask=mask)
        if WEIGHT_GRADS:
            dw += dy * xhat
            db += dy
    if WEIGHT_GRADS:
        part = pid.to(tl.int64) * N + cols
        tl.store(DW + part, tl.sum(dw, axis=0), mask=col_ok)
        tl.store(DB + part, tl.sum(db, axis=0), mask=col_ok)


@triton.jit
def _ln_bwd_looped(
    DY, DHO, H, W, Mean, Rstd, DX, DR, DW, DB,
    stride_dym, stride_dhm, stride_hm, stride_dxm, stride_drm,
    M, N, ROWS_PER_PROGRAM,
    HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
    BLOCK_N: tl.constexpr, VEC: tl.constexpr,
):
    # Rows wider than a register block: program p handles rows p, p + P, ...; pass 1 over a row's chunks
    # sums g * xhat and g, pass 2 re-reads them (from L2) and writes dh. The partial dweight / dbias row
    # of the program (zeroed by the launcher) is updated chunk by chunk: only this program touches it.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N
    for i in range(0, ROWS_PER_PROGRAM):
        row = (pid + i * num_programs).to(tl.int64)
        if row < M:
            h_row = H + row * stride_hm
            dy_row = DY + row * stride_dym
            dh_row = DHO + row * stride_dhm
            dx_row = DX + row * stride_dxm
            dr_row = DR + row * stride_drm
            if VEC > 1:  # 16-byte aligned rows, as the launcher checked (the row offsets lost the fact)
                h_row = tl.multiple_of(h_row, 16)
                dy_row = tl.multiple_of(dy_row, 16)
                dh_row = tl.multiple_of(dh_row, 16)
                dx_row = tl.multiple_of(dx_row, 16)
                dr_row = tl.multiple_of(dr_row, 16)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            c1 = tl.full((), 0.0, tl.float32)
            c2 = tl.full((), 0.0, tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                ok = c < N
                if VEC > 1:
                    ok = tl.max_constancy(ok, VEC)
                h = tl.load(h_row + c, mask=ok, other=0.0).to(tl.float32)
                g = tl.load(dy_row + c, mask=ok, other=0.0).to(tl.float32) * tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
                xhat = tl.where(ok, (h - mean) * rstd, 0.0)
                c1 += tl.sum(xhat * g, axis=0)
                c2 += tl.sum(g, axis=0)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                ok = c < N
                if VEC > 1:
                    ok = tl.max_constancy(ok, VEC)
                h = tl.load(h_row + c, mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=ok, other=0.0).to(tl.float32)
                xhat = tl.where(ok, (h - mean) * rstd, 0.0)
                dh = (dy * tl.load(W + c, mask=ok, other=0.0).to(tl.float32) - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dh += tl.load(dh_row + c, mask=ok, other=0.0).to(tl.float32)
                tl.store(dx_row + c, dh.to(DX.dtype.element_ty), mask=ok)
                if HAS_DR:
                    tl.store(dr_row + c, dh.to(DR.dtype.element_ty), mask=ok)
                if WEIGHT_GRADS:
                    tl.store(DW + c, tl.load(DW + c, mask=ok, other=0.0) + dy * xhat, mask=ok)
                    tl.store(DB + c, tl.load(DB + c, mask=ok, other=0.0) + dy, mask=ok)


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


def _vec(tensors, strides, N: int) -> int:
    """VEC for 16-byte groups of the narrowest dtype among the row tensors (wider ones then move 16-byte
    multiples), when every row start is 16-byte aligned and N and the row strides are multiples of it."""
    vec = 16 // min(t.element_size() for t in tensors)
    aligned = (N % vec == 0 and all(t.data_ptr() % 16 == 0 for t in tensors) and all(s % vec == 0 for s in strides))
    return vec if aligned else 1


def layer_norm_fwd(x, weight, bias, *, eps: float, residual=None, return_stats: bool = False, out_dtype=None):
    """LayerNorm over the last dim of x (..., N), fused with `h = x + residual` when residual is given.

    weight, bias: (N,), any float dtype (upcast on load). residual: None or x's shape, any float dtype.
    Returns y; (y, h) with a residual; with return_stats the same followed by mean, rstd (M,) fp32.
    h has x's shape and the promoted dtype of x and residual; y has x's shape and out_dtype (default: h's
    dtype, or x's without a residual). Both are contiguous.
    """
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or h_dtype)
    h = torch.empty((M, N), device=x.device, dtype=h_dtype) if residual is not None else None
    mean = torch.empty(M, device=x.device, dtype=torch.float32) if return_stats else None
    rstd = torch.empty(M, device=x.device, dtype=torch.float32) if return_stats else None

    if M > 0 and N > 0:
        x2 = _as_rows(x, N)
        r2 = _as_rows(residual, N) if residual is not None else None
        w = weight.contiguous()
        b = bias.contiguous()
        rows = [t for t in (x2, r2, y, h) if t is not None]
        vec = _vec(rows + [w, b], [t.stride(0) for t in rows], N)
        regime, block_n, block_m, warps = _config(N)
        args = (x2, r2 if r2 is not None else x2, w, b, y, h if h is not None else y,
                mean if mean is not None else y, rstd if rstd is not None else y,
                x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0)
        flags = dict(HAS_RESIDUAL=residual is not None, STORE_STATS=return_stats,
                     BLOCK_N=block_n, VEC=vec, num_warps=warps, num_stages=_STAGES[regime])
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


# The backward holds about four row-sized fp32 arrays beside the two weight-gradient accumulators, so its
# blocks hold half the forward's values per thread at most (<= 16 of each; no spills, see compile_specs),
# and rows past 8192 take the looped kernel.
_BWD_ROW_CONFIGS = (
    (128, 16, 4),
    (256, 8, 4),
    (512, 4, 4),
    (1024, 2, 8),  # 4 warps spilled on sm_90 in the autocast form (fp32 h, dh, d residual)
    (2048, 1, 8),
    (4096, 1, 8),
    (8192, 1, 16),
)
_BWD_LOOPED_CONFIG = (2048, 1, 8)
_BWD_PROGRAMS_PER_SM = 4  # programs of the persistent backward: enough warps in flight to hide latency


def _bwd_config(N: int) -> tuple[str, int, int, int]:
    for block_n, block_m, warps in _BWD_ROW_CONFIGS:
        if N <= block_n:
            return "rows", block_n, block_m, warps
    return ("looped",) + _BWD_LOOPED_CONFIG


def layer_norm_bwd(dy, h, weight, mean, rstd, *, dh=None, dx_dtype=None, dres_dtype=None,
                   weight_grads: bool = True):
    """Gradients of layer_norm_fwd from the incoming gradients of its outputs.

    dy: (..., N), the gradient of y (None: zero); dh: None or (..., N), the gradient of the returned h;
    h: the normalised input as the forward stored it (x + residual, or x); weight (N,); mean, rstd (M,)
    fp32 from the forward. Returns (dx, dres, dweight, dbias): dx (..., N) in dx_dtype (default h's);
    dres, the residual's gradient, in dres_dtype: the very tensor dx when that is None or dx's dtype;
    dweight, dbias (N,) fp32 (None without weight_grads).
    """
    N = h.shape[-1]
    M = math.prod(h.shape[:-1])
    if dy is None:
        dy = torch.zeros_like(h)
    dx_dtype = dx_dtype or h.dtype
    dx = torch.empty((M, N), device=h.device, dtype=dx_dtype)
    separate_dr = dres_dtype is not None and dres_dtype != dx_dtype
    dr = torch.empty((M, N), device=h.device, dtype=dres_dtype) if separate_dr else None
    regime, block_n, block_m, warps = _bwd_config(N)
    n_blocks = triton.cdiv(M, block_m)
    programs = max(1, min(n_blocks, _BWD_PROGRAMS_PER_SM * sm_count(h.device)))
    # partial sums, one row per program; the looped kernel adds into its row, so it starts from zero
    alloc = torch.zeros if regime == "looped" else torch.empty
    dw_part = alloc((programs, N) if weight_grads else (1,), device=h.device, dtype=torch.float32)
    db_part = alloc((programs, N) if weight_grads else (1,), device=h.device, dtype=torch.float32)

    if M > 0 and N > 0:
        dy2, h2 = _as_rows(dy, N), _as_rows(h, N)
        dh2 = _as_rows(dh, N) if dh is not None else None
        w = weight.contiguous()
        rows = [t for t in (dy2, h2, dh2, dx, dr) if t is not None]
        vec = _vec(rows + [w], [t.stride(0) for t in rows], N)
        args = (dy2, dh2 if dh2 is not None else dy2, h2, w, mean, rstd, dx, dr if dr is not None else dx,
                dw_part, db_part, dy2.stride(0), dh2.stride(0) if dh2 is not None else 0, h2.stride(0),
                dx.stride(0), dr.stride(0) if dr is not None else 0, M, N, triton.cdiv(n_blocks, programs))
        flags = dict(HAS_DH=dh is not None, HAS_DR=separate_dr, WEIGHT_GRADS=weight_grads, BLOCK_N=block_n,
                     VEC=vec, num_warps=warps, num_stages=_STAGES[regime])
        if regime == "rows":
            _ln_bwd_rows[(programs,)](*args, BLOCK_M=block_m, **flags)
        else:
            _ln_bwd_looped[(programs,)](*args, **flags)
    elif weight_grads:
        dw_part.zero_()
        db_part.zero_()
    dx = dx.view(h.shape)
    dres = dr.view(h.shape) if separate_dr else (dx if dres_dtype is not None else None)
    if not weight_grads:
        return dx, dres, None, None
    return dx, dres, dw_part.sum(0), db_part.sum(0)


# ------------------------------------------------------------------------------------ autograd.Function
class _LayerNorm(torch.autograd.Function):
    """layer_norm_fwd with its backward; with a residual the outputs are (y, h), both differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, out_dtype):
        ctx.set_materialize_grads(False)  # an unused h sends no gradient: the kernel then reads none
        out = layer_norm_fwd(x, weight, bias, eps=eps, residual=residual, return_stats=True, out_dtype=out_dtype)
        y, mean, rstd = out[0], out[-2], out[-1]
        normalised = x if residual is None else out[1]
        ctx.save_for_backward(normalised, weight, mean, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype, bias.dtype)
        return y if residual is None else (y, out[1])

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        x_dt, r_dt, w_dt, b_dt = ctx.dtypes
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if dy is None:  # only h was used: the add passes its gradient on, y's parameters get none
            if dh is None:
                return None, None, None, None, None, None
            return (dh.to(x_dt) if need_x else None, None, None, dh.to(r_dt) if need_r else None, None, None)
        dx, dres, dw, db = layer_norm_bwd(dy, h, weight, mean, rstd, dh=dh, dx_dtype=x_dt,
                                          dres_dtype=r_dt if need_r else None, weight_grads=need_w or need_b)
        return (dx if need_x else None, dw.to(w_dt) if need_w else None, db.to(b_dt) if need_b else None,
                dres, None, None)


def fused_layer_norm(x, weight, bias, *, eps: float, residual=None, out_dtype=None):
    """What kernels.layer_norm runs on the Triton path (inputs validated there): layer_norm_fwd, through
    _LayerNorm when autograd records the call (mean and rstd are then kept, fp32, with h or x).

    x: (..., N); weight, bias: (N,); residual: None or x's shape. Returns y, or (y, h) with a residual;
    dtypes as layer_norm_fwd.
    """
    tensors = (x, weight, bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LayerNorm.apply(x, weight, bias, residual, float(eps), out_dtype)
    return layer_norm_fwd(x, weight, bias, eps=eps, residual=residual, out_dtype=out_dtype)


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

    def autocast_spec(regime, block_n, block_m, warps):
        """Training under bf16 autocast: a bf16 branch x, the fp32 stream r and h, bf16 y, fp32 weights."""
        s = spec(regime, block_n, block_m, warps, "bf16", wdt="fp32")
        s.signature.update(R="*fp32", H="*fp32")
        s.name += " r,h:fp32"
        return s

    def bwd_spec(regime, block_n, block_m, warps, dt, *, autocast=False, aligned=True):
        """autocast: dy and dx bf16, h, dh and the residual's gradient fp32 (HAS_DR), fp32 weights."""
        looped = regime == "looped"
        row32 = "fp32" if autocast else dt
        sig = {"DY": f"*{dt}", "DHO": f"*{row32}", "H": f"*{row32}", "W": f"*{row32 if autocast else dt}",
               "Mean": "*fp32", "Rstd": "*fp32", "DX": f"*{dt}", "DR": f"*{row32}", "DW": "*fp32", "DB": "*fp32",
               "stride_dym": "i32", "stride_dhm": "i32", "stride_hm": "i32", "stride_dxm": "i32", "stride_drm": "i32",
               "M": "i32", "N": "i32", ("ROWS_PER_PROGRAM" if looped else "BLOCKS_PER_PROGRAM"): "i32"}
        vec = (16 // {"fp16": 2, "bf16": 2, "fp32": 4}[dt]) if aligned else 1
        consts = {"HAS_DH": True, "HAS_DR": autocast, "WEIGHT_GRADS": True}
        if not looped:
            consts["BLOCK_M"] = block_m
        consts.update(BLOCK_N=block_n, VEC=vec)
        sig.update({k: "constexpr" for k in consts})
        name = f"ln_bwd_{regime} N{block_n} M{block_m} {dt}" + (" r,h:fp32 +dr" if autocast else "") + f" vec{vec}"
        return KernelSpec(name=name, fn=_ln_bwd_looped if looped else _ln_bwd_rows, signature=sig,
                          constexprs=consts, num_warps=warps, num_stages=_STAGES[regime],
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
    specs += [autocast_spec(*configs[3]), autocast_spec(*configs[5])]  # N = 768 .. 1024, 1600 .. 2048
    # the backward: every config in the autocast form (the heaviest: four row tensors, two stores),
    # fp16 without the separate residual gradient, fp32, and the scalar-load fallback
    bwd_configs = [("rows",) + c for c in _BWD_ROW_CONFIGS] + [("looped",) + _BWD_LOOPED_CONFIG]
    for c in bwd_configs:
        specs.append(bwd_spec(*c, "bf16", autocast=True))
    specs += [bwd_spec(*bwd_configs[3], "fp16"), bwd_spec(*bwd_configs[6], "fp32"),
              bwd_spec(*bwd_configs[3], "fp16", aligned=False)]
    return specs
