"""kernels.layer_norm (fused residual add + LayerNorm) against a float64 reference.

The Triton kernels run under the interpreter on CPU (the GPU when there is one). Every result is
compared with ``kernels.reference.layer_norm`` on float64 copies of the same inputs, within the
tolerance of the output dtype: fp32 1e-5, fp16 1e-3, bf16 1e-2 (relative, and absolute for values
near 0). Rounding one fp16 output costs up to 0.5e-3; one bf16 output up to 0.4e-2 on a GPU, 0.8e-2
under the interpreter, which truncates fp32 -> bf16 where the GPU rounds to nearest.
"""

import contextlib
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from conftest import KERNEL_DEVICE
from helpers import assert_grads_within, grad_errors
from kernels import reference

layer_norm_op = kernels.layer_norm  # the public op (validation + dispatch)
ln = importlib.import_module("kernels.layer_norm")  # the kernel file of the same name

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _randn(shape, gen, dtype, scale=1.0, offset=0.0):
    return (offset + scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(KERNEL_DEVICE)


def _inputs(shape, dtype, seed=0, scale=1.0, offset=0.0, wdtype=None, residual=True):
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = _randn(shape, gen, dtype, scale, offset)
    r = _randn(shape, gen, dtype, scale) if residual else None
    w = _randn((N,), gen, wdtype or dtype, 0.5, 1.0)
    b = _randn((N,), gen, wdtype or dtype, 0.5)
    return x, r, w, b


def _ref(x, w, b, r=None):
    """float64 (y, h, mean, rstd) of the given inputs."""
    x64, w64, b64 = x.double().cpu(), w.double().cpu(), b.double().cpu()
    h64 = x64 if r is None else x64 + r.double().cpu()
    y64 = reference.layer_norm(h64, w64, b64, eps=EPS)
    mean = h64.mean(-1)
    rstd = 1.0 / torch.sqrt(((h64 - mean[..., None]) ** 2).mean(-1) + EPS)
    return y64, h64, mean.reshape(-1), rstd.reshape(-1)


def _close(actual, expected, dtype, what, tol=None):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _fp32_tol(x, w, b, r, y64):
    """fp32: 1e-5, or 2x PyTorch's own fp32 error where more is inherent. h = x + r rounded to fp32 near
    -20 is off by up to 1e-6, i.e. ~4e-6 in y; the spec computes y from that fp32 h."""
    y32 = reference.layer_norm(x.cpu(), w.cpu(), b.cpu(), eps=EPS, residual=None if r is None else r.cpu())
    y32 = y32 if r is None else y32[0]
    return max(TOL[torch.float32], 2 * float(((y32.double() - y64).abs() / (1 + y64.abs())).max()))


def _check_stats(mean, rstd, h64, mean64, rstd64):
    assert mean.dtype == rstd.dtype == torch.float32
    # fp32 statistics: the mean's error scales with the row's magnitude, rstd's is relative.
    scale = h64.abs().reshape(-1, h64.shape[-1]).mean(-1)
    assert ((mean.double().cpu() - mean64).abs() <= 1e-5 * scale + 1e-7).all()
    torch.testing.assert_close(rstd.double().cpu(), rstd64, rtol=1e-5, atol=0)


SHAPES = [(1, 7), (3, 5, 96), (2, 1023), (4, 768), (2, 1600), (1, 16384), (9, 41, 341)]


# ------------------------------------------------------------------------------------- public op
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(interpreter_path, shape, dtype, residual):
    x, r, w, b = _inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1], residual=residual)
    x0 = x.clone()
    out = layer_norm_op(x, w, b, eps=EPS, residual=r)
    y64, h64, _, _ = _ref(x, w, b, r)
    if residual:
        y, h = out
        _close(h, h64, dtype, "h")
        assert h.shape == x.shape
    else:
        y = out
    assert y.shape == x.shape and y.is_contiguous()
    _close(y, y64, dtype, "y")
    assert torch.equal(x, x0)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("scale,offset", [(0.5, -20.0), (1e4, 0.0)], ids=["offset-20", "scale1e4"])
