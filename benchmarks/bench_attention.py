"""Prefill flash attention: TFLOP/s of kernels.flash_attention against PyTorch SDPA (and FlashAttention's
flash_attn_func when it is importable), on CUDA.

Work is 4 * B * H * T^2 * D FLOPs (two matmuls), halved when causal. Shapes: B*T = 16k tokens with
H*D = 2048, T from 512 to 16k, D 64 and 128; and GPT-2's (H 12, D 64, B 8, T 256..1024). Inputs are the
(B, H, T, D) views of a fused (B, T, 3, H, D) qkv projection, as the model passes them.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from benchmarks.common import bench_ms, timing_row
from kernels import reference

OP = "attention"  # the op's one name (kernels/attention.py), as the report groups rows
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
            del qkv, q, k, v
    return rows


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
def test_check_passes():
    rows = check("cuda", [torch.float16, torch.bfloat16, torch.float32])
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
