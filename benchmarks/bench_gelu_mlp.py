"""GPT-2's MLP: the two fused Triton GEMMs against PyTorch eager (linear, gelu(tanh), linear, add) and
torch.compile of the same function. GPU only for speed; the module imports cleanly on a CPU.

Work per call: 2 * M * C * F * 2 FLOPs (F = 4C). For M <= 64 the weights dominate the traffic, so a
second row reports the weight-streaming rate (bytes of both weight matrices / time) against the copy
ceiling.

Backward rows: kernels.gelu_mlp.gelu_mlp_bwd (dz with dGELU in its epilogue, dx, both weight gradients:
four GEMMs, 2 * M * C * F * 4 FLOPs) from the forward's saved x and z, against autograd's backward of the
eager MLP (torch.autograd.grad on a kept graph). check() adds backward cases (every gradient within 3x
autograd's same-dtype error), bf16 under autocast with fp32 weights as training runs it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from benchmarks.common import bench_ms, grad_check_row, timing_row

OP = "gelu_mlp"
M_VALUES = (1, 8, 64, 512, 4096, 8192)
C_VALUES = (768, 1600)
QUICK_SHAPES = ((1, 768), (64, 768), (4096, 768), (1, 1600))
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def eager(x, fc_w, fc_b, proj_w, proj_b, residual):
    return F.linear(F.gelu(F.linear(x, fc_w, fc_b), approximate="tanh"), proj_w, proj_b) + residual


def make_inputs(M, C, dtype, device, seed=0):
    """Random (never zero) GPT-2-like MLP operands with nn.Linear layouts; residual included."""
    g = torch.Generator(device=device).manual_seed(seed)
    Fh = 4 * C

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return (randn(M, C), randn(Fh, C, scale=C**-0.5), randn(Fh, scale=0.1),
            randn(C, Fh, scale=Fh**-0.5), randn(C, scale=0.1), randn(M, C))


def _ours(x, fc_w, fc_b, proj_w, proj_b, residual):
    return kernels.gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, residual=residual)


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def check(device, dtypes) -> list[dict]:
    """Correctness of every dtype against float64, within max(2x eager's error, the dtype's tolerance)."""
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        if device.type != "cuda" and dtype == torch.bfloat16:
            continue  # the interpreter cannot do bf16 tl.dot; bf16 is checked on a GPU
        for M, C in ((1, 768), (7, 768), (64, 1600), (512, 768)):
            args = make_inputs(M, C, dtype, device)
            ref = eager(*[a.double() for a in args])
            err = _rel_err(_ours(*args), ref)
            tol = max(2 * _rel_err(eager(*args), ref), DTYPE_TOL[dtype])
            rows.append({"op": OP, "case": f"M={M} C={C} +res", "dtype": str(dtype).replace("torch.", ""),
                         "max_err": err, "tol": tol, "ok": err <= tol})
        rows += _check_backward(device, dtype)
    return rows


def _check_backward(device, dtype) -> list[dict]:
    import contextlib

    names = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias", "residual")
    rows = []
    for M, C in ((1, 768), (7, 768), (512, 768), (1023, 1600)):
        args = make_inputs(M, C, dtype, device)
        if dtype == torch.bfloat16:  # as training runs it: fp32 weights and stream, bf16 autocast
            args = (args[0],) + tuple(a.float() for a in args[1:])
        tensors = {n: a.requires_grad_() for n, a in zip(names, args)}

        def call(ops):
            def f(**t):
                amp = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                       else contextlib.nullcontext())
                with amp, ops():
                    return kernels.gelu_mlp(*(t[n] for n in names[:5]), residual=t["residual"])
            return f

        rows.append(grad_check_row(OP, f"M={M} C={C} +res" + (" autocast" if dtype == torch.bfloat16 else ""),
                                   dtype, call(contextlib.nullcontext), call(kernels.reference_ops), tensors))
    return rows


def _compiled():
    try:
        return torch.compile(eager)
    except Exception:  # noqa: BLE001 - torch.compile is only a peer; its absence is not our failure
        return None


def run(device, dtypes, quick: bool = False, ceilings: dict | None = None) -> list[dict]:
    """Timing rows: TFLOP/s vs eager and vs torch.compile; for M <= 64 also weight GB/s vs eager."""
    device = torch.device(device)
    if device.type != "cuda":
        return []  # interpreter timings mean nothing
    shapes = QUICK_SHAPES if quick else [(M, C) for C in C_VALUES for M in M_VALUES]
    timing = dict(warmup_ms=10, rep_ms=40) if quick else {}
    compiled = None if quick else _compiled()
    rows = []
    for dtype in dtypes:
        for M, C in shapes:
            args = make_inputs(M, C, dtype, device)
            shape = f"M={M} C={C} F={4 * C} +res"
            ours_ms = bench_ms(lambda: _ours(*args), **timing)
            eager_ms = bench_ms(lambda: eager(*args), **timing)
            flops = 2 * M * C * (4 * C) * 2
            rows.append(timing_row(OP, shape, dtype, ours_ms, "torch eager", eager_ms, flops, "TFLOP/s", ceilings))
            if compiled is not None:
                try:
                    compiled(*args)
                    comp_ms = bench_ms(lambda: compiled(*args), **timing)
                except Exception:  # noqa: BLE001 - a failing peer is reported as missing
                    comp_ms = None
                rows.append(timing_row(OP, shape, dtype, ours_ms, "torch.compile", comp_ms, flops, "TFLOP/s",
                                       ceilings))
            if M <= 64:
                weight_bytes = sum(a.numel() * a.element_size() for a in args[1:5])
                rows.append(timing_row(OP, shape + " weights", dtype, ours_ms, "torch eager", eager_ms,
                                       weight_bytes, "GB/s", ceilings))
            if M >= 512:
                rows.append(_backward_row(M, C, dtype, device, timing, ceilings))
    return rows


def _backward_row(M, C, dtype, device, timing, ceilings) -> dict:
    """The four backward GEMMs from the saved x and z, against autograd's backward of the eager MLP."""
    from kernels.gelu_mlp import gelu_mlp_bwd, gelu_mlp_fwd

    x, w1, b1, w2, b2, r = make_inputs(M, C, dtype, device)
    _, z = gelu_mlp_fwd(x, w1, b1, w2, b2, residual=r, save_preact=True)
    dy = torch.randn(M, C, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    out = eager(*leaves, r)
    ours_ms = bench_ms(lambda: gelu_mlp_bwd(dy, x, z, w1, w2), **timing)
    peer_ms = bench_ms(lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True), **timing)
    return timing_row(OP, f"M={M} C={C} F={4 * C} bwd", dtype, ours_ms, "autograd eager", peer_ms,
                      2 * M * C * (4 * C) * 4, "TFLOP/s", ceilings)


# ------------------------------------------------------------------------------- pytest-benchmark
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,C", [(1, 768), (64, 768), (4096, 768), (8192, 1600)])
@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_bench_gelu_mlp(benchmark, impl, M, C, dtype):
    args = make_inputs(M, C, dtype, "cuda")
    fn = _ours if impl == "triton" else eager
    fn(*args)
    torch.cuda.synchronize()

    def step():
        fn(*args)
        torch.cuda.synchronize()

    benchmark(step)


@needs_cuda
def test_check_all_dtypes():
    rows = check("cuda", (torch.float32, torch.float16, torch.bfloat16))
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