@pytest.mark.parametrize("shape", [(4, 768), (3, 20011)], ids=["rows", "looped"])
def test_large_magnitude_keeps_precision(shape, scale, offset, dtype):
    """Centred variance: E[h^2] - E[h]^2 would lose ~1e-4 relative on the offset rows in fp32."""
    x, r, w, b = _inputs(shape, dtype, seed=7, scale=scale, offset=offset)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
    y64, h64, mean64, rstd64 = _ref(x, w, b, r)
    assert torch.isfinite(h).all()
    _close(h, h64, dtype, "h")
    _close(y, y64, dtype, "y", tol=_fp32_tol(x, w, b, r, y64) if dtype == torch.float32 else None)
    _check_stats(mean, rstd, h64, mean64, rstd64)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(2, 1023), (3, 5, 96), (1, 16384), (3, 20011)], ids=lambda s: "x".join(map(str, s)))
def test_stats_equal_float64(shape, residual):
    x, r, w, b = _inputs(shape, torch.float32, seed=11, residual=residual)
    out = ln.layer_norm_fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
    y64, h64, mean64, rstd64 = _ref(x, w, b, r)
    assert len(out) == (4 if residual else 3)
    y, mean, rstd = out[0], out[-2], out[-1]
    M = x.numel() // x.shape[-1]
    assert mean.shape == rstd.shape == (M,)
    _close(y, y64, torch.float32, "y")
    _check_stats(mean, rstd, h64, mean64, rstd64)


@pytest.mark.parametrize("N", [1, 2, 3, 129, 4096, 8191, 16385])
def test_every_regime(N):
    """Widths at and around the block boundaries, the looped regime just past the last row block."""
    x, r, w, b = _inputs((3, N), torch.float16, seed=N)
    y, h = ln.layer_norm_fwd(x, w, b, eps=EPS, residual=r)
    y64, h64, _, _ = _ref(x, w, b, r)
    _close(h, h64, torch.float16, "h")
    _close(y, y64, torch.float16, "y")


