"""Fused residual-add + LayerNorm (kernels/layer_norm.py) on CUDA: right in every dtype, and how fast.

    check(device, dtypes)                -> rows op, case, dtype, max_err, tol, ok   (against float64)
    run(device, dtypes, quick, ceilings) -> timing rows, GB/s = bytes read + written per call
    pytest benchmarks/bench_layer_norm.py --benchmark-enable     # pytest-benchmark; skips without CUDA

Peers, in the same run: torch.nn.functional.layer_norm for the plain form, ``x + r`` then
F.layer_norm for the residual form (the unfused pair the kernel replaces). M = 4096 rows,
N in {768, 1024, 1280, 1600, 2048, 4096, 8192, 16384}; quick: N in {768, 1600, 4096, 16384}, bf16-only
when the caller asks for bf16 only.

At these sizes one call moves 6-500 MB, i.e. 2-120 us on an H200, and the shortest are as long as a
Python launch. So each timed call is one replay of a CUDA graph holding K launches over K different
input sets (together larger than L2, so no launch reads another's data from cache); the median replay
(do_bench, L2 flushed between replays) divided by K is the per-call time of the kernel itself. The
same holds for the peers. Where capture fails, plain launches are timed and the row says so.

Calls go through the launcher kernels.layer_norm.layer_norm_fwd (what the public op dispatches to on
CUDA after validation).

Backward rows (residual form): kernels.layer_norm.layer_norm_bwd from the forward's saved h, mean and rstd
against PyTorch autograd's backward of `x + r` then F.layer_norm (torch.autograd.grad on a kept graph),
GB/s = h, dy and dh read plus dx written (4 M N elements; dx is also the residual's gradient).
check() adds backward cases: every gradient against float64 within 3x autograd's same-dtype error, bf16
in the autocast layout (fp32 residual stream and weights).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from benchmarks.common import L2_BYTES, grad_check_row, require_cuda, time_per_call, timing_row

OP = "layer_norm"
M = 4096
N_ALL = (768, 1024, 1280, 1600, 2048, 4096, 8192, 16384)
N_QUICK = (768, 1600, 4096, 16384)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
EPS = 1e-5


def _launcher():
    return importlib.import_module("kernels.layer_norm").layer_norm_fwd


def _randn(shape, gen, dtype, device, scale=1.0, offset=0.0):
    return (offset + scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------- check
def check(device, dtypes) -> list[dict]:
    """Every dtype against the float64 reference: odd shapes, large magnitudes, strided rows, the looped
    regime, fp32 weights under 16-bit activations, and the statistics."""
    from kernels import reference

    device = require_cuda(device, "bench_layer_norm")
    fwd = _launcher()
    cases = [  # (name, shape, scale, offset, residual, row_pad)
        ("odd rows 257x768", (257, 768), 1.0, 0.0, True, 0),
        ("3x5x1600 plain", (3, 5, 1600), 1.0, 0.0, False, 0),
        ("odd N 33x1023", (33, 1023), 1.0, 0.0, True, 0),
        ("-20+0.5*randn 64x4096", (64, 4096), 0.5, -20.0, True, 0),
        ("1e4*randn 16x16384", (16, 16384), 1e4, 0.0, False, 0),  # x + r would overflow fp16
        ("looped 4x50257", (4, 50257), 1.0, 0.0, True, 0),
        ("strided rows 128x1600 (+8)", (128, 1600), 1.0, 0.0, True, 8),
        ("strided rows 128x1600 (+1)", (128, 1600), 1.0, 0.0, True, 1),
    ]
    rows = []
    for dtype in dtypes:
        tol = TOL[dtype]
        for wdtype in dict.fromkeys((dtype, torch.float32)):
            for name, shape, scale, offset, residual, pad in cases:
                gen = torch.Generator().manual_seed(0)
                N = shape[-1]
                x = _randn(shape[:-1] + (N + pad,), gen, dtype, device, scale, offset)[..., :N]
                r = _randn(shape, gen, dtype, device, scale) if residual else None
                w = _randn((N,), gen, wdtype, device, 0.5, 1.0)
                b = _randn((N,), gen, wdtype, device, 0.5)
                out = fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
                h64 = x.double().cpu() + (r.double().cpu() if residual else 0)
                y64 = reference.layer_norm(h64, w.double().cpu(), b.double().cpu(), eps=EPS)
                mean64 = h64.mean(-1).reshape(-1)
                rstd64 = 1 / torch.sqrt(((h64 - h64.mean(-1, keepdim=True)) ** 2).mean(-1) + EPS).reshape(-1)

                def err(a, e):  # |a - e| / (1 + |e|): absolute near 0, relative for large values
                    return float(((a.double().cpu() - e).abs() / (1 + e.abs())).max())

                e = err(out[0], y64)
                tol_y = tol
                if dtype == torch.float32:  # h = x + r rounded to fp32 is inherent: allow 2x PyTorch's fp32 error
                    hx = x if r is None else x + r
                    tol_y = max(tol, 2 * err(F.layer_norm(hx, (N,), w.float(), b.float(), EPS), y64))
                if residual:
                    e = max(e, err(out[1], h64))
                scale_h = h64.abs().reshape(-1, N).mean(-1)
                e_stats = max(float(((out[-2].double().cpu() - mean64).abs() / scale_h).max()),
                              float(((out[-1].double().cpu() - rstd64).abs() / rstd64).max()))
                wname = "" if wdtype == dtype else " w:fp32"
                for what, value, limit in (("y,h", e, tol_y), ("mean,rstd", e_stats, 1e-5)):
                    rows.append({"op": OP, "case": f"{name}{wname} {what}", "dtype": str(dtype).replace("torch.", ""),
                                 "max_err": value, "tol": limit, "ok": bool(value <= limit)})
        rows += _check_backward(device, dtype)
    return rows


def _check_backward(device, dtype) -> list[dict]:
    import kernels
    from kernels import reference

    rows = []
    # bf16 is what autocast trains: a bf16 branch beside the fp32 stream, fp32 weights
    stream = torch.float32 if dtype == torch.bfloat16 else dtype
    for name, shape in (("257x768", (257, 768)), ("4x1023", (4, 1023)), ("2048x1600", (2048, 1600)),
                        ("looped 8x20000", (8, 20000))):
        gen = torch.Generator().manual_seed(1)
        N = shape[-1]
        tensors = dict(x=_randn(shape, gen, dtype, device, 1.0, -2.0).requires_grad_(),
                       residual=_randn(shape, gen, stream, device).requires_grad_(),
                       weight=_randn((N,), gen, stream, device, 0.5, 1.0).requires_grad_(),
                       bias=_randn((N,), gen, stream, device, 0.5).requires_grad_())
        rows.append(grad_check_row(OP, name + (" r,w:fp32" if stream != dtype else ""), dtype,
                                   lambda **t: kernels.layer_norm(t["x"], t["weight"], t["bias"], EPS, t["residual"]),
                                   lambda **t: reference.layer_norm(t["x"], t["weight"], t["bias"], EPS, t["residual"]),
                                   tensors))
    return rows


# --------------------------------------------------------------------------------------------- run
def _inputs(N, dtype, device, residual, copies):
    gen = torch.Generator(device=device).manual_seed(N)
    sets = []
    for _ in range(copies):
        x = torch.randn((M, N), generator=gen, device=device).to(dtype)
        r = torch.randn((M, N), generator=gen, device=device).to(dtype) if residual else None
        sets.append((x, r))
    w = (1 + 0.5 * torch.randn(N, generator=gen, device=device)).to(dtype)
    b = (0.5 * torch.randn(N, generator=gen, device=device)).to(dtype)
    return sets, w, b


def run(device, dtypes, quick: bool, ceilings) -> list[dict]:
    device = require_cuda(device, "bench_layer_norm")
    fwd = _launcher()
    timing = dict(warmup_ms=10, rep_ms=30) if quick else dict(warmup_ms=25, rep_ms=100)
    rows = []
    for dtype in dtypes:
        elt = torch.empty((), dtype=dtype).element_size()
        for N in (N_QUICK if quick else N_ALL):
            for residual in (False, True):
                nbytes = (4 if residual else 2) * M * N * elt + 2 * N * elt
                copies = max(2, min(16, -(-2 * L2_BYTES // nbytes)))
                sets, w, b = _inputs(N, dtype, device, residual, copies)
                if residual:
                    ours = [lambda x=x, r=r: fwd(x, w, b, eps=EPS, residual=r) for x, r in sets]
                    peer = [lambda x=x, r=r: F.layer_norm(x + r, (N,), w, b, EPS) for x, r in sets]
                    peer_name = "torch add + F.layer_norm"
                else:
                    ours = [lambda x=x: fwd(x, w, b, eps=EPS) for x, _ in sets]
                    peer = [lambda x=x: F.layer_norm(x, (N,), w, b, EPS) for x, _ in sets]
                    peer_name = "F.layer_norm"
                ours_ms, how = time_per_call(ours, timing)
                peer_ms, peer_how = time_per_call(peer, timing)
                row = timing_row(OP, f"M={M} N={N}" + (" +residual" if residual else ""), dtype,
                                 ours_ms, peer_name, peer_ms, nbytes, "GB/s", ceilings)
                row["timing"] = how if how == peer_how else f"ours {how}, peer {peer_how}"
                rows.append(row)
                del sets, ours, peer
            rows.append(_backward_row(N, dtype, device, timing, ceilings))
        torch.cuda.empty_cache()
    return rows


def _backward_row(N, dtype, device, timing, ceilings) -> dict:
    """The residual form's backward, ours from the saved statistics against autograd's backward."""
    bwd = importlib.import_module("kernels.layer_norm").layer_norm_bwd
    fwd = _launcher()
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = 4 * M * N * elt + 2 * N * elt
    copies = max(2, min(16, -(-2 * L2_BYTES // nbytes)))
    sets, w, b = _inputs(N, dtype, device, True, copies)
    gen = torch.Generator(device=device).manual_seed(7)
    ours, peer = [], []
    w_leaf, b_leaf = w.clone().requires_grad_(), b.clone().requires_grad_()
    for x, r in sets:
        dy, dh = (torch.randn(x.shape, generator=gen, device=device).to(dtype) for _ in range(2))
        _, h, mean, rstd = fwd(x, w, b, eps=EPS, residual=r, return_stats=True)
        ours.append(lambda dy=dy, dh=dh, h=h, mean=mean, rstd=rstd: bwd(dy, h, w, mean, rstd, dh=dh))
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        hl = xl + rl
        yl = F.layer_norm(hl, (N,), w_leaf, b_leaf, EPS)
        peer.append(lambda yl=yl, hl=hl, xl=xl, rl=rl, dy=dy, dh=dh: torch.autograd.grad(
            (yl, hl), (xl, rl, w_leaf, b_leaf), (dy, dh), retain_graph=True))
    ours_ms, how = time_per_call(ours, timing)
    peer_ms, peer_how = time_per_call(peer, timing)
    row = timing_row(OP, f"M={M} N={N} +residual bwd", dtype, ours_ms, "autograd: add + F.layer_norm", peer_ms,
                     nbytes, "GB/s", ceilings)
    row["timing"] = how if how == peer_how else f"ours {how}, peer {peer_how}"
    return row


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # run() and check() need no pytest
    pytest = None

if pytest is not None:
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("N", [768, 1600, 4096, 16384])
    @pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
    def test_layer_norm_fwd(benchmark, N, dtype, residual):
        fwd = _launcher()
        sets, w, b = _inputs(N, dtype, "cuda", residual, 1)
        x, r = sets[0]

        def call():
            fwd(x, w, b, eps=EPS, residual=r)
            torch.cuda.synchronize()

        benchmark(call)

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_check_all_rows_ok(dtype):
        bad = [r for r in check("cuda", [dtype]) if not r["ok"]]
        assert not bad, bad
