"""Split-KV decode attention (kernels/decode_attention.py) on CUDA: right in every dtype, and how fast.

    check(device, dtypes)                -> rows op, case, dtype, max_err, tol, ok   (against float64)
    run(device, dtypes, quick, ceilings) -> timing rows, GB/s = bytes of K and V read per call
    pytest benchmarks/bench_decode_attention.py --benchmark-enable   # pytest-benchmark; skips without CUDA

Work per call: the K and V positions the kernel actually reads, sum(cache_seqlens) * H * D * 2 *
itemsize (q, the output and the split partials are left out: they are < 1% here). The goal on an H200
is >= 85% of the measured copy bandwidth at long T. Peer, in the same run: F.scaled_dot_product_attention
on the cache sliced to the (equal) lengths, which is what a caller without a ragged-length kernel does.

Shapes: B in {1, 8, 64} x T in {1k, 8k, 32k, 128k}, H = 12 for D = 64 and H = 16 for D = 128, cache
full (len = Tmax = T); shapes whose K and V exceed 48 GB are skipped. The full run adds a quarter-full
cache (len 8k of Tmax 32k): the split count follows Tmax, not the lengths (no host sync), so there the
splits past the length are launched for nothing. quick: four shapes.

Small shapes move a few MB, less than a launch costs, so each timed call is one replay of a CUDA graph
holding K calls over K input sets (together larger than L2); the median replay (do_bench) divided by K
is the per-call time. Where capture fails, plain launches are timed and the row says so.

Calls go through the launcher kernels.decode_attention.decode_attention_fwd (what the public op
dispatches to on CUDA after validation).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from benchmarks.common import L2_BYTES, require_cuda, time_per_call, timing_row

OP = "decode_attention"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
B_ALL = (1, 8, 64)
T_ALL = (1024, 8192, 32768, 131072)
D_H = ((64, 12), (128, 16))  # (head dim, heads)
QUICK = ((1, 131072, 128, 16), (1, 32768, 64, 12), (8, 8192, 128, 16), (64, 1024, 64, 12))  # B, T, D, H
_MAX_BYTES = 48 << 30


def _launcher():
    return importlib.import_module("kernels.decode_attention").decode_attention_fwd


def _randn(shape, gen, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, device=device)).to(dtype)


# ------------------------------------------------------------------------------------------- check
def check(device, dtypes) -> list[dict]:
    """Every dtype against the float64 reference: ragged lengths with 1 and auto splits, odd head dims,
    a long cache, a (B, T, H, D) cache layout, large logits, and garbage past each row's length."""
    from kernels import reference

    device = require_cuda(device, "bench_decode_attention")
    fwd = _launcher()
    cases = [  # (name, B, H, Tmax, D, lens, num_splits, layout, q/k scale, garbage)
        ("ragged 1/37/4099 auto splits", 3, 12, 4099, 64, (1, 37, 4099), None, "bhtd", 1.0, False),
        ("ragged 1/37/4099 one split", 3, 12, 4099, 64, (1, 37, 4099), 1, "bhtd", 1.0, False),
        ("ragged D128 7 splits", 3, 16, 2053, 128, (2053, 1, 1000), 7, "bhtd", 1.0, False),
        ("odd D=80 ragged", 2, 4, 1500, 80, (1500, 3), None, "bhtd", 1.0, False),
        ("odd D=33 ragged", 2, 4, 1500, 33, (77, 1500), None, "bhtd", 1.0, False),
        ("long 1x12x65536 D64", 1, 12, 65536, 64, (65536,), None, "bhtd", 1.0, False),
        ("BTHD cache layout", 4, 12, 3000, 64, (3000, 2999, 1, 1234), None, "bthd", 1.0, False),
        ("large logits (~1e4)", 2, 12, 4096, 64, (4096, 100), None, "bhtd", 100.0, False),
        ("NaN past each length", 3, 12, 4096, 128, (1, 37, 2500), None, "bhtd", 1.0, True),
    ]
    rows = []
    for dtype in dtypes:
        tol = TOL[dtype]
        for name, B, H, T, D, lens, splits, layout, scale, garbage in cases:
            gen = torch.Generator(device=device).manual_seed(T + D)
            q = _randn((B, H, 1, D), gen, dtype, device, scale)
            if layout == "bthd":
                k = _randn((B, T, H, D), gen, dtype, device, scale).transpose(1, 2)
                v = _randn((B, T, H, D), gen, dtype, device).transpose(1, 2)
            else:
                k = _randn((B, H, T, D), gen, dtype, device, scale)
                v = _randn((B, H, T, D), gen, dtype, device)
            seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
            ref = reference.decode_attention(q.double(), k.double(), v.double(), seqlens, softmax_scale=D**-0.5)
            if garbage:
                for b, n in enumerate(lens):
                    k[b, :, n:] = float("nan")
                    v[b, :, n:] = float("nan")
            out = fwd(q, k, v, seqlens, softmax_scale=D**-0.5, num_splits=splits)
            err = float(((out.double() - ref).abs() / (1 + ref.abs())).max())  # NaN stays NaN: not ok
            rows.append({"op": OP, "case": name, "dtype": str(dtype).replace("torch.", ""),
                         "max_err": err, "tol": tol, "ok": bool(err <= tol)})
            del q, k, v, ref, out
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------- run
def _shapes(quick: bool):
    """(B, Tmax, len, D, H) to time."""
    if quick:
        return [(B, T, T, D, H) for B, T, D, H in QUICK]
    out = [(B, T, T, D, H) for D, H in D_H for B in B_ALL for T in T_ALL]
    return out + [(1, 32768, 8192, 128, 16)]


