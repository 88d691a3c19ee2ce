"""Prefill flash attention: TFLOP/s of kernels.flash_attention against PyTorch SDPA (and FlashAttention's
flash_attn_func when it is importable), on CUDA.

Work is 4 * B * H * T^2 * D FLOPs (two matmuls), halved when causal. Shapes: B*T = 16k tokens with
H*D = 2048, T from 512 to 16k, D 64 and 128; and GPT-2's (H 12, D 64, B 8, T 256..1024). Inputs are the
(B, H, T, D) views of a fused (B, T, 3, H, D) qkv projection, as the model passes them.

Backward rows (op "attention bwd"): the gradient of that projection from an upstream dO, ours (the
Triton backward writing one (B, T, 3, H, D) buffer) against SDPA's backward on the same inputs (its three
gradients then stacked through unbind, as autograd does for the model); timed alone (the forward done
once, outside the timing) and as forward + backward. Work is the standard count: the backward is 2.5x
the forward's FLOPs (five matmuls to the forward's two; the recomputation of QK^T in the dQ pass is not
counted), forward + backward 3.5x.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from benchmarks.common import bench_ms, timing_row
from kernels import reference

OP = "attention"  # the op's one name (kernels/attention.py), as the report groups rows
OP_BWD = "attention bwd"  # its backward, plotted on its own
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LONG = [(16384 // t, 2048 // d, t, d) for d in (64, 128) for t in (512, 1024, 2048, 4096, 8192, 16384)]
GPT2 = [(8, 12, t, 64) for t in (256, 512, 1024)]
QUICK = [(8, 12, 1024, 64), (4, 16, 4096, 128)]


def _fused_qkv(B, H, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    return qkv


def _views(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each, no copy


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def check(device, dtypes) -> list[dict]:
    """Max error against float64 for a few awkward shapes (Tq < Tk, padded D, partial blocks)."""
    rows = []
    cases = [(2, 3, 257, 257, 64, True), (2, 3, 257, 257, 128, False), (1, 4, 77, 300, 80, True),
             (3, 2, 1, 130, 64, True)]
    for dtype in dtypes:
        if torch.device(device).type != "cuda" and dtype == torch.bfloat16:
            continue  # bf16 dots are only meaningful on the GPU (the interpreter cannot run them)
        for B, H, Tq, Tk, D, causal in cases:
            qkv = _fused_qkv(B, H, Tk, D, dtype, device, seed=Tq + D)
            q, k, v = _views(qkv)
            q = q[:, :, Tk - Tq:]
            out = kernels.flash_attention(q, k, v, causal=causal)
            ref = reference.flash_attention(q.double(), k.double(), v.double(), causal=causal)
            peer = reference.flash_attention(q, k, v, causal=causal)
            tol = max(2 * (peer.double() - ref).abs().max().item(), FLOOR[dtype])
            err = (out.double() - ref).abs().max().item()
            rows.append({"op": OP, "case": f"B={B} H={H} Tq={Tq} Tk={Tk} D={D}{' causal' if causal else ''}",
                         "dtype": str(dtype).replace("torch.", ""), "max_err": err, "tol": tol,
                         "ok": bool(err <= tol and torch.isfinite(out).all())})
    return rows + check_backward(device, dtypes)


def _grads(fn, q, k, v, do):
    """dq, dk, dv of fn(q, k, v) on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves).backward(do)
    return [t.grad for t in leaves]


def check_backward(device, dtypes) -> list[dict]:
    """dq, dk, dv against float64, FlashAttention's rule: at most 3x the error of SDPA's own backward in
    the same dtype (floor: the dtype's precision times the gradient's size). The fused-qkv case goes
    through the public op (one gradient buffer); the others through separate leaves, Tq < Tk included."""
    rows = []
    cases = [(2, 3, 257, 257, 64, True), (2, 3, 257, 257, 128, False), (1, 4, 77, 300, 80, True),
             (3, 2, 1, 130, 64, True), (1, 2, 1023, 1023, 64, True)]
    for dtype in dtypes:
        if torch.device(device).type != "cuda" and dtype == torch.bfloat16:
            continue
        for B, H, Tq, Tk, D, causal in cases:
            g = torch.Generator(device=device).manual_seed(Tq + D)
            qkv = _fused_qkv(B, H, Tk, D, dtype, device, seed=Tq + D).requires_grad_()
            q, k, v = _views(qkv)
            do = torch.randn(B, H, Tq, D, generator=g, device=device, dtype=torch.float32).to(dtype)
            if Tq == Tk:  # the model's case: one buffer for the projection's gradient
                kernels.flash_attention(q, k, v, causal=causal).backward(do)
                ours = [t.transpose(1, 2) for t in qkv.grad.unbind(2)]
            else:
                q = q[:, :, Tk - Tq:]
                ours = _grads(lambda a, b, c: kernels.flash_attention(a, b, c, causal=causal), q, k, v, do)
            q, k, v = q.detach(), k.detach(), v.detach()
            ref = _grads(lambda a, b, c: reference.flash_attention(a, b, c, causal=causal),
                         q.double(), k.double(), v.double(), do.double())
            peer = _grads(lambda a, b, c: reference.flash_attention(a, b, c, causal=causal), q, k, v, do)
            for name, o, p, r in zip(("dq", "dk", "dv"), ours, peer, ref):
                err = (o.double() - r).abs().max().item()
                tol = max(3 * (p.double() - r).abs().max().item(), FLOOR[dtype] * max(1.0, r.abs().max().item()))
                rows.append({"op": OP_BWD, "case": f"{name} B={B} H={H} Tq={Tq} Tk={Tk} D={D}"
                             f"{' causal' if causal else ''}", "dtype": str(dtype).replace("torch.", ""),
                             "max_err": err, "tol": tol, "ok": bool(err <= tol and torch.isfinite(o).all())})
    return rows


