"""The fused linear cross-entropy (kernels/cross_entropy.py): right in every dtype, how fast, and how much
memory it saves against the materialised F.linear + F.cross_entropy.

    check(device, dtypes)                  -> rows op, case, dtype, max_err, tol, ok (loss and gradients)
    run(device, dtypes, quick, ceilings)   -> CUDA timing rows (forward + backward, TFLOP/s) and peak-memory rows
    cpu_rows(dtypes, quick, smoke, ceilings) -> the CPU path (chunked PyTorch) against the materialised one
    python -m benchmarks.bench_cross_entropy --memory [--n 8192 --v 50257 --c 768]   (CPU peak memory)

Work per call, forward + backward: three GEMMs of 2 N V C FLOPs (logits, dx, dW). The peer is what a
model without the fused head runs: logits = F.linear(x, W), F.cross_entropy(logits.float(), t), and
autograd's backward, in the same dtype (bf16 logits, the softmax in fp32, as under autocast).

Peak memory. On CUDA: torch.cuda.max_memory_allocated over forward + backward, minus what was allocated
before (the inputs). On a CPU the allocator cannot be asked, so each version runs in a fresh Python
process (Linux) and reports the growth of its resident set: the high-water mark of the RSS after forward
+ backward (/proc/self/status VmHWM, reset through /proc/self/clear_refs just before the call) minus the
RSS just before it (the inputs already in memory, VmRSS). (getrusage's ru_maxrss would not do: across
fork + exec it keeps the parent's peak.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, timing_row

OP = "cross_entropy"
V_GPT2, C_GPT2 = 50257, 768
N_ALL = (2048, 8192, 16384)
N_QUICK = (8192,)
CPU_SHAPES = {"smoke": [(64, 64, 512)], "quick": [(512, 256, 8192)], "full": [(512, 256, 8192), (2048, 256, 8192)]}


def _inputs(N, C, V, dtype, device, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    w = (2 * torch.randn(V, C, generator=g) / C**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, t.to(device)


def materialised(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def fused(x, w, t):
    import kernels

    return kernels.linear_cross_entropy(x, w, t)


def _fwd_bwd(fn, x, w, t):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, t)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _err(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- check
def check(device, dtypes) -> list[dict]:
    """Loss, dx and dW against the float64 materialised version, each within 3x the error of the
    materialised version in the same dtype (or one rounding of the dtype where that is exact)."""
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        if device.type != "cuda" and dtype == torch.bfloat16:
            continue  # bf16 dots do not interpret on a CPU
        for N, C, V in ((37, 64, 1000), (513, 768, V_GPT2), (2048, 768, V_GPT2)):
            x, w, t = _inputs(N, C, V, dtype, device)
            ours = _fwd_bwd(fused, x, w, t)
            peer = _fwd_bwd(materialised, x, w, t)
            truth = _fwd_bwd(materialised, x.double(), w.double(), t)
            floor = torch.finfo(dtype).eps / 2
            for what, a, p, r in zip(("loss", "dx", "dW"), ours, peer, truth):
                rows.append({"op": OP, "case": f"N={N} C={C} V={V} {what}", "dtype": str(dtype).replace("torch.", ""),
                             "max_err": _err(a, r), "tol": max(3 * _err(p, r), floor),
                             "ok": _err(a, r) <= max(3 * _err(p, r), floor)})
    return rows


# --------------------------------------------------------------------------------------------- run
def _peak_mb(fn, x, w, t, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _fwd_bwd(fn, x, w, t)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def memory_row(shape: str, dtype, ours_mb: float, peer_mb: float, method: str) -> dict:
    return {"kind": "memory", "op": OP, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "ours_mb": ours_mb, "peer": "F.linear + F.cross_entropy", "peer_mb": peer_mb,
            "ratio": ours_mb / peer_mb if peer_mb else None, "method": method}


def run(device, dtypes, quick: bool = False, ceilings: dict | None = None) -> list[dict]:
    """CUDA: forward + backward time at the gpt2 head (V = 50257, C = 768) for several token counts, and
    the peak memory of both versions at N = 8192."""
    device = torch.device(device)
    if device.type != "cuda":
        return []  # interpreter timings mean nothing; the CPU path is cpu_rows
    timing = dict(warmup_ms=10, rep_ms=50) if quick else dict(warmup_ms=25, rep_ms=200)
    rows = []
    for dtype in dtypes:
        for N in (N_QUICK if quick else N_ALL):
            x, w, t = _inputs(N, C_GPT2, V_GPT2, dtype, device)
            ours_ms = bench_ms(lambda: _fwd_bwd(fused, x, w, t), **timing)
            peer_ms = bench_ms(lambda: _fwd_bwd(materialised, x, w, t), **timing)
            rows.append(timing_row(OP, f"N={N} C={C_GPT2} V={V_GPT2} fwd+bwd", dtype, ours_ms,
                                   "F.linear + F.cross_entropy", peer_ms, 6 * N * V_GPT2 * C_GPT2, "TFLOP/s",
                                   ceilings))
            if N == 8192:
                rows.append(memory_row(f"N={N} C={C_GPT2} V={V_GPT2} fwd+bwd", dtype,
                                       _peak_mb(fused, x, w, t, device), _peak_mb(materialised, x, w, t, device),
                                       "torch.cuda.max_memory_allocated above the inputs"))
            del x, w, t
            torch.cuda.empty_cache()
    return rows


def cpu_rows(dtypes, quick: bool, smoke: bool, ceilings: dict) -> list[dict]:
    """The public op's CPU path (chunked PyTorch, no Triton) against the materialised version, forward +
    backward; what training on a CPU pays for its head."""
    timing = dict(rep_ms=1.0, min_reps=1) if smoke else dict(rep_ms=50.0 if quick else 200.0)
    shapes = CPU_SHAPES["smoke" if smoke else "quick" if quick else "full"]
    rows = []
    for dtype in dtypes:
        for N, C, V in shapes:
            x, w, t = _inputs(N, C, V, dtype, "cpu")
            ours_ms = bench_ms(lambda: _fwd_bwd(fused, x, w, t), **timing)
            peer_ms = bench_ms(lambda: _fwd_bwd(materialised, x, w, t), **timing)
            rows.append({"kind": "kernel", "backend": "cpu-reference",
                         **timing_row(OP, f"N={N} C={C} V={V} fwd+bwd", dtype, ours_ms, "F.linear + F.cross_entropy",
                                      peer_ms, 6 * N * V * C, "TFLOP/s", ceilings)})
    return rows


# -------------------------------------------------------------------------------- CPU peak memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(variant: str, N: int, V: int, C: int) -> None:
    """In a fresh process: inputs, then one forward + backward; prints the RSS growth as JSON."""
    x, w, t = _inputs(N, C, V, torch.float32, "cpu")
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the high-water mark below is the call's own
    _fwd_bwd(fused if variant == "fused" else materialised, x, w, t)
    peak = _status_kb("VmHWM")
    print(json.dumps({"variant": variant, "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024,
                      "growth_mb": (peak - before) / 1024}))


def cpu_memory(N: int = 8192, V: int = V_GPT2, C: int = C_GPT2) -> dict:
    """Peak memory growth of forward + backward, fused (the CPU chunked path) and materialised, each in
    its own process (TRITON_INTERPRET=0); the ratio fused / materialised."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = {}
    for variant in ("fused", "materialised"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_cross_entropy", "--memory-child", variant,
                               str(N), str(V), str(C)], capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed: {proc.stderr.strip()[-500:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["fused"]["growth_mb"] / out["materialised"]["growth_mb"]
    return out


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @cuda_only
    @pytest.mark.parametrize("impl", ["fused", "materialised"])
    def test_bench_gpt2_head(benchmark, impl):
        x, w, t = _inputs(8192, C_GPT2, V_GPT2, torch.bfloat16, "cuda")
        fn = fused if impl == "fused" else materialised

        def step():
            _fwd_bwd(fn, x, w, t)
            torch.cuda.synchronize()

        benchmark(step)

    @cuda_only
    def test_check_all_dtypes():
        bad = [r for r in check("cuda", (torch.float32, torch.float16, torch.bfloat16)) if not r["ok"]]
        assert not bad, bad


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cross_entropy", description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="CPU peak memory, fused vs materialised, in subprocesses")
    p.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "N", "V", "C"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=V_GPT2)
    p.add_argument("--c", type=int, default=C_GPT2)
    a = p.parse_args(argv)
    if a.memory_child:
        variant, N, V, C = a.memory_child
        _memory_child(variant, int(N), int(V), int(C))
        return 0
    if not a.memory:
        p.error("nothing to do: --memory (the GPU timings run through `fastgpt bench kernels`)")
    result = cpu_memory(a.n, a.v, a.c)
    for variant in ("fused", "materialised"):
        r = result[variant]
        print(f"{variant:>12}: RSS {r['rss_before_mb']:8.0f} MB before, peak {r['peak_rss_mb']:8.0f} MB, "
              f"growth {r['growth_mb']:8.0f} MB")
    print(f"fused / materialised peak growth: {result['ratio']:.3f} (N={a.n}, V={a.v}, C={a.c}, fp32, CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
