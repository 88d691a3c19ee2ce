"""The public ops as PyTorch operators (``torch.ops.fastgpt.*``): what ``torch.compile`` sees of them.

Under ``torch.compile`` each public op in ``kernels`` validates its inputs as always (Dynamo traces the
checks: they read shapes, dtypes and devices, which become guards) and then calls one operator of this
library, a single node in the graph. Inductor compiles everything between the nodes and calls each node's
kernel as it is, so no Triton launch, host-side launch plan or autotuner is ever traced, on any backend:
no graph break at a kernel and no recompilation when an autotuner or a split plan picks differently.

Each operator has
* one kernel per device, registered with the library: "CUDA" runs the Triton kernels; "CPU" runs them
  under Triton's interpreter when TRITON_INTERPRET=1, else ``kernels.reference``. The op contract's
  device dispatch lives here, at run time, so a compiled graph is the same graph on every device and
  under the interpreter (the CPU tests of the graph are tests of the CUDA graph);
* a fake (meta) implementation: output shapes and dtypes from input shapes alone, backend-independent;
* for the four trainable ops, autograd registered through the library (``register_autograd``): the forward
  operator returns the residuals its backward needs as extra outputs, the same on every backend (see the
  end of kernels/reference.py), and a backward operator with its own per-device kernels computes the
  gradients. The decode and paged ops are for inference and have none.

What stays in Python, traced: ``reference_ops()`` and the autocast dtype are read by the public op and
passed down as arguments (``reference``, the compute/out dtypes), so a backward runs on the backend its
forward chose (``reference`` is saved with the residuals) and a flag flipped between calls is a guard
(one recompilation), never a stale graph. TRITON_INTERPRET is read by the CPU kernels when they run.

Eager calls do not come through here: the dispatcher costs some 10-40 microseconds a call in Python
(measured with torch 2.13 on the 2-core development machine: a no-op custom op 7 us without autograd, 20
us with ``register_autograd``), which a decode step of the bundled model (4 layers, ~20 op calls) would
feel. Eager ``kernels.*`` call the same launchers and references directly, with their autograd.Functions.
"""

from __future__ import annotations

import contextlib
import os

import torch

from kernels import attention as _attn
from kernels import cross_entropy as _ce
from kernels import decode_attention as _dec
from kernels import gelu_mlp as _mlp
from kernels import layer_norm as _ln
from kernels import paged_attention as _paged
from kernels import reference

_lib = torch.library.Library("fastgpt", "DEF")
NAMESPACE = "fastgpt"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton(t: torch.Tensor, ref: bool) -> bool:
    """Whether a kernel of this library runs Triton for t: CUDA, or the CPU under the interpreter."""
    return not ref and (t.is_cuda or _interpreting())


