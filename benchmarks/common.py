"""Shared timing and ceiling helpers for the benchmark suites.

Every op suite ``benchmarks/bench_<op>.py`` exposes
    check(device, dtypes) -> list[dict]   correctness rows: op, case, dtype, max_err, tol, ok
    run(device, dtypes, quick, ceilings) -> list[dict]   timing rows made by ``timing_row``
and pytest-benchmark tests (``pytest benchmarks/bench_<op>.py``) that skip cleanly without CUDA.
A suite of ``fastgpt bench`` (registered in benchmarks/cli.py: kernels, generate, ...) is a module with
    run_suite(ctx: SuiteContext) -> list[dict]   rows for benchmarks.report, each with a "kind"
``fastgpt bench`` and ``benchmarks/gpu_check.py`` compose those functions.

Speed numbers are medians: ``triton.testing.do_bench`` on CUDA (it warms up and flushes L2 between
runs), a perf_counter loop on CPU. Ceilings are measured on the same device in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SuiteContext:
    """What ``fastgpt bench`` hands each suite: the options of the run and the places to report into.

    A suite appends to notes what a reader of the results must know (a peer that is missing, a size that
    was skipped) and to errors what failed (the run then exits 1); it may set header fields of the
    results document in doc (e.g. "kernel_label")."""
    device: torch.device
    dtypes: list  # the --dtype list; suites that run one model use dtypes[0]
    quick: bool = False
    smoke: bool = False  # the tiniest sizes, one repetition: plumbing only
    model: str | None = None  # --model: a local checkpoint for suites that run a whole model
    ceilings: dict = field(default_factory=dict)  # measure_ceilings(device), taken at the start of the run
    notes: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    doc: dict = field(default_factory=dict)


def bench_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (allocations, lazy init)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled_row(model: str, phase: str, shape: str, dtype, eager, timing: dict, tokens: int) -> dict:
    """torch.compile(fullgraph=True) of the no-argument callable `eager` against eager, same run: a row of
    kind "compiled" (ms each, the speedup, the seconds the first compiled call took: compilation)."""
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True)
    t0 = time.perf_counter()
    compiled()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    eager_ms, compiled_ms = bench_ms(eager, **timing), bench_ms(compiled, **timing)
    torch._dynamo.reset()
    return {"kind": "compiled", "model": model, "phase": phase, "shape": shape,
            "dtype": str(dtype).replace("torch.", ""), "eager_ms": eager_ms, "compiled_ms": compiled_ms,
            "speedup": eager_ms / compiled_ms if compiled_ms else None, "compile_s": compile_s,
            "compiled_tok_s": tokens / (compiled_ms * 1e-3) if compiled_ms else None}


def copy_bandwidth_gbs(device: str | torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read + written (the roofline for memory-bound ops)."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: str | torch.device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul throughput (TFLOP/s) of an n x n x n product in dtype (the compute roofline)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_ceilings(device: str | torch.device) -> dict:
    """Ceilings for this run: copy GB/s always; bf16 matmul TFLOP/s on CUDA only."""
    device = torch.device(device)
    out = {"copy_gbs": copy_bandwidth_gbs(device)}
    if device.type == "cuda":
        out["matmul_tflops"] = matmul_tflops(device)
    return out


def timing_row(op: str, shape: str, dtype, ours_ms: float, peer: str, peer_ms: float | None,
               work: float, unit: str, ceilings: dict | None) -> dict:
    """One result row. work is FLOPs (unit "TFLOP/s") or bytes moved (unit "GB/s") per call."""
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    achieved = work / (ours_ms * 1e-3) / scale
    ceiling = None
    if ceilings:
        ceiling = ceilings.get("matmul_tflops") if unit == "TFLOP/s" else ceilings.get("copy_gbs")
    return {
        "op": op,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": ours_ms,
        "peer": peer,
        "peer_ms": peer_ms,
        "speedup": (peer_ms / ours_ms) if peer_ms else None,
        "achieved": achieved,
        "unit": unit,
        "pct_ceiling": (100.0 * achieved / ceiling) if ceiling else None,
    }


# Inputs rotated through in one timed replay should exceed the L2 of the GPUs this targets (H100/H200:
# 50 MB), so each call reads from HBM as it would inside a model.
L2_BYTES = 64 << 20


def require_cuda(device, suite: str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{suite} times the Triton kernel and needs a CUDA device, got {device}")
    return device


def graphed(calls):
    """One callable replaying all `calls` from a CUDA graph (None when capture fails)."""
    try:
        for c in calls:  # compile / warm up outside the capture
            c()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        return graph.replay
    except Exception:
        return None


def time_per_call(calls, timing: dict) -> tuple[float, str]:
    """(median ms per call, how it was timed): a CUDA-graph replay of all calls divided by their number
    (launch overhead amortised, as in a captured decode step), or plain calls when capture fails."""
    replay = graphed(calls)
    if replay is not None:
        return bench_ms(replay, **timing) / len(calls), f"graph x{len(calls)}"
    return bench_ms(calls[0], **timing), "eager"


def grad_check_row(op: str, case: str, dtype, ours, peer, tensors: dict, factor: float = 3.0) -> dict:
    """A correctness row for a backward: ours(**tensors) and peer(**tensors) (PyTorch's autograd in the same
    dtype) against peer(**float64 copies); each output gets the same seeded gradient (rounded to its dtype).
    Reported: the worst gradient's error (max |g - g64| / max |g64|) and its tolerance, factor x the peer's
    error on that gradient or one rounding of the dtype where the peer is exact (FlashAttention's rule)."""
    def grads(fn, upcast, out_dtypes=None):
        leaves = {k: (v.detach().double() if upcast else v.detach()).requires_grad_(v.requires_grad)
                  if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in tensors.items()}
        outs = fn(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(0)
        out_dtypes = out_dtypes or [o.dtype for o in outs]
        gs = [torch.randn(o.shape, generator=gen).to(o.device).to(dt).to(o.dtype) for o, dt in zip(outs, out_dtypes)]
        torch.autograd.backward(outs, gs)
        return {k: leaves[k].grad for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad}, \
            [o.dtype for o in outs]

    g_ours, out_dtypes = grads(ours, False)
    g_peer, _ = grads(peer, False, out_dtypes)
    g64, _ = grads(peer, True, out_dtypes)

    def err(a, ref):
        return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    floor = torch.finfo(dtype).eps / 2
    worst = max(g_ours, key=lambda k: err(g_ours[k], g64[k]) / max(factor * err(g_peer[k], g64[k]), floor))
    e, tol = err(g_ours[worst], g64[worst]), max(factor * err(g_peer[worst], g64[worst]), floor)
    return {"op": op, "case": f"{case} bwd (worst: d{worst})", "dtype": str(dtype).replace("torch.", ""),
            "max_err": e, "tol": tol, "ok": bool(e <= tol)}
