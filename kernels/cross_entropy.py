"""Linear cross-entropy: the loss of logits = x @ weight.T against targets, without the (N, V) logits.

Math, for N tokens x_n (C,) with targets t_n (rows whose target is ignore_index count for nothing):

    logits_n = x_n @ W.T                                  (V,), W (V, C): the tied embedding, say
    lse_n    = log sum_j exp(logits_n[j])
    loss     = sum_n (lse_n - logits_n[t_n]) * s          s = 1 / (number of counted rows) ("mean") or 1 ("sum")
    dlogits  = (softmax(logits_n) - onehot(t_n)) * s      (0 for ignored rows)
    dx_n     = dlogits_n @ W,    dW = sum_n dlogits_n^T x_n

The gradients need nothing but the logits, so they are computed in the forward, a chunk of tokens at a
time (the idea of Liger-Kernel's fused linear cross-entropy): per chunk, the logits GEMM writes a (rows,
V) buffer, one kernel reads each row twice (online max and sum of exp, then the gradient) and overwrites
the logits with dlogits in place, then dx for those rows and the chunk's share of dW are two GEMMs. The
backward only scales the stored dx and dW by the incoming gradient of the loss.

Memory. Materialised (F.linear then F.cross_entropy, autocast's way) a step holds the logits in the
compute dtype, their fp32 copy and log-softmax for the backward, then the fp32 and compute-dtype
gradients: some 3-4 arrays of N x V (8192 x 50257 fp32: 1.6 GB each). Here: one (rows, V) buffer, with
rows chosen so that it holds about 2^26 values (1024 rows at V = 50257), plus dx (N, C) and an fp32 dW
(V, C), which the materialised backward makes too. ``benchmarks/bench_cross_entropy.py`` measures both
peaks.

Precision: logits in the compute dtype (as autocast's F.linear makes them), everything after in fp32;
dW accumulates over the chunks in fp32 (the GEMM of kernels.gelu_mlp, adding each chunk's product into
the fp32 buffer in its epilogue); dx is written in the compute dtype.

Backends. On CUDA (and under TRITON_INTERPRET=1) the per-row loss/gradient pass is ``_ce_kernel`` and
dW's accumulation is the Triton GEMM; the logits and dx products are torch.matmul (cuBLAS on CUDA). On
the CPU the same chunk loop runs in PyTorch (``backend="torch"``). ``kernels.reference.
linear_cross_entropy`` is the plain materialised version.

Sources (ideas, no code): Liger-Kernel, "Liger Kernel: Efficient Triton Kernels for LLM Training" (2024)
(chunked fused linear cross-entropy, gradient in place of the logits); Milakov & Gimelshein, "Online
normalizer calculation for softmax" (one pass for max and sum).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.compile_report import KernelSpec
from kernels.gelu_mlp import gemm

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _ce_kernel(
    Logits, Targets, Loss, Scale,
    stride_lm, V, V_PAD, ignore_index,
    HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One row: loss = lse - logit[target] (fp32), and with HAS_GRAD the row's logits are overwritten by
    # (softmax - onehot) * scale, the padding columns V..V_PAD by 0. An out-of-range target gives NaN.
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_lm
    t = tl.load(Targets + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)

    # pass 1: running maximum and sum of exp. Differences are taken before the scaling to base 2, so the
    # exponent's rounding is relative to |l - max| (small where it matters), not to |l|.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        lg = tl.load(Logits + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(lg, axis=0))
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((lg - m_new) * LOG2E), axis=0)
        m = m_new
    log_s = tl.log2(s) * LN2  # lse = m + log_s; kept apart, so no large number is rounded (as log_softmax)

    counted = t != ignore_index
    in_range = (t >= 0) & (t < V)
    logit_t = tl.load(Logits + t, mask=counted & in_range, other=0.0).to(tl.float32)
    loss = tl.where(counted, (m - logit_t) + log_s, 0.0)
    loss = tl.where(counted & (~in_range), float("nan"), loss)
    tl.store(Loss + row, loss)

    if HAS_GRAD:
        # each element is read before it is overwritten, and only by this program
        scale = tl.where(counted, tl.load(Scale), 0.0)
        for start in range(0, V_PAD, BLOCK_V):
            c = start + cols
            lg = tl.load(Logits + c, mask=c < V, other=float("-inf")).to(tl.float32)
            p = tl.exp2(((lg - m) - log_s) * LOG2E)  # softmax; 0 in the padding
            p = tl.where(c == t, p - 1.0, p) * scale
            tl.store(Logits + c, p.to(Logits.dtype.element_ty), mask=c < V_PAD)


# ------------------------------------------------------------------------------------------- launcher
_BLOCK_V, _WARPS = 4096, 8  # 16 fp32 values per thread and pass; V = 50257 in 13 blocks
_CHUNK_VALUES = 1 << 26  # a chunk's logits buffer: ~2^26 values (128 MB in bf16, 256 MB in fp32)
_V_ALIGN = 128  # the buffer's row stride and dW's rows: dW's GEMM reads dlogits column-major, 128-row tiles


def chunk_rows(N: int, V: int) -> int:
    """Tokens per chunk: the largest power of two (>= 16) whose (rows, V) buffer stays within
    _CHUNK_VALUES, and no more than N needs. Bigger chunks mean fewer passes of the fp32 dW
    accumulation (each reads and writes V x C fp32); smaller ones, less memory."""
    rows = max(16, 1 << max(0, int(math.log2(max(1, _CHUNK_VALUES // max(V, 1))))))
    return max(1, min(rows, N))


def _ce_rows_triton(logits, targets, loss, scale, V: int, ignore_index: int, with_grad: bool) -> None:
    rows = logits.shape[0]
    if rows:
        _ce_kernel[(rows,)](logits, targets, loss, scale, logits.stride(0), V, logits.shape[1], ignore_index,
                            HAS_GRAD=with_grad, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(logits.shape[1])),
                            num_warps=_WARPS)


def _ce_rows_torch(logits, targets, loss, scale, V: int, ignore_index: int, with_grad: bool) -> None:
    """The same as _ce_kernel in PyTorch ops (the CPU path): loss into `loss`, the gradient over logits."""
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)
    lg = logits[:, :V].to(acc_dtype)  # the buffer itself when it is fp32 already
    counted = targets != ignore_index
    t = torch.where(counted, targets, 0)
    m = lg.amax(dim=1, keepdim=True)
    shifted_t = lg.gather(1, t[:, None]) - m  # the target's logit - max, before lg is overwritten
    p = lg.sub_(m).exp_()  # in place, as the kernel: no second (rows, V) array
    s = p.sum(dim=1, keepdim=True)
    loss.copy_(torch.where(counted, (s.log() - shifted_t)[:, 0], 0.0))
    if with_grad:
        p.div_(s)
        p[torch.arange(len(t), device=t.device), t] -= 1.0
        p.mul_((scale * counted)[:, None])
        if p.data_ptr() != logits.data_ptr():
            logits[:, :V].copy_(p)
        logits[:, V:].zero_()


def _chunked(x, weight, targets, *, ignore_index: int, reduction: str, compute_dtype, backend: str,
             grad_x: bool, grad_w: bool, chunk_size: int | None):
    """(loss, dx or None, dW or None) for x (N, C), weight (V, C), targets (N,) int64; the gradients are
    those of the returned loss, in x's and weight's dtypes."""
    N, C = x.shape
    V = weight.shape[0]
    dev = x.device
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)
    xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
    counted = (targets != ignore_index).sum()
    scale = (1.0 / counted.to(acc_dtype)) if reduction == "mean" else torch.ones((), dtype=acc_dtype, device=dev)
    scale = scale.reshape(1)
    with_grad = grad_x or grad_w
    loss_rows = torch.empty(N, device=dev, dtype=acc_dtype)
    dx = torch.empty((N, C), device=dev, dtype=compute_dtype) if grad_x else None
    v_pad = triton.cdiv(V, _V_ALIGN) * _V_ALIGN
    dw = None
    rows = chunk_size or chunk_rows(N, V)
    buf = torch.empty((min(rows, N), v_pad), device=dev, dtype=compute_dtype)
    ce_rows = _ce_rows_triton if backend == "triton" else _ce_rows_torch
    for start in range(0, N, rows):
        end = min(start + rows, N)
        xs, logits = xc[start:end], buf[:end - start]
        torch.matmul(xs, wc.t(), out=logits[:, :V])  # the padded row stride is kept (ld = v_pad)
        ce_rows(logits, targets[start:end], loss_rows[start:end], scale, V, ignore_index, with_grad)
        if grad_x:
            torch.matmul(logits[:, :V], wc, out=dx[start:end])
        if grad_w:
            if backend == "triton":  # dW (v_pad, C) += dlogits.T @ xs, fp32, in the GEMM's epilogue
                if dw is None:
                    dw = torch.empty((v_pad, C), device=dev, dtype=acc_dtype)
                gemm(logits.t(), xs.t(), dw, residual=None if start == 0 else dw)
            elif dw is None:
                dw = logits.t().to(acc_dtype) @ xs.to(acc_dtype)
            else:  # in place: no second (v_pad, C) array
                dw.addmm_(logits.t().to(acc_dtype), xs.to(acc_dtype))
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss * scale[0]
    if dx is not None:
        dx = dx.to(x.dtype)
    if dw is not None:
        dw = dw[:V].to(weight.dtype)
    return loss, dx, dw


# ------------------------------------------------------------------------------------ autograd.Function
class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked loss with its gradients computed in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, compute_dtype, backend, chunk_size):
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
            loss, dx, dw = _chunked(x, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                    compute_dtype=compute_dtype, backend=backend, grad_x=ctx.needs_input_grad[0],
                                    grad_w=ctx.needs_input_grad[1], chunk_size=chunk_size)
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        # out of place: a second backward (retain_graph) must find the stored gradients unscaled
        return (None if dx is None else dx * grad_loss.to(dx.dtype),
                None if dw is None else dw * grad_loss.to(dw.dtype), None, None, None, None, None, None)


def fused_linear_cross_entropy(x, weight, targets, *, ignore_index: int = -100, reduction: str = "mean",
                               compute_dtype: torch.dtype | None = None, backend: str = "triton",
                               chunk_size: int | None = None) -> torch.Tensor:
    """What kernels.linear_cross_entropy runs (inputs validated there): the chunked loss, differentiable.

    x: (N, C); weight: (V, C); targets: (N,) int64; reduction "mean" (over the counted rows; NaN when
    none counts, as F.cross_entropy) or "sum". x and weight are cast to compute_dtype (default x's) for
    the GEMMs. backend: "triton" (the row kernel and dW's GEMM) or "torch" (the CPU path). chunk_size:
    tokens per chunk (default chunk_rows). Returns the loss, a 0-dim fp32 tensor (float64 for float64).
    """
    compute_dtype = compute_dtype or x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, compute_dtype, backend,
                                         chunk_size)
    with torch.autocast(x.device.type, enabled=False):
        return _chunked(x, weight, targets, ignore_index=ignore_index, reduction=reduction,
                        compute_dtype=compute_dtype, backend=backend, grad_x=False, grad_w=False,
                        chunk_size=chunk_size)[0]


def compile_specs() -> list[KernelSpec]:
    """The row kernel in each dtype, with the gradient pass (training) and without (evaluation)."""
    def spec(dt, grad):
        sig = {"Logits": f"*{dt}", "Targets": "*i64", "Loss": "*fp32", "Scale": "*fp32", "stride_lm": "i32",
               "V": "i32", "V_PAD": "i32", "ignore_index": "i32", "HAS_GRAD": "constexpr", "BLOCK_V": "constexpr"}
        return KernelSpec(name=f"ce_rows V{_BLOCK_V} {dt}" + (" +grad" if grad else ""), fn=_ce_kernel,
                          signature=sig, constexprs={"HAS_GRAD": grad, "BLOCK_V": _BLOCK_V}, num_warps=_WARPS,
                          num_stages=2)

    return [spec("bf16", True), spec("bf16", False), spec("fp16", True), spec("fp32", True)]