def _launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _define(name: str, schema: str, kernel, fake, mutates: bool = False) -> None:
    """One operator: schema, the same Python kernel under the CPU and CUDA keys (it picks the backend for
    its device as its docstring says), and the fake. No autocast inside a kernel: the casts it needs are
    explicit arguments (autocast's state would otherwise change dtypes the fake cannot see)."""

    def run(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return kernel(*args)

    _lib.define(name + schema, tags=() if mutates else (torch.Tag.pt2_compliant_tag,))
    for key in ("CPU", "CUDA"):
        _lib.impl(name, run, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)


def _contiguous(*ts):
    return tuple(t.contiguous() for t in ts)


# ---------------------------------------------------------------------------------------- flash_attention
def _flash_attention(q, k, v, causal, scale, return_lse, ref):
    if _triton(q, ref):
        with _launch_device(q):
            out = _attn.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
        return out if return_lse else (out, q.new_empty(0, dtype=torch.float32))
    if return_lse:
        return _contiguous(*reference.flash_attention_lse(q, k, v, causal, scale))
    o = reference.flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    return o.contiguous(), q.new_empty(0, dtype=torch.float32)


def _flash_attention_fake(q, k, v, causal, scale, return_lse, ref):
    B, H, Tq, _ = q.shape
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty(q.shape), q.new_empty((B, H, Tq) if return_lse else (0,), dtype=lse_dtype)


def _flash_attention_bwd(do, q, k, v, o, lse, causal, scale, need_dq, ref):
    if _triton(q, ref):
        with _launch_device(q):
            dq, dk, dv = _attn.flash_attention_bwd(do, q, k, v, o, lse, causal=causal, softmax_scale=scale,
                                                        need_dq=need_dq)
        dq = dq.contiguous() if dq is not None else q.new_empty(0)
        return dq, dk.contiguous(), dv.contiguous()  # a padded-row buffer (odd D, 16-bit) becomes dense
    dq, dk, dv = reference.flash_attention_backward(do, q, k, v, o, lse, causal, scale)
    return (dq.contiguous() if need_dq else q.new_empty(0)), dk.contiguous(), dv.contiguous()


def _flash_attention_bwd_fake(do, q, k, v, o, lse, causal, scale, need_dq, ref):
    return q.new_empty(q.shape if need_dq else (0,)), k.new_empty(k.shape, dtype=q.dtype), v.new_empty(v.shape, dtype=q.dtype)


_define("flash_attention", "(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, bool return_lse, "
        "bool reference) -> (Tensor, Tensor)", _flash_attention, _flash_attention_fake)
_define("flash_attention_backward", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "bool causal, float softmax_scale, bool need_dq, bool reference) -> (Tensor, Tensor, Tensor)",
        _flash_attention_bwd, _flash_attention_bwd_fake)


def _flash_attention_setup(ctx, inputs, output):
    q, k, v, causal, scale, return_lse, ref = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.ref, ctx.has_lse = causal, scale, ref, return_lse


def _flash_attention_grad(ctx, do, _dlse):
    if not ctx.has_lse:
        raise RuntimeError("fastgpt::flash_attention was called with return_lse=False and then differentiated")
    q, k, v, o, lse = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    dq, dk, dv = torch.ops.fastgpt.flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, need_dq,
                                                            ctx.ref)
    return (dq if need_dq else None), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


torch.library.register_autograd("fastgpt::flash_attention", _flash_attention_grad,
                                setup_context=_flash_attention_setup, lib=_lib)


def flash_attention(q, k, v, causal: bool, softmax_scale: float, ref: bool) -> torch.Tensor:
    """kernels.flash_attention under torch.compile (validated, autocast's cast already applied)."""
    record = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.fastgpt.flash_attention(q, k, v, causal, softmax_scale, record, ref)[0]


# ---------------------------------------------------------------------------------------------- layer_norm
def _no_stats(x):
    """Two distinct empty tensors: an operator's outputs must not alias one another."""
    return x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)


def _layer_norm(x, weight, bias, residual, eps, out_dtype, return_stats, ref):
    if _triton(x, ref):
        with _launch_device(x):
            out = _ln.layer_norm_fwd(x, weight, bias, eps=eps, residual=residual, return_stats=return_stats,
                                             out_dtype=out_dtype)
        out = out if isinstance(out, tuple) else (out,)
        y, h = out[0], (out[1] if residual is not None else x.new_empty(0))
        mean, rstd = (out[-2], out[-1]) if return_stats else _no_stats(x)
        return y, h, mean, rstd
    if residual is None:
        y, h = reference.layer_norm(x, weight, bias, eps=eps), x
    else:
        y, h = reference.layer_norm(x, weight, bias, eps=eps, residual=residual)
    mean, rstd = reference.layer_norm_stats(h, eps) if return_stats else _no_stats(x)
    h = h.contiguous() if residual is not None else x.new_empty(0)
    return y.to(out_dtype or y.dtype).contiguous(), h, mean, rstd


def _layer_norm_fake(x, weight, bias, residual, eps, out_dtype, return_stats, ref):
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats_dtype = torch.promote_types(h_dtype, torch.float32)  # fp32; float64 only on the reference
    stats = x.new_empty((M,) if return_stats else (0,), dtype=stats_dtype)
    h = x.new_empty(x.shape, dtype=h_dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype or h_dtype), h, stats, stats.new_empty(stats.shape)


