"""kernels.gelu_mlp: the Triton GEMM + epilogue kernels against a float64 PyTorch reference.

Without a GPU every kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1). The
interpreter cannot do bf16 tl.dot, so bf16 is checked on a GPU only; fp16 and fp32 run everywhere.
Tolerances: at most twice the error of the same-dtype PyTorch computation against float64, or the dtype's
own scale (fp32 1e-5, fp16 1e-3, bf16 1e-2 of max |y|) when PyTorch happens to be closer.
"""

import contextlib
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import KERNEL_DEVICE
from triton.runtime.errors import OutOfResources

import kernels
from helpers import assert_grads_within, grad_errors, max_rel_err
from kernels import reference
from kernels.gelu_mlp import (
    DECODE_CONFIGS, PREFILL_CONFIGS, compile_specs, gelu_mlp_bwd, gelu_mlp_fwd, gemm, linear_fwd, _k_per_split,
)

mlp_module = importlib.import_module("kernels.gelu_mlp")

DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ALL_CONFIGS = [pytest.param(c, id=f"{r}-M{c.kwargs['BLOCK_M']}N{c.kwargs['BLOCK_N']}K{c.kwargs['BLOCK_K']}w{c.num_warps}")
               for r, cs in (("prefill", PREFILL_CONFIGS), ("decode", DECODE_CONFIGS)) for c in cs]


