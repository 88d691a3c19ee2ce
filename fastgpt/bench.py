"""``fastgpt bench [kernels|generate|train|all]``: how fast the fused ops, generation and training are.

    fastgpt bench --quick                          # both suites, small sizes; a table on stdout
    fastgpt bench kernels --dtype bfloat16,float16 --json results.json --plot plots/

kernels:  on CUDA, each op's suite (benchmarks/bench_<op>.py) times the Triton kernel against its peers.
          On a CPU the Triton kernels do not run (only Triton's interpreter does, whose timings mean
          nothing), so the public ops are timed on their CPU path, kernels.reference, at small shapes,
          against the same peers, and labelled as such.
generate: benchmarks/bench_generate.py, prefill and decode tokens/s against transformers.
parallel: benchmarks/bench_parallel.py, tensor-parallel decode and data-parallel training, one process per
          rank (2 on a CPU, where the numbers are about correctness, not speed; every GPU on CUDA). Not part
          of `all`: it launches jobs of its own.
engine:   benchmarks/bench_engine.py, many random requests through the engine against transformers'
          continuous batching and static batches (not part of `all`: it runs for many minutes on a CPU).
train:    benchmarks/bench_train.py, a training step's tokens/s and peak memory: fused kernels against the
          PyTorch reference path and transformers. Not part of `all`: gpt2-sized steps take minutes.
Every run first measures the device's ceilings (copy bandwidth; matmul throughput on CUDA) so that each
rate is also shown as a percentage of what this machine can do. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

KERNEL_OPS = ("attention", "decode_attention", "paged_attention", "layer_norm", "gelu_mlp",
              "cross_entropy")  # benchmarks/bench_<op>.py
CPU_LABEL = "CPU reference path (PyTorch), not Triton kernel results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default="all", choices=["kernels", "generate", "parallel", "engine", "train", "all"],
                   help="what to time (default: all = kernels + generate)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None,
                   help="comma-separated float32, float16, bfloat16 (default: bfloat16 on CUDA, float32 on CPU); "
                        "generation uses the first")
    p.add_argument("--quick", action="store_true", help="fewer, smaller sizes (gpt2 batch 1 + a tiny model on CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiniest sizes and one repetition: checks the plumbing, the numbers mean nothing")
    p.add_argument("--model", default=None,
                   help="local GPT-2 checkpoint dir for the generate suite (default: gpt2- and gpt2-xl-shaped "
                        "models with random weights)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: its own choice); 1 gives steadier numbers on a "
                        "machine shared with other work")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="DIR", default=None, help="also write PNG plots (one per op) into DIR")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_dtypes(text: str | None, device) -> list:
    import torch

    from fastgpt.load import parse_dtype

    if text is None:
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--dtype: no dtype given")
    try:
        return list(dict.fromkeys(parse_dtype(n) for n in names))
    except ValueError as e:
        raise ValueError(f"--dtype: {e}") from None


def _check_outputs(args) -> None:
    """Fail before minutes of timing, not after, when an output cannot be written."""
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--json {args.json}: directory {parent} does not exist")
        if os.path.isdir(args.json):
            raise IsADirectoryError(f"--json {args.json}: is a directory; give a file path")
    if args.plot is not None:
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise NotADirectoryError(f"--plot {args.plot}: exists and is not a directory")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'fastgpt[bench]')") from None


# --------------------------------------------------------------------------------------------- kernels
def run_kernel_suites(device, dtypes, quick: bool, ceilings: dict, notes: list[str], errors: list[str]) -> list[dict]:
    """Each op's suite run() on this device. A suite that is missing is a 'not available' note; one that
    fails is reported in errors and the others still run."""
    rows = []
    for op in KERNEL_OPS:
        module = f"benchmarks.bench_{op}"
        _log(f"kernels: {op}")
        try:
            suite = importlib.import_module(module)
        except ModuleNotFoundError as e:
            notes.append(f"{op}: not available (cannot import {e.name}; benchmarks/bench_{op}.py or its kernel "
                         "is not there)")
            _log(f"kernels: {op}: not available")
            continue
        try:
            got = suite.run(device, dtypes, quick, ceilings)
        except Exception as e:  # one broken suite must not hide the others' results
            msg = f"{op}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            errors.append(msg)
            _log(f"kernels: {msg}")
            continue
        rows += [{"kind": "kernel", "backend": "triton", **r} for r in got]
    return rows


def cpu_reference_rows(dtypes, quick: bool, smoke: bool, ceilings: dict, notes: list[str]) -> list[dict]:
    """The public ops on their CPU path (kernels.reference, plain PyTorch) against the peers the GPU suites
    use. The ops and the peers are mostly the same PyTorch calls here, so speedups near 1x are expected:
    these numbers show what the CPU path of the model costs, nothing about the Triton kernels."""
    import torch
    import torch.nn.functional as F

    import kernels
    from benchmarks.common import bench_ms, timing_row

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 would send CPU ops through Triton's interpreter")
    timing = dict(rep_ms=1.0, min_reps=1) if smoke else dict(rep_ms=50.0 if quick else 200.0)
    g = torch.Generator().manual_seed(0)
    rows = []

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    def paged(dense, bs=16):
        """dense (B, H, T, D) -> the same positions as pages (B * nb, bs, H, D) and a table (B, nb)."""
        B, H, T, D = dense.shape
        nb = -(-T // bs)
        pages = F.pad(dense, (0, 0, 0, nb * bs - T)).transpose(1, 2).reshape(B * nb, bs, H, D).contiguous()
        return pages, torch.arange(B * nb, dtype=torch.int32).view(B, nb)

    def add(op, shape, dtype, ours, peers, work, unit):
        ours_ms = bench_ms(ours, **timing)
        for peer_name, peer in peers:
            peer_ms = bench_ms(peer, **timing)
            rows.append({"kind": "kernel", "backend": "cpu-reference",
                         **timing_row(op, shape, dtype, ours_ms, peer_name, peer_ms, work, unit, ceilings)})

    if smoke:
        attn_shapes, decode_shapes, write_shapes = [(1, 2, 33, 64)], [(1, 2, 64, 64, 37)], [(8, 2, 64)]
        ln_shapes, mlp_shapes = [(37, 768)], [(9, 64)]
    elif quick:
        attn_shapes = [(1, 12, 128, 64), (1, 12, 512, 64)]
        decode_shapes = [(1, 12, 1024, 64, 256), (8, 12, 1024, 64, 1000)]
        write_shapes = [(64, 12, 64), (1024, 12, 64)]
        ln_shapes = [(512, 768), (2048, 1600)]
        mlp_shapes = [(64, 768), (512, 768)]
    else:
        attn_shapes = [(1, 12, 128, 64), (1, 12, 512, 64), (4, 12, 1024, 64), (1, 25, 1024, 64)]
        decode_shapes = [(1, 12, 1024, 64, 256), (8, 12, 1024, 64, 1000), (1, 25, 1024, 64, 1024)]
        write_shapes = [(64, 12, 64), (1024, 12, 64), (4096, 25, 64)]
        ln_shapes = [(512, 768), (2048, 1600), (8192, 1600)]
        mlp_shapes = [(64, 768), (512, 768), (128, 1600)]
    compile_mlp = not (quick or smoke)
    if not compile_mlp:
        notes.append("gelu_mlp vs torch.compile skipped on CPU with --quick/--smoke (compiling takes longer "
                     "than the whole run)")

    with torch.inference_mode():
        for dtype in dtypes:
            elt = torch.empty((), dtype=dtype).element_size()
            for B, H, T, D in attn_shapes:
                _log(f"kernels (CPU reference): attention {B}x{H}x{T}x{D} {dtype}")
                q, k, v = (randn(B, H, T, D, dtype=dtype) for _ in range(3))
                flops = 4 * B * H * D * T * (T + 1) / 2  # QK^T and PV over the causal half (diagonal included)
                add("attention", f"B={B} H={H} T={T} D={D}", dtype,
                    lambda: kernels.flash_attention(q, k, v, causal=True),
                    [("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))],
                    flops, "TFLOP/s")
                (kp, table), (vp, _) = paged(k), paged(v)
                qp = q.transpose(1, 2).reshape(B * T, H, D)  # packed, sequence after sequence
                cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
                lens = torch.full((B,), T, dtype=torch.int32)
                add("paged_prefill_attention", f"B={B} H={H} T={T} D={D} bs16", dtype,
                    lambda: kernels.paged_prefill_attention(qp, kp, vp, table, cu, lens),
                    [("flash_attention (dense)", lambda: kernels.flash_attention(q, k, v, causal=True))],
                    flops, "TFLOP/s")
            for B, H, Tmax, D, L in decode_shapes:
                _log(f"kernels (CPU reference): decode_attention {B}x{H} len {L}/{Tmax} {dtype}")
                q = randn(B, H, 1, D, dtype=dtype)
                kc, vc = randn(B, H, Tmax, D, dtype=dtype), randn(B, H, Tmax, D, dtype=dtype)
                lens = torch.full((B,), L, dtype=torch.int32)
                nbytes = (2 * B * H * L * D + 2 * B * H * D) * elt  # valid K and V, plus q in and o out
                add("decode_attention", f"B={B} H={H} len={L} Tmax={Tmax} D={D}", dtype,
                    lambda: kernels.decode_attention(q, kc, vc, lens),
                    [("torch SDPA, sliced cache",
                      lambda: F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L]))],
                    nbytes, "GB/s")
                (kp, table), (vp, _) = paged(kc), paged(vc)
                add("paged_decode_attention", f"B={B} H={H} len={L} Tmax={Tmax} D={D} bs16", dtype,
                    lambda: kernels.paged_decode_attention(q, kp, vp, table, lens),
                    [("decode_attention (dense cache)", lambda: kernels.decode_attention(q, kc, vc, lens))],
                    nbytes, "GB/s")
            for N, H, D in write_shapes:
                _log(f"kernels (CPU reference): paged_kv_write {N}x{H}x{D} {dtype}")
                qkv = randn(N, 3, H, D, dtype=dtype)
                kp, vp = randn(4 * N, 16, H, D, dtype=dtype), randn(4 * N, 16, H, D, dtype=dtype)
                slots = torch.randperm(64 * N, generator=g)[:N]

                def indexed(qkv=qkv, kp=kp, vp=vp, slots=slots, H=H, D=D):
                    kp.view(-1, H, D).index_copy_(0, slots, qkv[:, 1])
                    vp.view(-1, H, D).index_copy_(0, slots, qkv[:, 2])

                add("paged_kv_write", f"N={N} H={H} D={D} fused-qkv views", dtype,
                    lambda: kernels.paged_kv_write(qkv[:, 1], qkv[:, 2], kp, vp, slots),
                    [("index_copy_ (no padding)", indexed)], 4 * N * H * D * elt, "GB/s")
            for M, N in ln_shapes:
                _log(f"kernels (CPU reference): layer_norm {M}x{N} {dtype}")
                x, r = randn(M, N, dtype=dtype), randn(M, N, dtype=dtype)
                w, b = randn(N, dtype=dtype), randn(N, dtype=dtype)
                add("layer_norm", f"M={M} N={N} +residual", dtype,
                    lambda: kernels.layer_norm(x, w, b, residual=r),
                    [("F.layer_norm + add", lambda: F.layer_norm(x + r, (N,), w, b))],
                    4 * M * N * elt, "GB/s")  # read x and residual, write y and the sum h
            for M, C in mlp_shapes:
                _log(f"kernels (CPU reference): gelu_mlp {M}x{C} {dtype}")
                x, r = randn(M, C, dtype=dtype), randn(M, C, dtype=dtype)
                w1, b1 = randn(4 * C, C, dtype=dtype) * C**-0.5, randn(4 * C, dtype=dtype)
                w2, b2 = randn(C, 4 * C, dtype=dtype) * (4 * C) ** -0.5, randn(C, dtype=dtype)

                def eager(x, w1, b1, w2, b2, r):
                    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + r

                peers = [("eager PyTorch", lambda: eager(x, w1, b1, w2, b2, r))]
                if compile_mlp:
                    try:
                        compiled = torch.compile(eager)
                        compiled(x, w1, b1, w2, b2, r)  # compile outside the timing
                        peers.append(("torch.compile", lambda: compiled(x, w1, b1, w2, b2, r)))
                    except Exception as e:
                        notes.append(f"gelu_mlp: torch.compile unavailable here ({type(e).__name__})")
                add("gelu_mlp", f"M={M} C={C} F={4 * C} +residual", dtype,
                    lambda: kernels.gelu_mlp(x, w1, b1, w2, b2, residual=r), peers,
                    16 * M * C * C, "TFLOP/s")  # two GEMMs of 2*M*C*4C FLOPs
    from benchmarks import bench_cross_entropy

    _log("kernels (CPU reference): cross_entropy")
    rows += bench_cross_entropy.cpu_rows(dtypes, quick, smoke, ceilings)  # forward + backward, needs autograd
    return rows


# ------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    # On a CPU the public ops must take the reference path: the interpreter's timings mean nothing. The
    # ops read the variable at call time; it is restored afterwards for callers that share the process.
    import torch

    previous = os.environ.get("TRITON_INTERPRET")
    previous_threads = torch.get_num_threads()  # --threads too is undone when the run ends
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        if args.suite == "engine":
            return _run_engine(args)
        return _run(args, interpreter_was_on=previous == "1")
    finally:
        torch.set_num_threads(previous_threads)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _run_engine(args) -> int:
    from benchmarks import bench_engine
    from fastgpt.cli import resolve_device

    argv = ["--device", str(resolve_device(args.device))] + (["--quick"] if args.quick else [])
    if args.model is not None:
        argv += ["--model", args.model]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.json is not None:
        argv += ["--json", args.json]
    if args.plot is not None:
        argv += ["--plot", args.plot]
    return bench_engine.main(argv)


def _run(args, interpreter_was_on: bool) -> int:
    import torch

    from benchmarks import bench_generate, report
    from benchmarks.common import measure_ceilings
    from fastgpt.cli import resolve_device

    device = resolve_device(args.device)
    dtypes = parse_dtypes(args.dtype, device)
    _check_outputs(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and interpreter_was_on and "triton" in sys.modules:
        raise ValueError("TRITON_INTERPRET=1 was set when Triton was imported: the kernels would run in the "
                         "interpreter and their timings would mean nothing; unset it")
    if args.model is not None and not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: not a local checkpoint directory")
    if device.type == "cuda":
        torch.cuda.init()  # benchmarks.common times with do_bench once CUDA is initialised

    doc = report.environment(device)
    _log(f"{doc['device_name']}: measuring ceilings")
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    notes: list[str] = []
    errors: list[str] = []
    doc["kernel_label"] = None
    if args.suite in ("kernels", "all"):
        if device.type == "cuda":
            doc["kernel_label"] = f"Triton kernels on {doc['device_name']}"
            rows += run_kernel_suites(device, dtypes, args.quick, ceilings, notes, errors)
        else:
            doc["kernel_label"] = CPU_LABEL
            rows += cpu_reference_rows(dtypes, args.quick, args.smoke, ceilings, notes)
    if args.suite in ("generate", "all"):
        plan = bench_generate.make_plan(device, args.quick, args.smoke, args.model)
        rows += bench_generate.run(device, dtypes[0], plan, ceilings, notes, errors)
        if device.type == "cpu":
            notes.append("generation on CPU runs the model's reference path (PyTorch ops), not Triton kernels")
    if args.suite == "parallel":
        from benchmarks import bench_parallel

        rows += bench_parallel.run(device, dtypes[0], args.quick, args.smoke, notes, errors)
        errors += [f"parallel: {r['model']}: logits off by {r['max_err']:.2e} (tolerance {r['tol']:.0e})"
                   for r in rows if r["kind"] == "parity" and not r["ok"]]
    if args.suite == "train":
        from benchmarks import bench_train

        train_rows = bench_train.run(device, dtypes[0], args.quick, args.smoke, ceilings, notes, errors)
        rows += train_rows + bench_train.goals(train_rows)
    doc.update({
        "settings": {"suite": args.suite, "quick": bool(args.quick), "smoke": bool(args.smoke),
                     "dtypes": [str(d).replace("torch.", "") for d in dtypes], "model": args.model,
                     "cpu_threads": torch.get_num_threads()},
        "ceilings": ceilings,
        "rows": rows,
        "notes": notes + errors,
        "errors": errors,
    })
    if doc["kernel_label"] is None:
        doc.pop("kernel_label")
    sys.stdout.write(report.render(doc))
    sys.stdout.flush()
    if args.json is not None:
        report.write_json(args.json, doc)
        _log(f"wrote {args.json}")
    if args.plot is not None:
        for path in report.plot(rows, args.plot, title_suffix=f" ({doc['device_name']})"):
            _log(f"wrote {path}")
    return 1 if errors else 0