def _layer_norm_bwd(dy, dh, h, weight, mean, rstd, x_dtype, res_dtype, weight_grads, ref):
    if dy is None:
        dy = torch.zeros_like(h)
    if _triton(h, ref):
        with _launch_device(h):
            dx, dres, dw, db = _ln.layer_norm_bwd(dy, h, weight, mean, rstd, dh=dh, dx_dtype=x_dtype,
                                                          dres_dtype=res_dtype, weight_grads=weight_grads)
    else:
        dx, dw, db = reference.layer_norm_backward(dy, h, weight, mean, rstd)
        if dh is not None:
            dx = dx + dh.to(dx.dtype)
        dres = dx.to(res_dtype) if res_dtype is not None else None
        dx = dx.to(x_dtype)
    # the residual's gradient is dx itself when their dtypes match (the caller passes it twice)
    dres = dres if dres is not None and res_dtype != x_dtype else h.new_empty(0, dtype=res_dtype or x_dtype)
    if not weight_grads:
        dw, db = _no_stats(h)
    return dx.contiguous(), dres.contiguous(), dw, db


def _layer_norm_bwd_fake(dy, dh, h, weight, mean, rstd, x_dtype, res_dtype, weight_grads, ref):
    N = h.shape[-1]
    separate = res_dtype is not None and res_dtype != x_dtype
    return (h.new_empty(h.shape, dtype=x_dtype), h.new_empty(h.shape if separate else (0,), dtype=res_dtype or x_dtype),
            h.new_empty((N,) if weight_grads else (0,), dtype=mean.dtype),
            h.new_empty((N,) if weight_grads else (0,), dtype=mean.dtype))


_define("layer_norm", "(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, ScalarType? out_dtype, "
        "bool return_stats, bool reference) -> (Tensor, Tensor, Tensor, Tensor)", _layer_norm, _layer_norm_fake)
_define("layer_norm_backward", "(Tensor? grad_y, Tensor? grad_h, Tensor h, Tensor weight, Tensor mean, Tensor rstd, "
        "ScalarType x_dtype, ScalarType? residual_dtype, bool weight_grads, bool reference) "
        "-> (Tensor, Tensor, Tensor, Tensor)", _layer_norm_bwd, _layer_norm_bwd_fake)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, out_dtype, return_stats, ref = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype, bias.dtype)
    ctx.ref, ctx.has_stats, ctx.has_residual = ref, return_stats, residual is not None


def _layer_norm_grad(ctx, dy, dh, _dmean, _drstd):
    if not ctx.has_stats:
        raise RuntimeError("fastgpt::layer_norm was called with return_stats=False and then differentiated")
    h, weight, mean, rstd = ctx.saved_tensors
    x_dt, r_dt, w_dt, b_dt = ctx.dtypes
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    dh = dh if ctx.has_residual else None
    dx, dres, dw, db = torch.ops.fastgpt.layer_norm_backward(dy, dh, h, weight, mean, rstd, x_dt,
                                                             r_dt if need_r else None, need_w or need_b, ctx.ref)
    if need_r:
        dres = dx if r_dt == x_dt else dres
    return (dx if need_x else None, dw.to(w_dt) if need_w else None, db.to(b_dt) if need_b else None,
            dres if need_r else None, None, None, None, None)


torch.library.register_autograd("fastgpt::layer_norm", _layer_norm_grad, setup_context=_layer_norm_setup, lib=_lib)


def layer_norm(x, weight, bias, eps: float, residual, out_dtype, ref: bool):
    """kernels.layer_norm under torch.compile (validated): y, or (y, h) with a residual."""
    tensors = (x, weight, bias) if residual is None else (x, weight, bias, residual)
    record = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    y, h, _, _ = torch.ops.fastgpt.layer_norm(x, weight, bias, residual, eps, out_dtype, record, ref)
    return y if residual is None else (y, h)


