"""kernels.linear_cross_entropy: the chunked loss of x @ weight.T and its gradients, against F.cross_entropy.

Under the interpreter the Triton row kernel and the weight-gradient GEMM run on CPU (fp32 and fp16: bf16
dots need a GPU); without it the chunked PyTorch path runs. Each loss and gradient is compared with the
materialised float64 computation, within 3x the error of PyTorch's own same-dtype F.cross_entropy.
"""

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import KERNEL_DEVICE
from helpers import assert_grads_within, grad_errors
from kernels import reference

ce = importlib.import_module("kernels.cross_entropy")


def _inputs(N, C, V, dtype, seed=0, ignore_every=4, device=KERNEL_DEVICE):
    """Hidden states of unit scale, a weight giving logits of a few units, targets with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    w = (2 * torch.randn(V, C, generator=g) / C**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[1::ignore_every] = -100
    return x, w, t.to(device)


def _loss_call(fn, **kw):
    def call(x, weight, targets):
        return fn(x, weight, targets, **kw)
    return call


def _check(x, w, t, dtype, **kw):
    """The loss and both gradients within 3x PyTorch's same-dtype error (against float64)."""
    tensors = dict(x=x.requires_grad_(), weight=w.requires_grad_(), targets=t)
    red = {"reduction": kw.get("reduction", "mean")}
    losses = []

    def ours(**t):
        losses.append(kernels.linear_cross_entropy(**t, **kw))
        return losses[-1]

    errs, peer_errs = grad_errors(ours, _loss_call(reference.linear_cross_entropy, **red), tensors)
    assert_grads_within(errs, peer_errs, dtype)
    loss = losses[0]
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.shape == ()
    loss64 = reference.linear_cross_entropy(x.detach().double(), w.detach().double(), t, **red)
    peer = reference.linear_cross_entropy(x.detach(), w.detach(), t, **red)
    err, peer_err = abs(loss.item() - loss64.item()), abs(peer.item() - loss64.item())
    assert err <= max(3 * peer_err, torch.finfo(torch.float32).eps * abs(loss64.item())), (err, peer_err)


# ---------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("N,C,V,chunk,dtype,reduction,block_v", [
    (1, 16, 7, None, torch.float32, "mean", None),        # one token
    (37, 32, 301, 16, torch.float16, "mean", None),       # 3 chunks, the last ragged; V padded to 384
    (20, 48, 301, 16, torch.float32, "sum", 128),         # the row kernel's vocabulary loop: 3 blocks, ragged
    (29, 32, 1000, None, torch.float16, "sum", None),
], ids=["T1", "chunked-fp16", "vocab-blocks-sum", "fp16-sum"])
def test_matches_cross_entropy_of_the_logits(interpreter_path, monkeypatch, N, C, V, chunk, dtype, reduction,
                                             block_v):
    if block_v:  # the launch's BLOCK_V is min(4096, next_pow2(V_pad)): walk several blocks at a small V
        monkeypatch.setattr(ce, "_BLOCK_V", block_v)
    x, w, t = _inputs(N, C, V, dtype, seed=N, ignore_every=0 if N == 1 else 4)
    _check(x, w, t, dtype, reduction=reduction, chunk_size=chunk)


