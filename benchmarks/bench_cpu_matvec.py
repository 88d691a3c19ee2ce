"""What streams gpt2's weights fastest on this CPU: every matrix-vector candidate, per weight shape, in GB/s.

A batch-1 decode step is a chain of matrix-vector products, one per weight, and each weight is read once
from memory (495 MB of fp32 for gpt2: more than any cache). So the speed of a step is set by how close each
product comes to the memory bandwidth. This script measures, for each weight shape of gpt2 (nn.Linear's
(out, in) notation: c_attn 2304x768, attn c_proj 768x768, c_fc 3072x768, mlp c_proj 768x3072, the tied
head 50257x768), the read rate of each way PyTorch offers to compute x @ W.T (+ b):

  * F.linear and torch.addmv on the weight stored (out, in), nn.Linear's layout, and stored (in, out),
    passed as a transposed view;
  * oneDNN's prepacked weights (torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise), and MKL's
    packed GEMM (torch.ops.mkl._mkl_reorder_linear_weight + _mkl_linear), where this torch build has them
    (looked up at run time; a candidate this build lacks is reported as such);
  * the product split across the intra-op threads (MKL runs each one-row product above on one thread,
    whatever the thread count): F.embedding_bag with a bag per thread (its weighted row sums are the same
    product), torch.bmm over blocks of the output rows of an (out, in) weight, and over slices of the
    input features of an (in, out) weight (split-K, the partial sums added after);
  * kernels.linear itself in both storage orders, which picks among these (on more than one thread
    split-K for (in, out), split rows for (out, in); else F.linear). GPT.use_cpu_decode_layout keeps
    mlp.c_proj (out, in) and the other four (in, out). And kernels.linear on a weight given a packed
    copy (kernels.prepack_linear_weight, as the engine does on CPU): oneDNN's for two rows and more,
    the splits at one row.

Each product rotates through enough copies of its weight (>= 3x the last-level cache) that every call reads
from DRAM, as inside a decode step; each candidate's output is checked against float64 first. Every call is
timed: the rate reported is the median over interleaved rounds of each round's median call, at 1 thread and
at 2 (torch.set_num_threads), each round also measuring the copy bandwidth (bytes read + written,
benchmarks.common's convention) and the read-only bandwidth (a sum), so every rate is also shown as a
fraction of what this machine streams in the same moment. The best single call is shown beside it: on a
machine shared with other work, where the medians move with the load (the load average is printed with
them), the fastest call is one that ran with the cores to itself.

With --rows M the same products take M rows at once (a decode batch): the rate is still the weight's bytes
over the time, now shared by M rows; the matrix-vector-only candidates drop out.

    python -m benchmarks.bench_cpu_matvec [--rounds 7] [--threads 1,2] [--rows 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kernels

GPT2_SHAPES = {  # (out, in) of nn.Linear
    "attn.c_attn": (2304, 768),
    "attn.c_proj": (768, 768),
    "mlp.c_fc": (3072, 768),
    "mlp.c_proj": (768, 3072),
    "lm_head (tied wte)": (50257, 768),
}
STREAM_BYTES = 96 << 20  # >= 3x the 32 MB L3 of the machine this was written on


def _mkldnn_packed(w, b):
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _mkl_packed(w, b):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, b, 1)


ONE_ROW_ONLY = ("addmv (out,in)", "addmv (in,out)", "embedding_bag/thread")  # matrix-vector products


def candidates() -> dict:
    """name -> factory(w (out, in), b (out,)) -> fn(x (M, in)) -> (M, out); those in ONE_ROW_ONLY take
    M = 1 only. Each factory makes its own storage of w (the layout it reads), so the timing includes
    nothing but the product. The split ones read the thread count when they are built, as
    kernels.linear does when it is called."""
    def linear_out_major(w, b):
        return lambda x: F.linear(x, w, b)

    def linear_in_major(w, b):
        wt = w.t().contiguous()  # (in, out) storage
        return lambda x: F.linear(x, wt.t(), b)

    def mv_out_major(w, b):
        return lambda x: torch.addmv(b, w, x[0])[None]

    def mv_in_major(w, b):
        wt = w.t().contiguous()
        return lambda x: torch.addmv(b, wt.t(), x[0])[None]

    def bags(w, b):
        wt = w.t().contiguous()  # (in, out): row i is what input feature i contributes
        idx = torch.arange(wt.shape[0])
        n_bags = torch.get_num_threads()
        offsets = torch.arange(n_bags) * wt.shape[0] // n_bags
        return lambda x: (F.embedding_bag(idx, wt, offsets, mode="sum", per_sample_weights=x[0]).sum(0) + b)[None]

    def bmm_split_k(w, b):
        wt = w.t().contiguous()
        s = math.gcd(torch.get_num_threads(), wt.shape[0])
        slices = wt.view(s, wt.shape[0] // s, wt.shape[1])  # (S, in / S, out)
        return lambda x: torch.bmm(x.view(x.shape[0], s, -1).transpose(0, 1), slices).sum(0) + b

    def bmm_split_rows(w, b):
        s = math.gcd(torch.get_num_threads(), w.shape[0])
        parts = w.view(s, w.shape[0] // s, w.shape[1])  # (S, out / S, in)
        return lambda x: (torch.bmm(x.expand(s, -1, -1), parts.transpose(1, 2))  # (S, M, out / S)
                          .transpose(0, 1).reshape(x.shape[0], -1) + b)

    def ours_in_major(w, b):
        wt = w.t().contiguous()
        return lambda x: kernels.linear(x, wt.t(), b)

    def ours_out_major(w, b):
        return lambda x: kernels.linear(x, w, b)

    def ours_prepacked(w, b):
        with torch.inference_mode(False):  # a tensor whose in-place updates are tracked (see prepack)
            weight = w.clone()  # its own tensor: the packed copy is kept per weight object
        if not kernels.prepack_linear_weight(weight):
            raise NotImplementedError("not packed: no oneDNN here, or under kernels.reference.PACK_MIN_WEIGHT")
        return lambda x: kernels.linear(x, weight, b)

    return {
        "F.linear (out,in)": linear_out_major,
        "F.linear (in,out)": linear_in_major,
        "addmv (out,in)": mv_out_major,
        "addmv (in,out)": mv_in_major,
        "mkldnn prepacked": _mkldnn_packed,
        "mkl packed sgemm": _mkl_packed,
        "embedding_bag/thread": bags,
        "bmm rows (out,in)": bmm_split_rows,
        "bmm split-K (in,out)": bmm_split_k,
        "kernels.linear (in,out)": ours_in_major,
        "kernels.linear (out,in)": ours_out_major,
        "kernels.linear prepacked": ours_prepacked,
    }


def _median_s(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _call_rates(calls, nbytes: int) -> list[float]:
    """GB/s of each call, one per copy of the weight (each call reads a copy the previous calls evicted)."""
    rates = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return rates


def build(out: int, inn: int, stream_bytes: int = STREAM_BYTES, seed: int = 0, rows: int = 1):
    """(bytes one call reads, {candidate: one call per copy of the weight, or why it is missing}).

    Copies of a random weight (>= stream_bytes in all) for each candidate; a candidate that this build
    lacks, or that computes a wrong answer, is kept with the reason instead."""
    g = torch.Generator().manual_seed(seed)
    n_copies = max(1, -(-stream_bytes // (out * inn * 4)))
    ws = [torch.randn(out, inn, generator=g) * inn**-0.5 for _ in range(n_copies)]
    b = torch.randn(out, generator=g) * 0.1
    x = torch.randn(rows, inn, generator=g)
    want = (x.double() @ ws[0].double().t() + b.double()).float()
    per = {}
    for name, factory in candidates().items():
        if rows > 1 and name in ONE_ROW_ONLY:
            per[name] = "one row only"
            continue
        try:
            fns = [factory(w, b) for w in ws]
            got = fns[0](x)
        except (RuntimeError, AttributeError, NotImplementedError) as e:
            per[name] = f"not available: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            continue
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            per[name] = f"wrong result (max err {(got - want).abs().max().item():.2e})"
            continue
        per[name] = [lambda f=f: f(x) for f in fns]
    return out * inn * 4, per


def measure(threads: list[int], rounds: int, shapes: dict = GPT2_SHAPES, stream_bytes: int = STREAM_BYTES,
            x_rows: int = 1) -> dict:
    """One shape at a time (every candidate keeps its own copies: ~1 GB per shape), rounds interleaving
    the thread counts and candidates, each round with its own copy and read bandwidth."""
    src = torch.randn(stream_bytes // 4)
    dst = torch.empty_like(src)
    previous = torch.get_num_threads()
    load_before = os.getloadavg()
    rows, bandwidth = [], {}
    try:
        with torch.inference_mode():
            for label, (out, inn) in shapes.items():
                nbytes, per = build(out, inn, stream_bytes, rows=x_rows)
                samples: dict = {}
                for _ in range(rounds):
                    for n in threads:
                        torch.set_num_threads(n)
                        samples.setdefault((n, "copy"), []).append(
                            2 * stream_bytes / _median_s(lambda: dst.copy_(src)) / 1e9)
                        samples.setdefault((n, "read"), []).append(stream_bytes / _median_s(src.sum) / 1e9)
                        for name, calls in per.items():
                            if not isinstance(calls, str):
                                rates = _call_rates(calls, nbytes)
                                samples.setdefault((n, name), []).append(statistics.median(rates))
                                samples.setdefault((n, name, "best"), []).append(max(rates))
                for n in threads:
                    copy, read = (statistics.median(samples[(n, k)]) for k in ("copy", "read"))
                    for kind, v in (("copy", copy), ("read", read)):
                        bandwidth.setdefault(f"{kind} GB/s, {n} thread(s)", []).append(v)
                    for name, calls in per.items():
                        got = samples.get((n, name))
                        gbs = statistics.median(got) if got else None
                        rows.append({"threads": n, "weight": label, "shape": f"{out}x{inn}", "candidate": name,
                                     "gbs": gbs, "best_gbs": max(samples[(n, name, "best")]) if got else None,
                                     "pct_copy": 100 * gbs / copy if gbs else None,
                                     "pct_read": 100 * gbs / read if gbs else None,
                                     "note": calls if isinstance(calls, str) else None})
                del per
    finally:
        torch.set_num_threads(previous)
    from benchmarks import report

    return {**report.environment("cpu"), "kind": "cpu_matvec", "x_rows": x_rows, "rounds": rounds,
            "threads": threads,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "bandwidth": {k: statistics.median(v) for k, v in bandwidth.items()}, "rows": rows}


def format_table(result: dict) -> str:
    lb, la = result["load_avg_before"], result["load_avg_after"]
    lines = [f"{result['device_name']}; torch {result['torch']}; {result['date']}; commit {result['git_commit']}",
             f"weight read rate per gpt2 weight shape, fp32, x ({result.get('x_rows', 1)}, in); "
             f"medians of {result['rounds']} "
             f"interleaved rounds (best in brackets); load average {lb[0]:.1f} before, {la[0]:.1f} after",
             "  " + "; ".join(f"{k} {v:.1f}" for k, v in result["bandwidth"].items())]
    names = list(dict.fromkeys(r["candidate"] for r in result["rows"]))
    labels = list(dict.fromkeys(r["weight"] for r in result["rows"]))
    for n in dict.fromkeys(r["threads"] for r in result["rows"]):
        lines.append(f"\n{n} thread(s): GB/s median (best), % of the read-only bandwidth of the same rounds")
        lines.append(f"  {'candidate':24}" + "".join(f"{label:>22}" for label in labels))
        for c in names:
            cells = []
            for label in labels:
                r = next(r for r in result["rows"] if r["threads"] == n and r["weight"] == label and r["candidate"] == c)
                cells.append(f"{r['gbs']:.1f} ({r['best_gbs']:.1f}) {r['pct_read']:.0f}%" if r["gbs"] else "n/a")
            lines.append(f"  {c:24}" + "".join(f"{cell:>22}" for cell in cells))
    notes = {(r["candidate"], r["note"]) for r in result["rows"] if r["note"]}
    lines += [f"  {c}: {note}" for c, note in sorted(notes)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_matvec", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported (default 7)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--rows", type=int, default=1,
                   help="rows of x: 1 is batch-1 decode, more a decode batch (default 1)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.rows < 1:
        p.error(f"--rows must be >= 1, got {args.rows}")
    result = measure(threads, args.rounds, x_rows=args.rows)
    print(format_table(result))
    if args.json:
        from fastgpt.load import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