# ------------------------------------------------------------------------------------------------ gelu_mlp
def _gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p, cdt, save_preact, ref):
    # the seed is drawn here, at run time, from torch's CPU generator, as the eager Triton path draws it
    seed = int(torch.randint(0, 2**31 - 1, ())) if dropout_p > 0 else 0
    C, C_out = x.shape[-1], proj_weight.shape[0]
    res = None if residual is None else residual.reshape(-1, C_out)
    if _triton(x, ref):
        out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
        with _launch_device(x):
            out = _mlp.gelu_mlp_fwd(x.reshape(-1, C).to(cdt), fc_weight.to(cdt), fc_bias, proj_weight.to(cdt),
                                         proj_bias, residual=res, out_dtype=out_dtype, save_preact=save_preact,
                                         dropout=(seed, float(dropout_p)) if dropout_p > 0 else None)
        y, z = out if save_preact else (out, None)
    else:
        y, z = reference.gelu_mlp_preact(x.reshape(-1, C).to(cdt), fc_weight.to(cdt), fc_bias.to(cdt),
                                         proj_weight.to(cdt), proj_bias.to(cdt), res, dropout_p, seed)
    z = z.contiguous() if save_preact else x.new_empty(0, dtype=cdt)
    return y.reshape(*x.shape[:-1], C_out).contiguous(), z, torch.tensor(seed, dtype=torch.int64)


def _gelu_mlp_fake(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p, cdt, save_preact, ref):
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    z = x.new_empty((M, fc_weight.shape[0]) if save_preact else (0,), dtype=cdt)
    return (x.new_empty((*x.shape[:-1], proj_weight.shape[0]), dtype=out_dtype), z,
            torch.empty((), dtype=torch.int64))


def _gelu_mlp_bwd(dy, x, z, fc_weight, proj_weight, seed, dropout_p, cdt, needs, ref):
    C, C_out = x.shape[-1], proj_weight.shape[0]
    seed = int(seed)
    x2, w1, w2, dy2 = x.reshape(-1, C).to(cdt), fc_weight.to(cdt), proj_weight.to(cdt), dy.reshape(-1, C_out)
    if _triton(x, ref):
        with _launch_device(x):
            grads = _mlp.gelu_mlp_bwd(dy2, x2, z, w1, w2, dropout=(seed, dropout_p) if dropout_p > 0 else None,
                                           needs=tuple(needs), x_dtype=x.dtype,
                                           weight_dtypes=(fc_weight.dtype, proj_weight.dtype))
    else:
        grads = reference.gelu_mlp_backward(dy2, x2, z, w1, w2, dropout_p, seed)
    dtypes = (x.dtype, fc_weight.dtype, None, proj_weight.dtype, None)
    out = []
    for need, g, dt in zip(needs, grads, dtypes):
        out.append(g.to(dt or g.dtype).contiguous() if need else x.new_empty(0))
    out[0] = out[0].view(x.shape) if needs[0] else out[0]
    return tuple(out)


def _gelu_mlp_bwd_fake(dy, x, z, fc_weight, proj_weight, seed, dropout_p, cdt, needs, ref):
    acc = torch.promote_types(cdt, torch.float32)
    F_, C_out = fc_weight.shape[0], proj_weight.shape[0]
    shapes = ((x.shape, x.dtype), (fc_weight.shape, fc_weight.dtype), ((F_,), acc),
              ((proj_weight.shape), proj_weight.dtype), ((C_out,), acc))
    return tuple(x.new_empty(shape, dtype=dt) if need else x.new_empty(0) for need, (shape, dt) in zip(needs, shapes))


_define("gelu_mlp", "(Tensor x, Tensor fc_weight, Tensor fc_bias, Tensor proj_weight, Tensor proj_bias, "
        "Tensor? residual, float dropout_p, ScalarType compute_dtype, bool save_preact, bool reference) "
        "-> (Tensor, Tensor, Tensor)", _gelu_mlp, _gelu_mlp_fake)