def run(device, dtypes, quick: bool, ceilings) -> list[dict]:
    """Causal prefill timings; one row per peer, each against the same measurement of ours."""
    if torch.device(device).type != "cuda":
        return []
    flash_attn_func = _flash_attn()
    shapes = QUICK if quick else GPT2 + LONG
    bench = dict(warmup_ms=10, rep_ms=40) if quick else {}
    rows = []
    for dtype in dtypes:
        if dtype == torch.float32:
            continue  # fp32 is the parity path (IEEE dots on FMA units), not a speed target
        for B, H, T, D in shapes:
            qkv = _fused_qkv(B, H, T, D, dtype, device)
            q, k, v = _views(qkv)
            shape = f"B={B} H={H} T={T} D={D} causal"
            work = 4 * B * H * T * T * D / 2
            ours = bench_ms(lambda: kernels.flash_attention(q, k, v, causal=True), **bench)
            sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                            **bench)
            rows.append(timing_row(OP, shape, dtype, ours, "torch SDPA", sdpa, work, "TFLOP/s", ceilings))
            if flash_attn_func is not None:
                qf, kf, vf = qkv.unbind(2)  # (B, T, H, D) views: flash_attn's layout
                fa = bench_ms(lambda: flash_attn_func(qf, kf, vf, causal=True), **bench)
                rows.append(timing_row(OP, shape, dtype, ours, "flash_attn", fa, work, "TFLOP/s", ceilings))
            rows += _backward_rows(qkv, shape, dtype, work, bench, ceilings)
            del qkv, q, k, v
    return rows


def _backward_rows(qkv, shape, dtype, fwd_work, bench, ceilings) -> list[dict]:
    """Backward alone and forward + backward, ours vs SDPA's, for the projection's gradient."""
    qkv = qkv.detach().requires_grad_()
    q, k, v = _views(qkv)
    do = torch.randn_like(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def times(fwd):
        o = fwd()
        torch.autograd.grad(o, qkv, do, retain_graph=True)  # autotune and allocate outside the timing
        bwd = bench_ms(lambda: torch.autograd.grad(o, qkv, do, retain_graph=True), **bench)
        both = bench_ms(lambda: torch.autograd.grad(fwd(), qkv, do), **bench)
        return bwd, both

    ours_bwd, ours_both = times(lambda: kernels.flash_attention(q, k, v, causal=True))
    sdpa_bwd, sdpa_both = times(lambda: sdpa(q, k, v, is_causal=True))
    return [timing_row(OP_BWD, shape + " bwd", dtype, ours_bwd, "torch SDPA", sdpa_bwd, 2.5 * fwd_work,
                       "TFLOP/s", ceilings),
            timing_row(OP_BWD, shape + " fwd+bwd", dtype, ours_both, "torch SDPA", sdpa_both, 3.5 * fwd_work,
                       "TFLOP/s", ceilings)]


# ------------------------------------------------------------------------------------ pytest-benchmark
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", GPT2 + [(4, 32, 4096, 64), (1, 16, 16384, 128)])
def test_flash_attention(benchmark, B, H, T, D, dtype):
    q, k, v = _views(_fused_qkv(B, H, T, D, dtype, "cuda"))
    kernels.flash_attention(q, k, v, causal=True)  # autotune outside the timing
    benchmark(lambda: (kernels.flash_attention(q, k, v, causal=True), torch.cuda.synchronize()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", GPT2 + [(4, 32, 4096, 64), (1, 16, 16384, 128)])
def test_sdpa(benchmark, B, H, T, D, dtype):
    q, k, v = _views(_fused_qkv(B, H, T, D, dtype, "cuda"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    benchmark(lambda: (sdpa(q, k, v, is_causal=True), torch.cuda.synchronize()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", GPT2 + [(4, 32, 4096, 64), (1, 16, 16384, 128)])
@pytest.mark.parametrize("impl", ["ours", "sdpa"])
def test_backward(benchmark, impl, B, H, T, D, dtype):
    qkv = _fused_qkv(B, H, T, D, dtype, "cuda").requires_grad_()
    q, k, v = _views(qkv)
    if impl == "ours":
        o = kernels.flash_attention(q, k, v, causal=True)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    do = torch.randn_like(o)
    torch.autograd.grad(o, qkv, do, retain_graph=True)  # autotune outside the timing
    benchmark(lambda: (torch.autograd.grad(o, qkv, do, retain_graph=True), torch.cuda.synchronize()))


@needs_cuda
def test_check_passes():
    rows = check("cuda", [torch.float16, torch.bfloat16, torch.float32])
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
