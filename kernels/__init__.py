"""fastgpt's fused ops: the public API and the device dispatch.

Every op here validates its inputs once, with an error that names the argument, then dispatches:

* CUDA tensor                       -> the Triton kernel;
* CPU tensor                        -> ``kernels.reference`` (plain PyTorch);
* CPU tensor, ``TRITON_INTERPRET=1`` -> the same Triton kernel, run by Triton's interpreter;
* inside ``with kernels.reference_ops():`` -> ``kernels.reference`` on every device (the PyTorch path
  that ``fastgpt train --reference-ops`` and the benchmarks compare the kernels with).

The environment variable is read at call time, so a test can flip between the interpreter and the
reference inside one process (the ``@triton.jit`` functions themselves are made interpretable when the
variable is set before Triton is imported). Callers never choose a backend.

Training. ``flash_attention``, ``layer_norm``, ``gelu_mlp`` and ``linear_cross_entropy`` have backward
kernels: a call that autograd records runs the Triton forward through a ``torch.autograd.Function``
whose backward runs the Triton backward. Under autocast they cast for themselves, as autocast would for
a matmul: attention's q, k, v and ``gelu_mlp``'s and ``linear_cross_entropy``'s x and weights go to the
autocast dtype for the GEMMs; statistics, softmax and accumulation stay fp32; gradients come back in each
input's own dtype (fp32 master weights get fp32 gradients). ``layer_norm`` under autocast keeps
h = x + residual in the promoted dtype (the fp32 residual stream) and returns y in the autocast dtype:
y only ever feeds a matmul, which would cast it there. The decode and paged attention ops are for
inference and have no backward: a call autograd must see, or one under autocast, takes the reference.
``linear_cross_entropy`` on a CPU without the interpreter runs its chunked PyTorch path (the logits
never exist whole there either); its reference is the materialised F.cross_entropy(x @ weight.T).
On a CPU, ``prepack_linear_weight`` gives an fp32 weight a oneDNN-packed copy that the reference path of
``linear`` and ``gelu_mlp`` multiplies batches of rows by (the engine packs its model's on CPU).

The package needs only torch and triton, so it can be used on its own by people who benchmark kernels.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F

# The kernel modules are imported here, before the public ops are defined, for a reason: importing a
# submodule for the first time binds it on the package under its own name, and three of them share
# their op's name (kernels/layer_norm.py vs kernels.layer_norm). Loaded now, the defs below win, and a
# later `import kernels.layer_norm` (tests, benchmarks) finds the module in sys.modules and rebinds nothing.
from kernels import attention as _attention
from kernels import cross_entropy as _cross_entropy
from kernels import decode_attention as _decode_attention
from kernels import gelu_mlp as _gelu_mlp
from kernels import layer_norm as _layer_norm
from kernels import paged_attention as _paged_attention
from kernels import reference
from kernels import library as _library  # noqa: E402  (registers torch.ops.fastgpt.*)

__all__ = ["flash_attention", "decode_attention", "paged_decode_attention", "paged_prefill_attention",
           "paged_kv_write", "layer_norm", "gelu_mlp", "linear", "linear_cross_entropy", "prepack_linear_weight",
           "reference", "reference_ops", "uses_triton"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


# Per thread, like torch.no_grad. A threading.local rather than a ContextVar: Dynamo reads (and guards
# on) a thread-local's attribute, while ContextVar.get breaks the graph (torch 2.11 and 2.13 alike).
_STATE = threading.local()


def _reference_only() -> bool:
    return getattr(_STATE, "reference_only", False)


@contextlib.contextmanager
def reference_ops():
    """Inside this block every op runs kernels.reference, on every device (scoped like torch.no_grad)."""
    before = _reference_only()
    _STATE.reference_only = True
    try:
        yield
    finally:
        _STATE.reference_only = before


def uses_triton(t: torch.Tensor) -> bool:
    """True when an op given this tensor runs a Triton kernel (GPU, or CPU under the interpreter)."""
    if _reference_only():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dispatch_to_triton(*tensors, trainable: bool = False) -> bool:
    """Triton for the device. An op without a backward kernel (trainable=False) still takes the
    reference when
    - autograd must see the call: the differentiable reference then records it;
    - autocast is on: its casting rules (bf16 matmuls beside an fp32 residual stream) belong to the
      PyTorch ops, and the kernels would otherwise run fp32 GEMMs without tensor cores.
    Trainable ops have their autograd.Function and cast for autocast themselves (_compute_dtype)."""
    if not uses_triton(tensors[0]):
        return False
    if trainable:
        return True
    if _records_autograd(*tensors):
        return False
    return not torch.is_autocast_enabled(tensors[0].device.type)


def _records_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul with t in, or None: autocast is off on t's device, or t is
    float64, which autocast leaves alone."""
    device_type = t.device.type
    if t.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, ndim: int | None = None, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes and not (t.dtype == torch.float64 and not uses_triton(t)):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_head_dim(d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported; D must be in 1..{MAX_HEAD_DIM}")


# ------------------------------------------------------------------------------------------------- ops
def flash_attention(q, k, v, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """Attention over a whole sequence (prefill); never materialises the (Tq, Tk) scores on the GPU.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk; any strides (views of a fused qkv are fine).
    The causal mask is aligned bottom-right: query i sees keys j <= i + Tk - Tq.
    softmax_scale defaults to D ** -0.5. Returns o: (B, H, Tq, D), dtype of q (autocast's dtype under
    autocast). Differentiable on every path; the Triton backward writes the gradients of q, k, v views
    of one fused (B, T, 3, H, D) tensor straight into that tensor's gradient.
    """
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    _check_shape("k", k, (B, H, Tk, D))
    _check_shape("v", v, (B, H, Tk, D))
    _check_head_dim(D)
    if Tq == 0 or Tk == 0:
        raise ValueError(f"empty sequence: Tq={Tq}, Tk={Tk}")
    if Tq > Tk:
        raise ValueError(f"q has more positions (Tq={Tq}) than k/v (Tk={Tk}); Tq <= Tk is required")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling():
        dtype = _autocast_dtype(q)  # cast as autocast casts a matmul's inputs, on every backend
        if dtype is not None:
            q, k, v = (t.to(dtype) for t in (q, k, v))
        return _library.flash_attention(q, k, v, bool(causal), scale, _reference_only())
    # Neither autograd nor autocast sends this op to the reference (trainable: it has a backward), and
    # under autocast q, k, v are cast as autocast casts a matmul's inputs (softmax statistics and
    # accumulation stay fp32 inside the kernels).
    if _dispatch_to_triton(q, k, v, trainable=True):
        dtype = _autocast_dtype(q)
        if dtype is not None:
            q, k, v = (t.to(dtype) for t in (q, k, v))  # no copy when already that dtype
        with _launch_device(q):
            return _attention.flash_attention(q, k, v, causal=bool(causal), softmax_scale=scale)
    return reference.flash_attention(q, k, v, causal=causal, softmax_scale=scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale: float | None = None) -> torch.Tensor:
    """One new query per row against a KV cache (decode step), split-KV on the GPU.

    q: (B, H, 1, D); k_cache, v_cache: (B, H, Tmax, D); cache_seqlens: int32 (B,), the number of valid
    cache positions of each row (1 <= len <= Tmax; the new token's k/v already written). Any strides.
    Returns o: (B, H, 1, D), dtype of q.
    """
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("v_cache", v_cache, 4)
    _check_same("k_cache", k_cache, "q", q)
    _check_same("v_cache", v_cache, "q", q)
    B, H, one, D = q.shape
    if one != 1:
        raise ValueError(f"q must hold one query per row, shape (B, H, 1, D); got {tuple(q.shape)}")
    Tmax = k_cache.shape[2]
    _check_shape("k_cache", k_cache, (B, H, Tmax, D))
    _check_shape("v_cache", v_cache, (B, H, Tmax, D))
    _check_head_dim(D)
    _check_tensor("cache_seqlens", cache_seqlens, 1, dtypes=(torch.int32,))
    _check_same("cache_seqlens", cache_seqlens, "q", q, dtype=False)
    _check_shape("cache_seqlens", cache_seqlens, (B,))
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling() and not _records_autograd(q, k_cache, v_cache):
        return torch.ops.fastgpt.decode_attention(q, k_cache, v_cache, cache_seqlens, scale, _reference_only())
    if _dispatch_to_triton(q, k_cache, v_cache):
        with _launch_device(q):
            return _decode_attention.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim, optionally fused with the residual add before it.

    x: (..., N); weight, bias: (N,); residual: None or the shape of x, any float dtype.
    Returns y = LayerNorm(x) or, with residual, (y, h) where h = x + residual and y = LayerNorm(h);
    statistics in fp32. h has the promoted dtype of x and residual (as x + residual would); y has h's
    dtype, or under autocast the autocast dtype (it feeds a matmul). Differentiable on every path.
    """
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    N = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        _check_tensor(name, p, 1)
        _check_same(name, p, "x", x, dtype=False)
        _check_shape(name, p, (N,))
    if residual is not None:
        _check_tensor("residual", residual)
        _check_same("residual", residual, "x", x, dtype=False)
        _check_shape("residual", residual, tuple(x.shape))
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out_dtype = _autocast_dtype(x)
    if torch.compiler.is_compiling():
        return _library.layer_norm(x, weight, bias, float(eps), residual, out_dtype, _reference_only())
    if _dispatch_to_triton(x, weight, bias, residual, trainable=True):
        with _launch_device(x):
            return _layer_norm.fused_layer_norm(x, weight, bias, eps=float(eps), residual=residual,
                                                out_dtype=out_dtype)
    out = reference.layer_norm(x, weight, bias, eps=eps, residual=residual)
    if out_dtype is None:
        return out
    return out.to(out_dtype) if residual is None else (out[0].to(out_dtype), out[1])


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None, dropout_p: float = 0.0) -> torch.Tensor:
    """GPT-2's MLP: dropout(gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias) (+ residual).

    x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C_out, F); proj_bias: (C_out,);
    residual: None or (..., C_out), any float dtype. nn.Linear layouts; the weights and biases have x's
    dtype, except under autocast, where x and the weights are cast to the autocast dtype. dropout_p:
    training dropout on the branch, before the residual add (Triton: Philox in the GEMM's epilogue; the
    reference: F.dropout). Returns (..., C_out) in x's dtype (under autocast: the autocast dtype),
    promoted with the residual's dtype when there is one. Differentiable on every path.
    """
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    autocast_dtype = _autocast_dtype(x)
    same_dtype = autocast_dtype is None  # under autocast the op casts for itself, as autocast would
    C = x.shape[-1]
    _check_tensor("fc_weight", fc_weight, 2)
    _check_same("fc_weight", fc_weight, "x", x, dtype=same_dtype)
    Fh = fc_weight.shape[0]
    _check_shape("fc_weight", fc_weight, (Fh, C))
    _check_tensor("fc_bias", fc_bias, 1)
    _check_same("fc_bias", fc_bias, "x", x, dtype=same_dtype)
    _check_shape("fc_bias", fc_bias, (Fh,))
    _check_tensor("proj_weight", proj_weight, 2)
    _check_same("proj_weight", proj_weight, "x", x, dtype=same_dtype)
    C_out = proj_weight.shape[0]
    _check_shape("proj_weight", proj_weight, (C_out, Fh))
    _check_tensor("proj_bias", proj_bias, 1)
    _check_same("proj_bias", proj_bias, "x", x, dtype=same_dtype)
    _check_shape("proj_bias", proj_bias, (C_out,))
    if residual is not None:
        _check_tensor("residual", residual)
        _check_same("residual", residual, "x", x, dtype=False)
        _check_shape("residual", residual, tuple(x.shape[:-1]) + (C_out,))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if torch.compiler.is_compiling():
        return _library.gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, dropout_p,
                                 autocast_dtype or x.dtype, _reference_only())
    if _dispatch_to_triton(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, trainable=True):
        with _launch_device(x):
            return _gelu_mlp.fused_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=residual,
                                            dropout_p=float(dropout_p), compute_dtype=autocast_dtype or x.dtype)
    return reference.gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=residual, dropout_p=dropout_p)


def linear_cross_entropy(x, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T against targets, never holding all (N, V) logits at once.

    x: (..., C); weight: (V, C) (nn.Linear layout, e.g. a tied embedding), x's dtype outside autocast;
    targets: int64 of x's leading shape, each in [0, V) or ignore_index (such rows count for nothing).
    reduction: "mean" over the counted targets (NaN when none counts, as F.cross_entropy) or "sum".
    chunk_size: tokens per chunk (default: about 2^26 logits per chunk). Under autocast x and weight are
    cast to the autocast dtype for the GEMMs; softmax and the weight's gradient accumulate in fp32.
    Returns a 0-dim fp32 loss, differentiable in x and weight. On CUDA an out-of-range target makes the
    loss NaN (checking would cost a host sync); on a CPU it raises.
    """
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    autocast_dtype = _autocast_dtype(x)
    C = x.shape[-1]
    _check_tensor("weight", weight, 2)
    _check_same("weight", weight, "x", x, dtype=autocast_dtype is None)
    V = weight.shape[0]
    _check_shape("weight", weight, (V, C))
    if V == 0:
        raise ValueError("weight has no rows: the vocabulary is empty")
    _check_tensor("targets", targets, dtypes=(torch.int64,))
    _check_same("targets", targets, "x", x, dtype=False)
    _check_shape("targets", targets, tuple(x.shape[:-1]))
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if torch.compiler.is_compiling():
        return _library.linear_cross_entropy(x.reshape(-1, C), weight, targets.reshape(-1), int(ignore_index),
                                             reduction, autocast_dtype or x.dtype,
                                             None if chunk_size is None else int(chunk_size), _reference_only())
    if _reference_only():
        return reference.linear_cross_entropy(x, weight, targets, ignore_index=ignore_index, reduction=reduction)
    x2, t2 = x.reshape(-1, C), targets.reshape(-1)
    kw = dict(ignore_index=int(ignore_index), reduction=reduction, compute_dtype=autocast_dtype or x.dtype,
              chunk_size=None if chunk_size is None else int(chunk_size))
    if uses_triton(x):
        with _launch_device(x):
            return _cross_entropy.fused_linear_cross_entropy(x2, weight, t2, backend="triton", **kw)
    bad = (t2 != ignore_index) & ((t2 < 0) | (t2 >= V))
    if bool(bad.any()):
        raise ValueError(f"targets hold {int(t2[bad][0])}, outside [0, {V}) and not ignore_index={ignore_index}")
    return _cross_entropy.fused_linear_cross_entropy(x2, weight, t2, backend="torch", **kw)


def linear(x, weight, bias=None) -> torch.Tensor:
    """x @ weight.T + bias: the model's plain projections (attention in and out, the tied head).

    x: (..., in); weight: (out, in), stored either way (a transposed view of an (in, out) tensor is fine);
    bias: None or (out,). Returns (..., out) in x's dtype, or under autocast in the autocast dtype (the
    operands may then differ in dtype, as for F.linear). There is no Triton kernel: on CUDA this is
    F.linear (cuBLAS; the fused epilogues that Triton earns its keep with are in gelu_mlp), on a CPU
    kernels.reference.linear, which splits a decode step's few-row product across the CPU threads.
    Differentiable. Under torch.compile it is F.linear on every device, the one op here with no operator in
    kernels/library.py: there is no kernel to hide from Inductor, which lowers F.linear to its own GEMM.
    """
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    same_dtype = _autocast_dtype(x) is None
    _check_tensor("weight", weight, 2)
    _check_same("weight", weight, "x", x, dtype=same_dtype)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out, {x.shape[-1]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        _check_same("bias", bias, "x", x, dtype=same_dtype)
        _check_shape("bias", bias, (weight.shape[0],))
    if x.is_cuda or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def prepack_linear_weight(weight) -> bool:
    """Give a CPU fp32 weight (out, in) a oneDNN-packed copy that ``linear`` and ``gelu_mlp`` multiply
    batches of two rows and more by (kernels.reference.prepack_linear_weight: for gpt2's shapes about even
    at 2 rows, 1.4-2.0x faster at 32, 1.1-1.4x at 512; one more copy of the weight in memory). Returns
    whether a copy was made; False, and nothing done, for a CUDA tensor (cuBLAS needs no packing),
    another dtype, an inference tensor, or a torch built without oneDNN."""
    _check_tensor("weight", weight, 2, dtypes=None)  # any other dtype: nothing to pack, False
    return reference.prepack_linear_weight(weight)


# ------------------------------------------------------------------------------- paged KV cache (engine)
def _check_pages(q, k_pages, v_pages, block_table, n_rows: int):
    """Shared checks of the paged ops: pages (num_blocks, block_size, H, D) matching q's heads."""
    _check_tensor("k_pages", k_pages, 4)
    _check_tensor("v_pages", v_pages, 4)
    _check_same("k_pages", k_pages, "q", q)
    _check_same("v_pages", v_pages, "q", q)
    H, D = q.shape[-2] if q.dim() == 3 else q.shape[1], q.shape[-1]
    num_blocks, block_size = k_pages.shape[:2]
    _check_shape("k_pages", k_pages, (num_blocks, block_size, H, D))
    _check_shape("v_pages", v_pages, (num_blocks, block_size, H, D))
    _check_tensor("block_table", block_table, 2, dtypes=(torch.int32,))
    _check_same("block_table", block_table, "q", q, dtype=False)
    if block_table.shape[0] != n_rows:
        raise ValueError(f"block_table must have {n_rows} rows (one per sequence), got shape {tuple(block_table.shape)}")
    _check_head_dim(D)


def paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens, softmax_scale: float | None = None):
    """One new query per sequence against a paged KV cache (the engine's decode step).

    q: (B, H, 1, D); k_pages, v_pages: (num_blocks, block_size, H, D) (FlashAttention's paged layout);
    block_table: int32 (B, max_blocks_per_seq), position p of row b lives in block block_table[b, p //
    block_size] at offset p % block_size; cache_seqlens: int32 (B,), 1 <= len <= max_blocks_per_seq *
    block_size, the new token's k/v already written. Table entries past a row's last block are never
    read. No host sync: the call can be captured in a CUDA graph. Returns o: (B, H, 1, D), dtype of q.
    """
    _check_tensor("q", q, 4)
    B, H, one, D = q.shape
    if one != 1:
        raise ValueError(f"q must hold one query per row, shape (B, H, 1, D); got {tuple(q.shape)}")
    _check_pages(q, k_pages, v_pages, block_table, B)
    _check_tensor("cache_seqlens", cache_seqlens, 1, dtypes=(torch.int32,))
    _check_same("cache_seqlens", cache_seqlens, "q", q, dtype=False)
    _check_shape("cache_seqlens", cache_seqlens, (B,))
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling() and not _records_autograd(q, k_pages, v_pages):
        return torch.ops.fastgpt.paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens, scale,
                                                        _reference_only())
    if _dispatch_to_triton(q, k_pages, v_pages):
        with _launch_device(q):
            return _paged_attention.paged_decode_attention_fwd(q, k_pages, v_pages, block_table, cache_seqlens,
                                                               softmax_scale=scale)
    return reference.paged_decode_attention(q, k_pages, v_pages, block_table, cache_seqlens, softmax_scale=scale)


def paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens,
                            softmax_scale: float | None = None):
    """Ragged packed queries against a paged KV cache: prefill, chunked prefill and prefix-cache hits.

    q: (total_q, H, D), the queries of B sequences packed back to back; sequence b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] (cu_seqlens_q int32 (B + 1,), starting at 0), and those
    q_len_b queries sit at the last q_len_b of its cache_seqlens[b] positions (int32 (B,)), their own
    keys already written: causal, aligned bottom-right. Pages and block_table as in
    ``paged_decode_attention``. Returns o: (total_q, H, D), dtype of q.
    """
    _check_tensor("q", q, 3)
    _check_tensor("cu_seqlens_q", cu_seqlens_q, 1, dtypes=(torch.int32,))
    _check_same("cu_seqlens_q", cu_seqlens_q, "q", q, dtype=False)
    B = cu_seqlens_q.shape[0] - 1
    if B < 1:
        raise ValueError(f"cu_seqlens_q must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens_q.shape)}")
    _check_pages(q, k_pages, v_pages, block_table, B)
    _check_tensor("cache_seqlens", cache_seqlens, 1, dtypes=(torch.int32,))
    _check_same("cache_seqlens", cache_seqlens, "q", q, dtype=False)
    _check_shape("cache_seqlens", cache_seqlens, (B,))
    if q.shape[0] == 0:
        raise ValueError("q holds no queries (total_q = 0)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling() and not _records_autograd(q, k_pages, v_pages):
        return torch.ops.fastgpt.paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q,
                                                         cache_seqlens, scale, _reference_only())
    if _dispatch_to_triton(q, k_pages, v_pages):
        with _launch_device(q):
            return _paged_attention.paged_prefill_attention_fwd(q, k_pages, v_pages, block_table, cu_seqlens_q,
                                                                cache_seqlens, softmax_scale=scale)
    return reference.paged_prefill_attention(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens,
                                             softmax_scale=scale)