_define("gelu_mlp_backward", "(Tensor grad_out, Tensor x, Tensor preact, Tensor fc_weight, Tensor proj_weight, "
        "Tensor seed, float dropout_p, ScalarType compute_dtype, bool[] needs, bool reference) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _gelu_mlp_bwd, _gelu_mlp_bwd_fake)


def _gelu_mlp_setup(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p, cdt, save_preact, ref = inputs
    _, z, seed = output
    ctx.save_for_backward(x, z, fc_weight, proj_weight, seed)
    ctx.dropout_p, ctx.cdt, ctx.ref, ctx.has_preact = dropout_p, cdt, ref, save_preact
    ctx.dtypes = (fc_bias.dtype, proj_bias.dtype, None if residual is None else residual.dtype)


def _gelu_mlp_grad(ctx, dy, _dz, _dseed):
    if not ctx.has_preact:
        raise RuntimeError("fastgpt::gelu_mlp was called with save_preact=False and then differentiated")
    x, z, fc_weight, proj_weight, seed = ctx.saved_tensors
    b1_dt, b2_dt, r_dt = ctx.dtypes
    needs = list(ctx.needs_input_grad[:5])
    dx, dw1, db1, dw2, db2 = torch.ops.fastgpt.gelu_mlp_backward(dy, x, z, fc_weight, proj_weight, seed,
                                                                 ctx.dropout_p, ctx.cdt, needs, ctx.ref)
    d_res = dy.to(r_dt) if r_dt is not None and ctx.needs_input_grad[5] else None
    grads = (dx, dw1, db1.to(b1_dt) if needs[2] else None, dw2, db2.to(b2_dt) if needs[4] else None)
    return (*(g if need else None for g, need in zip(grads, needs)), d_res, None, None, None, None)


torch.library.register_autograd("fastgpt::gelu_mlp", _gelu_mlp_grad, setup_context=_gelu_mlp_setup, lib=_lib)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p: float, compute_dtype, ref: bool):
    """kernels.gelu_mlp under torch.compile (validated)."""
    tensors = [x, fc_weight, fc_bias, proj_weight, proj_bias] + ([] if residual is None else [residual])
    record = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return torch.ops.fastgpt.gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, float(dropout_p),
                                      compute_dtype, record, ref)[0]


# ------------------------------------------------------------------------------------ linear_cross_entropy
def _linear_cross_entropy(x, weight, targets, ignore_index, reduction, cdt, chunk_size, grad_x, grad_w, ref):
    V = weight.shape[0]
    if ref:  # the materialised F.cross_entropy; its gradients by PyTorch's autograd, here and now
        with torch.enable_grad():
            xr, wr = x.detach().requires_grad_(grad_x), weight.detach().requires_grad_(grad_w)
            loss = reference.linear_cross_entropy(xr.to(cdt), wr.to(cdt), targets, ignore_index=ignore_index,
                                                  reduction=reduction)
            wanted = [t for t, need in ((xr, grad_x), (wr, grad_w)) if need]
            grads = list(torch.autograd.grad(loss, wanted)) if wanted else []
        dx = grads.pop(0) if grad_x else None
        dw = grads.pop(0) if grad_w else None
        loss = loss.detach()
    else:
        backend = "triton" if _triton(x, ref) else "torch"
        if backend == "torch":
            bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
            if bool(bad.any()):
                raise ValueError(f"targets hold {int(targets[bad][0])}, outside [0, {V}) and not "
                                 f"ignore_index={ignore_index}")
        with _launch_device(x):
            loss, dx, dw = _ce._chunked(x, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                                   compute_dtype=cdt, backend=backend, grad_x=grad_x, grad_w=grad_w,
                                                   chunk_size=chunk_size)
    return (loss, dx.contiguous() if grad_x else x.new_empty(0),
            dw.contiguous() if grad_w else weight.new_empty(0))


