"""``fastgpt bench [SUITE|all]``: how fast the fused ops and generation are, here and now.

    fastgpt bench --quick                          # the suites of `all`, small sizes; a table on stdout
    fastgpt bench kernels --dtype bfloat16,float16 --json results.json --plot plots/

The subcommand lives here, beside the suites it runs, so that the dependency points one way: benchmarks
imports fastgpt, and fastgpt's core never imports benchmarks (fastgpt/cli.py names this module as a string
and imports it only when ``fastgpt bench`` is run). A suite is a module with
``run_suite(ctx: SuiteContext) -> list[dict]`` (benchmarks/common.py); adding one is a line in SUITES.
Every run first measures the device's ceilings (copy bandwidth; matmul throughput on CUDA) so that each
rate is also shown as a percentage of what this machine can do. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module with run_suite(ctx), help, whether `fastgpt bench all` runs it); `all` keeps this order.
# A new suite is one line here.
SUITES = {
    "kernels": ("benchmarks.bench_kernels", "each fused op against its peers (Triton on CUDA, the CPU path on a CPU)",
                True),
    "generate": ("benchmarks.bench_generate", "prefill and decode tokens/s against transformers, and the floor",
                 True),
    "parallel": ("benchmarks.bench_parallel", "tensor-parallel decode and data-parallel training, one process per "
                 "rank (launches jobs of its own: not in all)", False),
    "engine": ("benchmarks.bench_engine", "random requests through the engine against transformers' continuous "
               "batching and static batches (many minutes on a CPU: not in all)", False),
    "patch": ("benchmarks.bench_patch", "a transformers GPT-2 patched by fastgpt against unpatched (SDPA): prefill, "
              "decode, a training step, compiled rows outside --quick on a CPU", True),
    "serve": ("benchmarks.bench_serve", "fastgpt serve (a real server process) against the offline engine and "
              "transformers serve, all requests at once (starts servers: not in all)", False),
    "train": ("benchmarks.bench_train", "a training step's tokens/s and peak memory against the reference path "
              "and transformers (gpt2-sized steps take minutes: not in all)", False),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"],
                   help="what to time (default: all): " + "; ".join(f"{k}: {h}" for k, (_, h, _) in SUITES.items()))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None,
                   help="comma-separated float32, float16, bfloat16 (default: bfloat16 on CUDA, float32 on CPU); "
                        "suites that run a whole model use the first")
    p.add_argument("--quick", action="store_true", help="fewer, smaller sizes (gpt2 batch 1 + a tiny model on CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiniest sizes and one repetition: checks the plumbing, the numbers mean nothing")
    p.add_argument("--model", default=None,
                   help="local GPT-2 checkpoint dir for the suites that run a model (default: gpt2- and "
                        "gpt2-xl-shaped models with random weights)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: its own choice); 1 gives steadier numbers on a "
                        "machine shared with other work")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="DIR", default=None, help="also write PNG plots into DIR")


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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


def run_suites(names, ctx) -> list[dict]:
    """Each named suite's rows. A suite whose module is missing is a 'not available' note; one that fails
    is reported in ctx.errors, and the next suite still runs."""
    rows = []
    for name in names:
        module = SUITES[name][0]
        try:
            suite = importlib.import_module(module)
        except ModuleNotFoundError as e:
            ctx.notes.append(f"suite {name}: not available (cannot import {e.name})")
            _log(ctx.notes[-1])
            continue
        try:
            rows += suite.run_suite(ctx)
        except Exception as e:  # one broken suite must not hide the others' results
            ctx.errors.append(f"suite {name}: FAILED: {_first_line(e)}")
            _log(ctx.errors[-1])
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
        return _run(args, interpreter_was_on=previous == "1")
    finally:
        torch.set_num_threads(previous_threads)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _run(args, interpreter_was_on: bool) -> int:
    import torch

    from benchmarks import report
    from benchmarks.common import SuiteContext, measure_ceilings
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
    ctx = SuiteContext(device=device, dtypes=dtypes, quick=bool(args.quick), smoke=bool(args.smoke),
                       model=args.model, ceilings=measure_ceilings(device), doc=doc)
    names = [name for name, (_, _, in_all) in SUITES.items() if in_all] if args.suite == "all" else [args.suite]
    rows = run_suites(names, ctx)
    doc.update({
        "settings": {"suite": args.suite, "quick": ctx.quick, "smoke": ctx.smoke,
                     "dtypes": [str(d).replace("torch.", "") for d in dtypes], "model": args.model,
                     "cpu_threads": torch.get_num_threads()},
        "ceilings": ctx.ceilings,
        "rows": rows,
        "notes": ctx.notes + ctx.errors,
        "errors": ctx.errors,
    })
    sys.stdout.write(report.render(doc))
    sys.stdout.flush()
    if args.json is not None:
        report.write_json(args.json, doc)
        _log(f"wrote {args.json}")
    if args.plot is not None:
        for path in report.plot(doc, args.plot):
            _log(f"wrote {path}")
    return 1 if ctx.errors else 0