def _mlp_inputs(M, C, dtype, *, residual=True, seed=0, device=KERNEL_DEVICE):
    """x, fc_w, fc_b, proj_w, proj_b, residual; pre-activations ~ N(0, 9^2) so GELU's tails are hit."""
    g = torch.Generator().manual_seed(seed)
    F = 4 * C
    t = [torch.randn(M, C, generator=g) * 3, torch.randn(F, C, generator=g) * (3 / C**0.5),
         torch.randn(F, generator=g), torch.randn(C, F, generator=g) / F**0.5, torch.randn(C, generator=g),
         torch.randn(M, C, generator=g)]
    z = t[0].double() @ t[1].double().T + t[2].double()
    assert z.max() > 10 and z.min() < -10, "inputs must reach both tails of GELU"
    t = [a.to(device=device, dtype=dtype) for a in t]
    return t[:5], (t[5] if residual else None)


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _check_mlp(out, params, residual):
    """out against float64, within max(2x PyTorch's same-dtype error, the dtype's tolerance)."""
    dtype = params[0].dtype
    res64 = None if residual is None else residual.double()
    ref = reference.gelu_mlp(*[p.double() for p in params], residual=res64)
    peer = reference.gelu_mlp(*params, residual=residual)
    assert out.shape == ref.shape and out.dtype == dtype
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err, tol = _rel_err(out, ref), max(2 * _rel_err(peer, ref), DTYPE_TOL[dtype])
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,C", [(1, 32), (7, 48), (65, 64), (300, 96)])
def test_gelu_mlp_matches_float64(M, C, dtype, residual, interpreter_path, poisoned_empty):
    params, res = _mlp_inputs(M, C, dtype, residual=residual)
    out = kernels.gelu_mlp(*params, residual=res)
    _check_mlp(out, params, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config(config, dtype, interpreter_path, poisoned_empty):
    # Two row-tiles, the second ragged; C = 48 and F = 192 are ragged against every BLOCK_N / BLOCK_K.
    # split_k=2 leaves the fc GEMM (K = 48) whole (fused epilogue) and splits the proj GEMM (K = 192):
    # partial sums + the split-K reduce with bias and residual.
    M = config.kwargs["BLOCK_M"] + 3
    params, res = _mlp_inputs(M, 48, dtype, seed=1)
    try:
        out = gelu_mlp_fwd(*params, residual=res, config=config, split_k=2)
    except OutOfResources:  # GPU only: the largest tiles do not fit shared memory in fp32
        pytest.skip(f"{config} exceeds shared memory in {dtype}")
    _check_mlp(out, params, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_k_uneven_slices(dtype, interpreter_path, poisoned_empty):
    # K = 320 in slices of 128: 128 + 128 + 64; bias, GELU and residual applied once, after the sum.
    g = torch.Generator().manual_seed(2)
    M, K, N = 5, 320, 80
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5 * 8
    b, r = torch.randn(N, generator=g), torch.randn(M, N, generator=g)
    x, w, b, r = (t.to(KERNEL_DEVICE, dtype) for t in (x, w, b, r))
    out = linear_fwd(x, w, b, activation="gelu_tanh", residual=r, config=DECODE_CONFIGS[2], split_k=3)
    ref = reference.gelu_tanh(x.double() @ w.double().T + b.double()) + r.double()
    peer = reference.gelu_tanh(torch.nn.functional.linear(x, w, b)) + r
    assert _rel_err(out, ref) <= max(2 * _rel_err(peer, ref), DTYPE_TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # z^3 -> inf is intended
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gelu_epilogue_tails(dtype, interpreter_path):
    # Identity weight, no bias: the GEMM is exact and the output is GELU itself, far into both tails.
    vals = [0.0, 1e-3, 0.5, 1.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1e4]
    vals += [1e20, 3e38] if dtype == torch.float32 else [6e4]
    z = torch.tensor(vals + [-v for v in vals], dtype=dtype, device=KERNEL_DEVICE)[None, :]
    eye = torch.eye(z.shape[1], dtype=dtype, device=KERNEL_DEVICE)
    out = linear_fwd(z, eye, None, activation="gelu_tanh")
    assert torch.isfinite(out).all()
    ref = reference.gelu_tanh(z.double())
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (1e-3, 1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    n = len(vals)
    assert out[0, vals.index(100.0)] == 100 and out[0, n + vals.index(100.0)] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["slice_3d", "transposed", "odd_row_stride"])
def test_strided_inputs(layout, dtype, interpreter_path):
    g = torch.Generator().manual_seed(3)
    params, _ = _mlp_inputs(10, 48, dtype, residual=False, seed=3)
    B, T, C = 2, 5, 48
    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 3).to(KERNEL_DEVICE, dtype)

    if layout == "slice_3d":  # (B, T, C) view of a wider tensor: rows 64 apart, no copy needed
        x = rand(B, T, 64)[..., :C]
    elif layout == "transposed":  # unit stride along T, not C: the launcher copies once
        x = rand(B, C, T).transpose(1, 2)
    else:  # rows 50 elements apart: not 16-aligned, the kernel runs without alignment hints
        x = rand(B * T, 50)[:, :C].unflatten(0, (B, T))
    assert not x.is_contiguous()
    res = torch.randn(T, B, C, generator=g).to(KERNEL_DEVICE, dtype).transpose(0, 1)  # non-contiguous
    out = kernels.gelu_mlp(x, *params[1:], residual=res)
    assert out.shape == (B, T, C)
    _check_mlp(out, [x, *params[1:]], res)


def test_odd_sizes(interpreter_path, poisoned_empty):
    # Neither K nor N a multiple of 16: masks on every edge, no alignment hints.
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(3, 37, generator=g), torch.randn(53, 37, generator=g), torch.randn(53, generator=g)
    x, w, b = (t.to(KERNEL_DEVICE) for t in (x, w, b))
    out = linear_fwd(x, w, b)
    ref = x.double() @ w.double().T + b.double()
    assert _rel_err(out, ref) <= DTYPE_TOL[torch.float32]


def test_empty_batch(interpreter_path):
    params, _ = _mlp_inputs(4, 32, torch.float32, residual=False)
    x = torch.empty(0, 32, device=KERNEL_DEVICE)
    assert kernels.gelu_mlp(x, *params[1:]).shape == (0, 32)


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise(interpreter_path):
    (x, fc_w, fc_b, pw, pb), res = _mlp_inputs(3, 32, torch.float32)
    with pytest.raises(ValueError, match="fc_weight"):
        kernels.gelu_mlp(x, fc_w[:, :-1], fc_b, pw, pb)
    with pytest.raises(ValueError, match="proj_weight"):
        kernels.gelu_mlp(x, fc_w, fc_b, pw[:, :-1], pb)
    with pytest.raises(TypeError, match="proj_bias"):
        kernels.gelu_mlp(x, fc_w, fc_b, pw, pb.half())
    with pytest.raises(ValueError, match="residual"):
        kernels.gelu_mlp(x, fc_w, fc_b, pw, pb, residual=res[:, :-1])
    with pytest.raises(TypeError, match="x"):
        kernels.gelu_mlp(x.int(), fc_w, fc_b, pw, pb)
    with pytest.raises(ValueError, match="activation"):
        linear_fwd(x, fc_w, fc_b, activation="relu")
    with pytest.raises(ValueError, match="weight"):
        linear_fwd(x, pw, pb)


def test_public_op_survives_the_kernel_import():
    """kernels.gelu_mlp stays callable after its first Triton launch imported kernels/gelu_mlp.py.

    Python binds a newly imported submodule on its package, so the lazy import in kernels/__init__.py
    replaces the public function by the module and the model's second MLP call fails ("'module' object
    is not callable"). Checked in a fresh interpreter, where that import has not happened yet.
    """
    code = (
        "import torch, kernels\n"
        "x = torch.randn(2, 16, device=%r); w1 = torch.randn(64, 16, device=%r); w2 = torch.randn(16, 64, device=%r)\n"
        "kernels.gelu_mlp(x, w1, w1[:, 0], w2, w2[:, 0])\n"
        "assert callable(kernels.gelu_mlp), 'kernels.gelu_mlp is now ' + repr(kernels.gelu_mlp)\n"
        "kernels.gelu_mlp(x, w1, w1[:, 0], w2, w2[:, 0])\n"
    ) % ((KERNEL_DEVICE,) * 3)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ backward
def _mlp_call(fn, dropout_p=0.0):
    def call(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None):
        return fn(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=residual, dropout_p=dropout_p)
    return call


def _grad_tensors(params, res):
    names = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias")
    tensors = {n: p.requires_grad_() for n, p in zip(names, params)}
    tensors["residual"] = None if res is None else res.requires_grad_()
    return tensors


@pytest.mark.parametrize("M,C,dtype,residual", [
    (1, 32, torch.float32, True), (1, 32, torch.float16, False), (7, 48, torch.float16, True),
    (7, 48, torch.float32, False), (131, 32, torch.float32, True), (131, 32, torch.float16, False),
], ids=["1x32-fp32-residual", "1x32-fp16", "7x48-fp16-residual", "7x48-fp32", "131x32-fp32-residual", "131x32-fp16"])
def test_backward_matches_float64(M, C, dtype, residual, interpreter_path):
    """Every gradient (x, both weights and biases, residual) within 3x PyTorch's own same-dtype error."""
    params, res = _mlp_inputs(M, C, dtype, residual=residual, seed=M)
    ours, peer = grad_errors(_mlp_call(kernels.gelu_mlp), _mlp_call(reference.gelu_mlp), _grad_tensors(params, res))
    assert_grads_within(ours, peer, dtype)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_backward_every_config(config, interpreter_path, poisoned_empty):
    """The backward's GEMMs (dz with dGELU, dx, both weight gradients, transposed operands) in each tile
    config, on ragged sizes; fp16, NaN-poisoned buffers, against float64 within 3x PyTorch's error."""
    M = config.kwargs["BLOCK_M"] + 3
    params, _ = _mlp_inputs(M, 32, torch.float16, residual=False, seed=9)
    x, w1, b1, w2, b2 = params
    dy = torch.randn(M, 32, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    _, z = gelu_mlp_fwd(x, w1, b1, w2, b2, save_preact=True, config=config)
    got = gelu_mlp_bwd(dy, x, z, w1, w2, config=config)

    def autograd(dtype):
        leaves = [p.detach().to(dtype).requires_grad_() for p in params]
        reference.gelu_mlp(*leaves).backward(dy.to(dtype))
        return [p.grad for p in leaves]

    peer, truth = autograd(torch.float16), autograd(torch.float64)
    for name, g, p, t in zip(("dx", "dW_fc", "db_fc", "dW_proj", "db_proj"), got, peer, truth):
        assert not torch.isnan(g).any(), f"{name}: unwritten or NaN elements"
        err, limit = max_rel_err(g, t), max(3 * max_rel_err(p, t), torch.finfo(torch.float16).eps / 2)
        assert err <= limit, f"{name}: error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gemm_layouts_odd_sizes_and_in_place_accumulation(dtype, interpreter_path):
    """Column-major operands read in place (no copy), odd M/N/K (no alignment hints), an fp32 output from
    16-bit operands, and y += a @ w.T in place (the fused cross-entropy's weight gradient)."""
    g = torch.Generator().manual_seed(6)
    M, N, K = 37, 53, 29
    a_cm = torch.randn(K, M, generator=g).to(dtype).t()  # (M, K), unit stride along M
    w_cm = torch.randn(K, N, generator=g).to(dtype).t()  # (N, K), unit stride along N
    for a, w in ((a_cm, w_cm), (a_cm.contiguous(), w_cm), (a_cm, w_cm.contiguous())):
        y = torch.empty(M, N)
        gemm(a, w, y)
        expect = a.double() @ w.double().T
        assert max_rel_err(y, expect) <= 2 * max_rel_err(a.float() @ w.float().T, expect) + 1e-6
    acc = torch.randn(M, N, generator=g)
    before = acc.clone()
    gemm(a_cm, w_cm, acc, residual=acc)
    torch.testing.assert_close(acc.double(), before.double() + a_cm.double() @ w_cm.double().T, rtol=1e-5, atol=1e-5)


def test_backward_with_strided_inputs(interpreter_path):
    """x a view of a wider buffer, the residual a transposed tensor: grads flow back through the views."""
    params, _ = _mlp_inputs(10, 48, torch.float32, residual=False, seed=3)
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(2, 5, 64, generator=g) * 3).requires_grad_()
    res_t = torch.randn(48, 5, 2, generator=g).requires_grad_()
    names = ("fc_weight", "fc_bias", "proj_weight", "proj_bias")
    tensors = dict(zip(names, (p.requires_grad_() for p in params[1:])), wide=wide, res_t=res_t)

    def call(fn):
        def f(wide, res_t, **weights):
            return fn(wide[..., :48], *weights.values(), residual=res_t.permute(2, 1, 0))
        return f

    ours, peer = grad_errors(call(kernels.gelu_mlp), call(reference.gelu_mlp), tensors)
    assert_grads_within(ours, peer, torch.float32)


def test_backward_under_autocast(interpreter_path):
    """CPU fp16 autocast with fp32 master weights and an fp32 residual stream: the op casts for itself,
    returns fp32 (promoted with the stream), and hands fp32 gradients to the fp32 weights."""
    params, res = _mlp_inputs(9, 64, torch.float32, seed=4)
    params[0] = params[0].half()  # the branch input arrives in the autocast dtype (a LayerNorm's y)

    def call(ops):
        def f(**t):
            with torch.autocast("cpu", dtype=torch.float16), ops():
                return kernels.gelu_mlp(t["x"], t["fc_weight"], t["fc_bias"], t["proj_weight"], t["proj_bias"],
                                        residual=t["residual"])
        return f

    tensors = _grad_tensors(params, res)
    out = call(contextlib.nullcontext)(**tensors)
    assert out.dtype == torch.float32
    ours, peer = grad_errors(call(contextlib.nullcontext), call(kernels.reference_ops), tensors)
    assert_grads_within(ours, peer, torch.float16)


def test_backward_runs_triton_not_the_reference(interpreter_path, monkeypatch):
    calls = []
    real_bwd = mlp_module.gelu_mlp_bwd

    def counting_bwd(*args, **kwargs):
        calls.append(kwargs["needs"])
        return real_bwd(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("a PyTorch reference op ran")

    monkeypatch.setattr(mlp_module, "gelu_mlp_bwd", counting_bwd)
    monkeypatch.setattr(reference, "gelu_mlp", no_reference)
    monkeypatch.setattr(torch.nn.functional, "linear", no_reference)
    monkeypatch.setattr(torch.nn.functional, "gelu", no_reference)
    params, res = _mlp_inputs(5, 32, torch.float32)
    x = params[0].requires_grad_()
    out = kernels.gelu_mlp(x, *params[1:], residual=res)
    assert type(out.grad_fn).__name__ == "_GeluMLPBackward"
    out.sum().backward()
    assert calls == [(True, False, False, False, False)] and x.grad is not None


# ------------------------------------------------------------------------------------------- dropout
def test_dropout_mask_rate_scale_and_seed(interpreter_path):
    """p = 0.25 on the branch: a quarter of the branch's entries dropped (the residual passes through
    them exactly), the rest scaled by 1/(1-p); the seed comes from torch's generator."""
    params, res = _mlp_inputs(80, 32, torch.float32, seed=7)
    p = 0.25
    torch.manual_seed(11)
    out = kernels.gelu_mlp(*params, residual=res, dropout_p=p)
    branch = reference.gelu_mlp(*params)
    dropped = out == res
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial
    torch.testing.assert_close(out[~dropped], (branch / (1 - p) + res)[~dropped], rtol=1e-5, atol=1e-5)
    torch.manual_seed(11)
    assert torch.equal(kernels.gelu_mlp(*params, residual=res, dropout_p=p), out)  # same seed, same mask
    torch.manual_seed(12)
    assert not torch.equal(kernels.gelu_mlp(*params, residual=res, dropout_p=p) == res, dropped)


def test_dropout_backward_regenerates_the_mask(interpreter_path):
    """The backward's mask is the forward's: gradients equal those of branch * keep / (1 - p) + residual
    with keep read off the forward's output, within 3x PyTorch's error (fp16)."""
    dtype = torch.float16
    params, res = _mlp_inputs(20, 32, dtype, seed=8)
    p = 0.3
    torch.manual_seed(5)
    with torch.no_grad():
        keep = kernels.gelu_mlp(*params, residual=res, dropout_p=p) != res

    def ours(**t):
        torch.manual_seed(5)
        return _mlp_call(kernels.gelu_mlp, p)(**t)

    def peer(**t):
        branch = reference.gelu_mlp(t["x"], t["fc_weight"], t["fc_bias"], t["proj_weight"], t["proj_bias"])
        return branch * keep.to(branch.dtype) / (1 - p) + t["residual"]

    errs, peer_errs = grad_errors(ours, peer, _grad_tensors(params, res))
    assert_grads_within(errs, peer_errs, dtype)


# ------------------------------------------------------------------------------------- split-K plan
@pytest.mark.parametrize("C", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("M", [1, 8, 64])
def test_decode_split_plan(M, C):
    # Slices are whole multiples of every decode BLOCK_K, none empty, and they fill an H200 when K allows.
    for N, K in ((4 * C, C), (C, 4 * C)):
        kps = _k_per_split(M, N, K, num_sms=132)
        splits = math.ceil(K / kps)
        assert kps == K or (kps % 128 == 0 and kps >= 256 and (splits - 1) * kps < K)
        programs = math.ceil(M / 16) * math.ceil(N / 64) * splits
        assert programs >= 132 or kps < 512


# ---------------------------------------------------------------------------------- compile for GPUs
@pytest.mark.slow
def test_compile_report_every_config():
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["gelu_mlp"])  # prints the table
    assert len(rows) == 2 * len(compile_specs())
    for cfg in PREFILL_CONFIGS + DECODE_CONFIGS:
        kw = cfg.kwargs
        assert any(f"M{kw['BLOCK_M']} N{kw['BLOCK_N']} K{kw['BLOCK_K']} w{cfg.num_warps}" in r["name"] for r in rows)
    bad = {(r["name"], r["arch"]): problems(r) for r in rows if problems(r)}
    assert not bad, bad
    # 16-row decode tiles are below wgmma's 64-row minimum: they use mma.sync (HMMA) on both archs.
    assert all(r["hmma"] for r in rows if r["name"].startswith("linear decode M16"))


# -------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("M,C", [(1, 64), (7, 96), (300, 64), (1, 768), (64, 768), (512, 768), (33, 1600)])
def test_bf16_matches_float64(M, C, residual):
    params, res = _mlp_inputs(M, C, torch.bfloat16, residual=residual, device="cuda")
    _check_mlp(kernels.gelu_mlp(*params, residual=res), params, res)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_bf16_every_config(config):
    M = config.kwargs["BLOCK_M"] + 3
    params, res = _mlp_inputs(M, 48, torch.bfloat16, seed=1, device="cuda")
    _check_mlp(gelu_mlp_fwd(*params, residual=res, config=config, split_k=2), params, res)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("M", [1, 64, 4096])
def test_autotuned_gpt2_shapes(M, dtype):
    params, res = _mlp_inputs(M, 768, dtype, device="cuda")
    _check_mlp(kernels.gelu_mlp(*params, residual=res), params, res)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M,C", [(1, 768), (64, 768), (1023, 768), (4096, 768), (300, 1600)])
def test_gpu_backward(M, C, dtype, residual):
    """The autotuned backward GEMMs on gpt2-family shapes in every dtype, bf16 included."""
    params, res = _mlp_inputs(M, C, dtype, residual=residual, device="cuda")
    ours, peer = grad_errors(_mlp_call(kernels.gelu_mlp), _mlp_call(reference.gelu_mlp), _grad_tensors(params, res))
    assert_grads_within(ours, peer, dtype)


@pytest.mark.gpu
def test_gpu_backward_under_bf16_autocast():
    params, res = _mlp_inputs(2048, 768, torch.float32, device="cuda")
    params[0] = params[0].bfloat16()

    def call(ops):
        def f(**t):
            with torch.autocast("cuda", dtype=torch.bfloat16), ops():
                return kernels.gelu_mlp(t["x"], t["fc_weight"], t["fc_bias"], t["proj_weight"], t["proj_bias"],
                                        residual=t["residual"])
        return f

    ours, peer = grad_errors(call(contextlib.nullcontext), call(kernels.reference_ops), _grad_tensors(params, res))
    assert_grads_within(ours, peer, torch.bfloat16)