def _inputs(B, Tmax, D, H, dtype, device, copies):
    gen = torch.Generator(device=device).manual_seed(B * Tmax + D)
    return [(_randn((B, H, 1, D), gen, dtype, device), _randn((B, H, Tmax, D), gen, dtype, device),
             _randn((B, H, Tmax, D), gen, dtype, device)) for _ in range(copies)]


def run(device, dtypes, quick: bool, ceilings) -> list[dict]:
    device = require_cuda(device, "bench_decode_attention")
    fwd = _launcher()
    timing = dict(warmup_ms=10, rep_ms=30) if quick else dict(warmup_ms=25, rep_ms=100)
    rows = []
    for dtype in dtypes:
        elt = torch.empty((), dtype=dtype).element_size()
        for B, Tmax, L, D, H in _shapes(quick):
            cache_bytes = 2 * B * H * Tmax * D * elt
            if cache_bytes > _MAX_BYTES:
                continue
            nbytes = 2 * B * H * L * D * elt  # K and V positions actually read
            copies = max(1, min(16, -(-2 * L2_BYTES // nbytes)))
            sets = _inputs(B, Tmax, D, H, dtype, device, copies)
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            scale = D**-0.5
            ours = [lambda q=q, k=k, v=v: fwd(q, k, v, lens, softmax_scale=scale) for q, k, v in sets]
            peer = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], scale=scale)
                    for q, k, v in sets]
            ours_ms, how = time_per_call(ours, timing)
            peer_ms, peer_how = time_per_call(peer, timing)
            shape = f"B={B} H={H} len={L} Tmax={Tmax} D={D}"
            row = timing_row(OP, shape, dtype, ours_ms, "F.sdpa (sliced cache)", peer_ms, nbytes, "GB/s", ceilings)
            row["timing"] = how if how == peer_how else f"ours {how}, peer {peer_how}"
            rows.append(row)
            del sets, ours, peer
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # run() and check() need no pytest
    pytest = None

if pytest is not None:
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("B,T,D,H", QUICK)
    def test_decode_attention_fwd(benchmark, B, T, D, H, dtype):
        fwd = _launcher()
        q, k, v = _inputs(B, T, D, H, dtype, "cuda", 1)[0]
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")

        def call():
            fwd(q, k, v, lens, softmax_scale=D**-0.5)
            torch.cuda.synchronize()

        benchmark(call)

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_check_all_rows_ok(dtype):
        bad = [r for r in check("cuda", [dtype]) if not r["ok"]]
        assert not bad, bad