def test_cpu_chunked_pytorch_path(reference_path):
    """The CPU path (no interpreter) chunks too, and agrees just as well; float64 runs there as well (the
    truth itself there: only the chunked summation order differs)."""
    x, w, t = _inputs(67, 24, 509, torch.float32, seed=3)
    _check(x, w, t, torch.float32, chunk_size=16)
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = kernels.linear_cross_entropy(x, w, t, chunk_size=16)
    loss.backward()
    x64, w64 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expect = F.cross_entropy(x64 @ w64.T, t)
    expect.backward()
    assert loss.dtype == torch.float64
    for got, want in ((loss, expect), (x.grad, x64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_three_dim_strided_input_and_large_logits(interpreter_path):
    """x (B, T, C) as a view of a wider buffer, targets (B, T); logits of size ~50 (the softmax's exp
    must not overflow: the row kernel subtracts the running maximum)."""
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(2, 9, 40, generator=g).requires_grad_()
    w = (50 * torch.randn(97, 32, generator=g) / 32**0.5).requires_grad_()
    t = torch.randint(0, 97, (2, 9), generator=g)
    t[0, 3] = -100

    def call(fn):
        return lambda wide, weight, targets: fn(wide[..., 8:], weight, targets)

    loss = kernels.linear_cross_entropy(wide[..., 8:], w, t, chunk_size=4)
    assert math.isfinite(loss.item())
    ours, theirs = grad_errors(call(kernels.linear_cross_entropy), call(reference.linear_cross_entropy),
                               dict(wide=wide, weight=w, targets=t))
    assert_grads_within(ours, theirs, torch.float32)


@pytest.mark.parametrize("path", ["interpreter", "cpu"])
def test_every_target_ignored(path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")
    x, w, _ = _inputs(6, 16, 50, torch.float32)
    t = torch.full((6,), -100)
    x.requires_grad_()
    mean = kernels.linear_cross_entropy(x, w, t)
    assert math.isnan(mean.item()) and math.isnan(F.cross_entropy(x @ w.T, t).item())  # 0 / 0, as PyTorch
    total = kernels.linear_cross_entropy(x, w, t, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_second_backward_sees_unscaled_gradients(interpreter_path):
    x, w, t = _inputs(10, 16, 40, torch.float32)
    x.requires_grad_()
    loss = kernels.linear_cross_entropy(x, w, t)
    (2 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    torch.testing.assert_close(first, 2 * x.grad, rtol=0, atol=0)


def test_under_autocast_weight_gradient_stays_fp32(interpreter_path):
    """CPU fp16 autocast: the fp32 weight (a tied embedding) gets an fp32 gradient, accumulated over the
    chunks in fp32; the peer is PyTorch under the same autocast (fp16 logits, fp32 softmax)."""
    x, w, t = _inputs(33, 32, 200, torch.float32, seed=6)
    x = x.half()

    def call(ops):
        def f(x, weight, targets):
            with torch.autocast("cpu", dtype=torch.float16), ops():
                return kernels.linear_cross_entropy(x, weight, targets, chunk_size=16)
        return f

    tensors = dict(x=x.requires_grad_(), weight=w.requires_grad_(), targets=t)
    ours, theirs = grad_errors(call(contextlib.nullcontext), call(kernels.reference_ops), tensors)
    assert_grads_within(ours, theirs, torch.float16)


def test_the_triton_path_runs_triton(interpreter_path, monkeypatch):
    calls = []
    real_rows, real_gemm = ce._ce_rows_triton, ce.gemm

    def rows(*a, **k):
        calls.append("rows")
        return real_rows(*a, **k)

    def gemm(*a, **k):
        calls.append("gemm")
        return real_gemm(*a, **k)

    def no_reference(*a, **k):
        raise AssertionError("a PyTorch cross-entropy ran")

    monkeypatch.setattr(ce, "_ce_rows_triton", rows)
    monkeypatch.setattr(ce, "gemm", gemm)
    monkeypatch.setattr(F, "cross_entropy", no_reference)
    monkeypatch.setattr(torch, "logsumexp", no_reference)
    x, w, t = _inputs(12, 16, 30, torch.float32)
    loss = kernels.linear_cross_entropy(x, w.requires_grad_(), t, chunk_size=8)
    assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyBackward"
    loss.backward()
    assert calls == ["rows", "gemm", "rows", "gemm"] and w.grad.dtype == torch.float32


def test_chunk_rows_bound_the_logits_buffer():
    assert ce.chunk_rows(8192, 50257) == 1024  # 1024 x 50304 padded values: 2^26 at most
    assert ce.chunk_rows(8192, 50257) * 50304 <= 1 << 26
    assert ce.chunk_rows(5, 50257) == 5 and ce.chunk_rows(100_000, 10) == 100_000
    assert ce.chunk_rows(10**6, 2**20) == 64


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise(reference_path):
    x, w, t = _inputs(4, 8, 10, torch.float32, ignore_every=0)
    with pytest.raises(TypeError, match="targets"):
        kernels.linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="targets"):
        kernels.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_cross_entropy(x, w[:, :7], t)
    with pytest.raises(TypeError, match="weight"):
        kernels.linear_cross_entropy(x, w.half(), t)
    with pytest.raises(ValueError, match="reduction"):
        kernels.linear_cross_entropy(x, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        kernels.linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets hold 10, outside \[0, 10\)"):
        kernels.linear_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]))


# -------------------------------------------------------------------------------------- compile / GPU
@pytest.mark.slow
def test_compile_report_every_config():
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["cross_entropy"])
    assert len(rows) == 2 * len(ce.compile_specs())
    bad = {(r["name"], r["arch"]): problems(r) for r in rows if problems(r)}
    assert not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_gpt2_head(dtype):
    """The gpt2 head (V = 50257, C = 768) on 2048 tokens in every dtype."""
    x, w, t = _inputs(2048, 768, 50257, dtype, device="cuda")
    _check(x, w, t, dtype)


@pytest.mark.gpu
def test_gpu_peak_memory_is_a_fraction_of_the_materialised():
    """Forward + backward of 8192 tokens through the gpt2 head under bf16 autocast: the fused op's peak
    allocation above its inputs is under a third of the materialised version's."""
    x, w, t = _inputs(8192, 768, 50257, torch.float32, device="cuda")
    peaks = {}
    for name, ops in (("fused", contextlib.nullcontext), ("materialised", kernels.reference_ops)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16), ops():
            loss = kernels.linear_cross_entropy(xs, ws, t)
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del xs, ws, loss
    assert peaks["fused"] < peaks["materialised"] / 3, peaks