@pytest.mark.parametrize("dtype,wdtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.float16)], ids=["fp16-w32", "bf16-w32", "fp32-w16"])
@pytest.mark.parametrize("shape", [(4, 768), (2, 1000), (2, 20000)], ids=["vec", "novec", "looped"])
def test_weight_dtype_differs(interpreter_path, shape, dtype, wdtype):
    """fp32 master weights with fp16 activations are used at full precision (no cast to x's dtype)."""
    x, r, w, b = _inputs(shape, dtype, seed=3, wdtype=wdtype)
    w = w + 1e-3 * torch.arange(shape[-1], device=w.device).to(wdtype)  # bits fp16 could not keep
    y, h = layer_norm_op(x, w, b, eps=EPS, residual=r)
    y64, h64, _, _ = _ref(x, w, b, r)
    _close(y, y64, dtype, "y")
    _close(h, h64, dtype, "h")


# ---------------------------------------------------------------------------------------- layouts
def test_strided_rows_are_read_in_place(interpreter_path):
    """Rows with a stride (slices of a wider buffer) are not copied; every alignment case is right."""
    gen = torch.Generator().manual_seed(5)
    N = 768
    wide = _randn((6, 2 * N + 9), gen, torch.float16)
    wide_r = _randn((12, N + 8), gen, torch.float16)
    w, b = _randn((N,), gen, torch.float16), _randn((N,), gen, torch.float16)
    cases = {
        "odd stride": (wide[:, :N], wide_r[::2, :N]),               # row strides 1545 / 1552
        "both aligned": (wide_r[1::2, 8:N + 8], wide_r[::2, :N]),    # row stride 1552, offset 8 elements
        "offset by one": (wide[:, 1:N + 1], wide[:, N + 1:2 * N + 1]),
    }
    for name, (x, r) in cases.items():
        assert x.stride(-1) == 1 and x.stride(0) != N
        assert ln._as_rows(x, N).data_ptr() == x.data_ptr(), name  # a view, not a copy
        y, h = layer_norm_op(x, w, b, eps=EPS, residual=r)
        y64, h64, _, _ = _ref(x, w, b, r)
        _close(y, y64, torch.float16, f"y ({name})")
        _close(h, h64, torch.float16, f"h ({name})")


def test_non_contiguous_last_dim_and_uncollapsible_rows_are_copied_once(interpreter_path):
    gen = torch.Generator().manual_seed(6)
    N = 96
    xt = _randn((N, 10), gen, torch.float32).t()             # (10, N), last-dim stride 10
    rt = _randn((N, 10), gen, torch.float32).t()
    x3 = _randn((3, 8, N), gen, torch.float32)[:, :5]         # (3, 5, N): leading dims do not collapse
    r3 = _randn((3, 5, N), gen, torch.float32)
    w, b = _randn((N,), gen, torch.float32), _randn((N,), gen, torch.float32)
    assert ln._as_rows(xt, N).stride(-1) == 1 and ln._as_rows(xt, N).data_ptr() != xt.data_ptr()
    assert ln._as_rows(x3, N).is_contiguous()
    for x, r in ((xt, rt), (x3, r3), (xt, None)):
        out = layer_norm_op(x, w, b, eps=EPS, residual=r)
        y = out if r is None else out[0]
        y64, h64, _, _ = _ref(x, w, b, r)
        assert y.shape == x.shape and y.is_contiguous()
        _close(y, y64, torch.float32, "y")
        if r is not None:
            _close(out[1], h64, torch.float32, "h")


def test_strided_weight(interpreter_path):
    x, r, _, _ = _inputs((2, 300), torch.float32, seed=9)
    wb = _randn((2, 300), torch.Generator().manual_seed(1), torch.float32)
    w, b = wb.t()[:, 0], wb.t()[:, 1]  # stride 2
    y, _ = layer_norm_op(x, w, b, eps=EPS, residual=r)
    _close(y, _ref(x, w, b, r)[0], torch.float32, "y")


@pytest.mark.parametrize("shape", [(9, 41, 341), (3, 5, 96), (5, 1024), (2, 20011)],
                         ids=lambda s: "x".join(map(str, s)))
def test_poisoned_outputs_are_all_written(monkeypatch, shape):
    """Every output buffer is born NaN-filled; the launcher must overwrite every element."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        return real_empty(*a, **k).fill_(float("nan"))

    def nan_empty_like(*a, **k):
        return real_empty_like(*a, **k).fill_(float("nan"))

    x, r, w, b = _inputs(shape, torch.bfloat16, seed=13)
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
    monkeypatch.undo()
    for name, t in (("y", y), ("h", h), ("mean", mean), ("rstd", rstd)):
        assert not torch.isnan(t).any(), f"{name} has unwritten elements"
    y64, h64, _, _ = _ref(x, w, b, r)
    _close(y, y64, torch.bfloat16, "y")


@pytest.mark.parametrize("shape", [(0, 5, 64), (3, 0)])
def test_empty(shape):
    x = torch.empty(shape, device=KERNEL_DEVICE)
    w = torch.ones(shape[-1], device=KERNEL_DEVICE)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, w, eps=EPS, residual=x, return_stats=True)
    assert y.shape == h.shape == x.shape and mean.shape == rstd.shape == (math.prod(shape[:-1]),)


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_through_public_op(interpreter_path):
    x = torch.randn(2, 8, device=KERNEL_DEVICE)
    w = torch.randn(8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_op(x, torch.randn(7, device=KERNEL_DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_op(x, w, torch.randn(2, 8, device=KERNEL_DEVICE))
    # a residual of another dtype (autocast keeps the stream fp32) is promoted, as x + residual would be
    y, h = layer_norm_op(x, w, w, residual=x.half())
    assert h.dtype == y.dtype == torch.float32
    torch.testing.assert_close(h, x + x.half().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual"):
        layer_norm_op(x, w, w, residual=x[:1])
    with pytest.raises(ValueError, match="eps"):
        layer_norm_op(x, w, w, eps=0.0)
    with pytest.raises(TypeError, match="x"):
        layer_norm_op(x.double(), w, w)  # no float64 kernel
    with pytest.raises(TypeError, match="x"):
        layer_norm_op(x.to(torch.int32), w, w)
    with pytest.raises(ValueError, match="x"):
        layer_norm_op(torch.tensor(1.0), w, w)


def test_public_op_survives_the_kernel_import():
    """The op stays callable after its first Triton launch imported the kernel module of the same name.

    Python binds a newly imported submodule on its package (``kernels.layer_norm = <module>``); were the
    kernel file imported lazily, on first use, it would replace the public function and the model's
    second ``kernels.layer_norm(...)`` would fail ("'module' object is not callable"). Checked in a fresh
    interpreter, with an explicit import of the submodule as well.
    """
    code = (
        "import torch, kernels\n"
        "x = torch.randn(2, 8, device=%r); w = torch.randn(8, device=%r)\n"
        "kernels.layer_norm(x, w, w)\n"
        "assert callable(kernels.layer_norm), 'kernels.layer_norm is now ' + repr(kernels.layer_norm)\n"
        "import kernels.layer_norm, kernels.decode_attention, kernels.gelu_mlp\n"
        "assert all(callable(f) for f in (kernels.layer_norm, kernels.decode_attention, kernels.gelu_mlp))\n"
        "kernels.layer_norm(x, w, w)\n"
    ) % (KERNEL_DEVICE, KERNEL_DEVICE)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ backward
def _ln_call(x, weight, bias, residual=None):
    return layer_norm_op(x, weight, bias, eps=EPS, residual=residual)


def _ln_peer(x, weight, bias, residual=None):
    return reference.layer_norm(x, weight, bias, eps=EPS, residual=residual)


BWD_SHAPES = [(1, 7), (3, 5, 96), (2, 1023), (5, 768), (2, 9001)]  # T = 1, odd, prime-ish, gpt2, looped


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_float64(interpreter_path, shape, dtype, residual):
    """dx, d residual, dweight, dbias (h's own gradient flowing in too) within 3x PyTorch's own error."""
    x, r, w, b = _inputs(shape, dtype, seed=shape[-1] + 17, residual=residual)
    tensors = dict(x=x.requires_grad_(), weight=w.requires_grad_(), bias=b.requires_grad_(),
                   residual=None if r is None else r.requires_grad_())
    ours, peer = grad_errors(_ln_call, _ln_peer, tensors)
    assert_grads_within(ours, peer, dtype)


def test_backward_of_strided_inputs_and_large_magnitudes(interpreter_path):
    """Views of wider buffers (read in place) and rows near -20 (xhat from the stored h)."""
    gen = torch.Generator().manual_seed(21)
    N = 96
    wide = _randn((7, 2 * N + 8), gen, torch.float32, 0.5, -20.0).requires_grad_()
    r_t = _randn((N, 7), gen, torch.float32).requires_grad_()  # its transpose: unit stride along rows
    w, b = _randn((N,), gen, torch.float32, 0.5, 1.0).requires_grad_(), _randn((N,), gen, torch.float32).requires_grad_()

    def call(fn):
        return lambda wide, r_t, weight, bias: fn(wide[:, 8:N + 8], weight, bias, residual=r_t.t())

    ours, peer = grad_errors(call(_ln_call), call(_ln_peer), dict(wide=wide, r_t=r_t, weight=w, bias=b))
    assert_grads_within(ours, peer, torch.float32)


def test_backward_when_only_y_or_only_h_is_used(interpreter_path):
    x, r, w, b = _inputs((4, 100), torch.float32, seed=5)
    for keep in (0, 1):
        def call(fn):
            return lambda x, residual, weight, bias: fn(x, weight, bias, residual=residual)[keep]
        tensors = dict(x=x.clone().requires_grad_(), residual=r.clone().requires_grad_(), weight=w.clone().requires_grad_(),
                       bias=b.clone().requires_grad_())
        if keep == 1:  # h alone: y's parameters get no gradient at all
            h = call(_ln_call)(**tensors)
            h.sum().backward()
            assert tensors["weight"].grad is None and torch.equal(tensors["x"].grad, torch.ones_like(x))
            continue
        ours, peer = grad_errors(call(_ln_call), call(_ln_peer), tensors)
        assert_grads_within(ours, peer, torch.float32)


def test_backward_under_autocast_keeps_the_stream_fp32(interpreter_path):
    """CPU fp16 autocast (bf16 dots do not interpret): a 16-bit branch, the fp32 stream, fp32 weights.
    y comes out in fp16, h in fp32, every gradient in its input's dtype; PyTorch's autocast is the peer."""
    gen = torch.Generator().manual_seed(8)
    shape = (6, 768)
    tensors = dict(x=_randn(shape, gen, torch.float16).requires_grad_(), residual=_randn(shape, gen, torch.float32).requires_grad_(),
                   weight=_randn((768,), gen, torch.float32, 0.5, 1.0).requires_grad_(),
                   bias=_randn((768,), gen, torch.float32, 0.5).requires_grad_())

    def call(ops):
        def f(x, residual, weight, bias):
            with torch.autocast("cpu", dtype=torch.float16), ops():
                y, h = layer_norm_op(x, weight, bias, eps=EPS, residual=residual)
            return y, h
        return f

    y, h = call(contextlib.nullcontext)(**tensors)
    assert y.dtype == torch.float16 and h.dtype == torch.float32
    ours, peer = grad_errors(call(contextlib.nullcontext), call(kernels.reference_ops), tensors)
    assert_grads_within(ours, peer, torch.float16)


def test_backward_runs_triton_not_the_reference(interpreter_path, monkeypatch):
    calls = []
    real_bwd = ln.layer_norm_bwd

    def counting_bwd(*args, **kwargs):
        calls.append(kwargs.get("dh") is not None)
        return real_bwd(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference layer_norm ran")

    monkeypatch.setattr(ln, "layer_norm_bwd", counting_bwd)
    monkeypatch.setattr(reference, "layer_norm", no_reference)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", no_reference)
    x, r, w, b = _inputs((3, 64), torch.float32, seed=2)
    x.requires_grad_()
    y, h = layer_norm_op(x, w.requires_grad_(), b, eps=EPS, residual=r)
    assert type(y.grad_fn).__name__ == "_LayerNormBackward"
    (y.sum() + h.sum()).backward()
    assert calls == [True] and x.grad is not None and w.grad is not None


# ------------------------------------------------------------------------------------ configs / compile
def test_config_chooser_covers_every_width_and_compile_specs_list_it():
    widths = list(range(1, 2100)) + [2 ** k + d for k in range(11, 17) for d in (-1, 0, 1)] + [50257]
    specs = ln.compile_specs()
    for chooser, rows_fn, looped_fn, dtype_arg in ((ln._config, ln._ln_fwd_rows, ln._ln_fwd_looped, "X"),
                                                    (ln._bwd_config, ln._ln_bwd_rows, ln._ln_bwd_looped, "DY")):
        chosen = set()
        for N in widths:
            regime, block_n, block_m, warps = chooser(N)
            assert (N <= block_n) if regime == "rows" else N > 8192
            chosen.add((regime, block_n, block_m, warps))
        listed = {("looped" if s.fn is looped_fn else "rows", s.constexprs["BLOCK_N"],
                   s.constexprs.get("BLOCK_M", 1), s.num_warps, s.signature[dtype_arg])
                  for s in specs if s.fn in (rows_fn, looped_fn)}
        for cfg in chosen:
            wanted = ("*fp16", "*bf16") if chooser is ln._config else ("*bf16",)  # the backward: autocast's
            for dt in wanted:
                assert cfg + (dt,) in listed, f"{cfg} {dt} is launched but not compiled"
        assert any(key[-1] == "*fp32" for key in listed)
    # ld.global.v4 is demanded of every 16-bit spec on the 16-byte path that serves N >= 768
    for s in specs:
        first = s.signature.get("X", s.signature.get("DY"))
        if first in ("*fp16", "*bf16") and s.constexprs["VEC"] == 8 and s.constexprs["BLOCK_N"] >= 1024:
            assert s.expect_v4_loads, s.name


@pytest.mark.slow
def test_compile_report_no_spills_and_v4_loads():
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["layer_norm"])
    assert rows and {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    bad = {f"{r['name']} {r['arch']}": problems(r) for r in rows if problems(r)}
    assert not bad, bad


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("N", [768, 1600, 4096, 16384, 50000])
def test_gpu_full_size(N, dtype):
    x, r, w, b = _inputs((512, N), dtype, seed=N, scale=1.0, offset=-5.0)
    y, h, mean, rstd = ln.layer_norm_fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
    y64, h64, mean64, rstd64 = _ref(x, w, b, r)
    _close(h, h64, dtype, "h")
    _close(y, y64, dtype, "y")
    _check_stats(mean, rstd, h64, mean64, rstd64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("N", [768, 1600, 4096, 20000])
def test_gpu_backward(N, dtype):
    """Every dtype on the GPU, bf16 included, at full widths; the autocast layout for bf16."""
    x, r, w, b = _inputs((256, N), dtype, seed=N, offset=-2.0, wdtype=torch.float32 if dtype == torch.bfloat16 else None)
    if dtype == torch.bfloat16:
        r = r.float()
    tensors = dict(x=x.requires_grad_(), weight=w.requires_grad_(), bias=b.requires_grad_(), residual=r.requires_grad_())
    ours, peer = grad_errors(_ln_call, _ln_peer, tensors)
    assert_grads_within(ours, peer, dtype)