def _linear_cross_entropy_fake(x, weight, targets, ignore_index, reduction, cdt, chunk_size, grad_x, grad_w, ref):
    return (x.new_empty((), dtype=torch.promote_types(cdt, torch.float32)),
            x.new_empty(x.shape if grad_x else (0,)), weight.new_empty(weight.shape if grad_w else (0,)))


_define("linear_cross_entropy", "(Tensor x, Tensor weight, Tensor targets, int ignore_index, str reduction, "
        "ScalarType compute_dtype, int? chunk_size, bool grad_x, bool grad_w, bool reference) "
        "-> (Tensor, Tensor, Tensor)", _linear_cross_entropy, _linear_cross_entropy_fake)


def _linear_cross_entropy_setup(ctx, inputs, output):
    _, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.has = inputs[7], inputs[8]


def _linear_cross_entropy_grad(ctx, grad_loss, _ddx, _ddw):
    dx, dw = ctx.saved_tensors
    has_x, has_w = ctx.has
    if (ctx.needs_input_grad[0] and not has_x) or (ctx.needs_input_grad[1] and not has_w):
        raise RuntimeError("fastgpt::linear_cross_entropy was differentiated in an input whose gradient it "
                           "was not asked to compute")
    # out of place: a second backward (retain_graph) must find the stored gradients unscaled
    return (dx * grad_loss.to(dx.dtype) if has_x else None, dw * grad_loss.to(dw.dtype) if has_w else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastgpt::linear_cross_entropy", _linear_cross_entropy_grad,
                                setup_context=_linear_cross_entropy_setup, lib=_lib)


def linear_cross_entropy(x2, weight, t2, ignore_index: int, reduction: str, compute_dtype, chunk_size, ref: bool):
    """kernels.linear_cross_entropy under torch.compile (validated; x2 (N, C), t2 (N,))."""
    grad = torch.is_grad_enabled()
    return torch.ops.fastgpt.linear_cross_entropy(x2, weight, t2, ignore_index, reduction, compute_dtype, chunk_size,
                                                  grad and x2.requires_grad, grad and weight.requires_grad, ref)[0]


# ------------------------------------------------------------------------------- decode and paged attention
def _decode_attention(q, k_cache, v_cache, cache_seqlens, scale, ref):
    if _triton(q, ref):
        with _launch_device(q):
            return _dec.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale).contiguous()


def _paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens, scale, ref):
    if _triton(q, ref):
        with _launch_device(q):
            return _paged.paged_decode_attention_fwd(q, k_pages, v_pages, block_table, cache_seqlens,
                                                               softmax_scale=scale)
    return reference.paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens,
                                            softmax_scale=scale).contiguous()


def _paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens, scale, ref):
    if _triton(q, ref):
        with _launch_device(q):
            return _paged.paged_prefill_attention_fwd(q, k_pages, v_pages, block_table, cu_seqlens_q,
                                                                cache_seqlens, softmax_scale=scale)
    return reference.paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens,
                                             softmax_scale=scale).contiguous()


def _paged_kv_write(k, v, k_pages, v_pages, slot_mapping, ref):
    if _triton(k, ref):
        with _launch_device(k):
            _paged.paged_kv_write_fwd(k, v, k_pages, v_pages, slot_mapping)
    else:
        reference.paged_kv_write(k, v, k_pages, v_pages, slot_mapping)


def _like_q(q, *args):
    return q.new_empty(q.shape)


_define("decode_attention", "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float softmax_scale, "
        "bool reference) -> Tensor", _decode_attention, _like_q)
_define("paged_decode_attention", "(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, "
        "Tensor cache_seqlens, float softmax_scale, bool reference) -> Tensor", _paged_decode_attention, _like_q)
_define("paged_prefill_attention", "(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, "
        "Tensor cu_seqlens_q, Tensor cache_seqlens, float softmax_scale, bool reference) -> Tensor",
        _paged_prefill_attention, _like_q)
_define("paged_kv_write", "(Tensor k, Tensor v, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor slot_mapping, "
        "bool reference) -> ()", _paged_kv_write, lambda *args: None, mutates=True)