def paged_kv_write(k, v, k_pages, v_pages, slot_mapping) -> None:
    """Write new keys and values into their cache slots, in place.

    k, v: (N, H, D), any strides (views of a fused qkv are fine); k_pages, v_pages: (num_blocks,
    block_size, H, D); slot_mapping: int32 or int64 (N,), slot = block * block_size + offset; a negative
    slot (a padding token of a CUDA-graph batch) writes nothing.
    """
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    _check_same("v", v, "k", k)
    _check_shape("v", v, tuple(k.shape))
    _check_tensor("k_pages", k_pages, 4)
    _check_tensor("v_pages", v_pages, 4)
    _check_same("k_pages", k_pages, "k", k)
    _check_same("v_pages", v_pages, "k", k)
    N, H, D = k.shape
    _check_shape("k_pages", k_pages, (k_pages.shape[0], k_pages.shape[1], H, D))
    _check_shape("v_pages", v_pages, tuple(k_pages.shape))
    _check_tensor("slot_mapping", slot_mapping, 1, dtypes=(torch.int32, torch.int64))
    _check_same("slot_mapping", slot_mapping, "k", k, dtype=False)
    _check_shape("slot_mapping", slot_mapping, (N,))
    if torch.compiler.is_compiling() and not _records_autograd(k, v, k_pages, v_pages):
        torch.ops.fastgpt.paged_kv_write(k, v, k_pages, v_pages, slot_mapping, _reference_only())
        return None
    if _dispatch_to_triton(k, v, k_pages, v_pages):
        with _launch_device(k):
            return _paged_attention.paged_kv_write_fwd(k, v, k_pages, v_pages, slot_mapping)
    reference.paged_kv_write(k, v, k_pages, v_pages, slot_mapping)
