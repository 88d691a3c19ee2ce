"""The one-call GPU check: is every kernel right, and how fast is it, on this GPU?

    python -m benchmarks.gpu_check                  # on a CUDA machine; a few minutes on an H200
    python -m benchmarks.gpu_check --out DIR        # default: benchmarks/results/<date>-<gpu-name>/
    python -m benchmarks.gpu_check --device cpu --smoke --out /tmp/x   # dry run of the plumbing, no GPU

In order:
  1. correctness: every kernel x dtype (bfloat16, float16, float32) against its reference, through each
     suite's check() (benchmarks/bench_<op>.py);
  2. model-level parity: a GPT with random weights on the device in each dtype against the same model in
     float64 on the CPU reference path: whole-sequence logits, and one prefill + decode step;
  3. the quick kernel benchmark table (each suite's run(), bfloat16);
  4. end-to-end generation (benchmarks/bench_generate.py, quick plan);
  5. transformers' GPT-2 patched by fastgpt vs unpatched: parity, prefill, decode, training step
     (benchmarks/bench_patch.py);
  6. with more than one GPU only: tensor-parallel logits against one GPU, TP decode and DP training
     (benchmarks/bench_parallel.py, quick plan); skipped with a note otherwise;
  7. the engine (benchmarks/bench_engine.py gpu_rows): CUDA-graph replay against eager, gpt2 output
     tokens/s at 256 requests, and the CUDA-graph decode step at batch 1;
  8. serving: fastgpt serve on a gpt2-shaped model at 64 concurrent streams (benchmarks/bench_serve.py),
     its engine in a process of its own (spawned, so CUDA starts there, never in a forked child);
  9. a timed training step, gpt2 at 8 x 1024 in bf16 (benchmarks/bench_train.py): fused kernels against
     the PyTorch reference path and transformers, and the issue's goals (listed, not counted as checks).
The checks include every backward (flash_attention, layer_norm, gelu_mlp, linear_cross_entropy) in each dtype.
One op failing (its check raising, or its suite missing) is reported and the rest still runs.
Writes results.json, results.md and one PNG per op into the folder; exits 1 if any check failed, 2 on a
usage error (no CUDA without --device cpu).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before anything imports Triton (@triton.jit decides at definition time): an inherited
    # TRITON_INTERPRET=1 would run the GPU kernels in the interpreter. main() also sets it for the
    # duration of a call from inside another process (tests), and restores it.
    os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks import bench_engine, bench_generate, bench_patch, bench_train, report  # noqa: E402
from benchmarks.common import measure_ceilings  # noqa: E402

OPS = ("attention", "decode_attention", "paged_attention", "layer_norm", "gelu_mlp", "cross_entropy")
ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Model-level tolerance on the logits (max |error| / max |reference logit|): ten times the per-op
# tolerance of the dtype, because a few layers chain a dozen rounded ops along the residual stream.
PARITY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def _log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------- 1. checks
def run_checks(device, dtypes, ops=OPS) -> list[dict]:
    """Every op x dtype through its suite's check(); one dtype at a time, so a dtype that raises does not
    hide the others. A missing suite or a raising check becomes a failed row that says why."""
    rows = []
    for op in ops:
        try:
            suite = importlib.import_module(f"benchmarks.bench_{op}")
        except Exception as e:  # missing or broken: this op is unchecked, which is a failure here
            _log(f"check {op}: cannot import its suite ({_first_line(e)})")
            rows.append({"kind": "check", "op": op, "case": "suite not importable", "dtype": "-",
                         "max_err": None, "tol": None, "ok": False, "error": _first_line(e)})
            continue
        for dtype in dtypes:
            _log(f"check {op} {_dtype_name(dtype)}")
            try:
                got = suite.check(device, [dtype])
            except Exception as e:
                _log(f"check {op} {_dtype_name(dtype)}: raised {_first_line(e)}")
                rows.append({"kind": "check", "op": op, "case": "check() raised", "dtype": _dtype_name(dtype),
                             "max_err": None, "tol": None, "ok": False, "error": _first_line(e)})
                continue
            if not got:
                rows.append({"kind": "check", "op": op, "case": "check() returned no rows",
                             "dtype": _dtype_name(dtype), "max_err": None, "tol": None, "ok": False})
            for r in got:
                rows.append({**r, "kind": "check", "op": r.get("op", op),
                             "dtype": _dtype_name(r.get("dtype", dtype)), "ok": bool(r.get("ok"))})
    return rows


# ----------------------------------------------------------------------------------------- 2. parity
@torch.inference_mode()
def model_parity(device, dtypes, smoke: bool = False) -> list[dict]:
    """A GPT with random weights on device in each dtype against the same weights in float64 on the CPU
    reference path: the whole-sequence forward (flash attention) and a prefill + one decode step through
    the KV cache (decode attention), both checked."""
    from fastgpt.config import GPTConfig
    from fastgpt.generate import decode_one_token, prefill
    from fastgpt.model import GPT

    device = torch.device(device)
    shape = dict(n_layer=2, n_head=4, n_embd=128) if smoke else dict(n_layer=4, n_head=12, n_embd=768)
    label = f"GPT {shape['n_layer']}L {shape['n_embd']}C, random weights"
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**shape)).double().eval()
    g = torch.Generator().manual_seed(0)
    B, T = 2, 67  # an odd length, not a multiple of any block size
    ids = torch.randint(0, reference.config.vocab_size, (B, T), generator=g)
    next_tok = torch.randint(0, reference.config.vocab_size, (B,), generator=g)
    ref_full = reference(ids)
    ref_step = reference(torch.cat([ids, next_tok[:, None]], dim=1))[:, -1]
    scale = max(ref_full.abs().max().item(), ref_step.abs().max().item())

    rows = []
    for dtype in dtypes:
        _log(f"parity {label} {device} {_dtype_name(dtype)}")
        row = {"kind": "parity", "model": label, "device": str(device), "dtype": _dtype_name(dtype),
               "against": "same weights, CPU float64 reference path", "tol": PARITY_TOL[dtype]}
        try:
            model = copy.deepcopy(reference).to(device=device, dtype=dtype)
            full = model(ids.to(device)).double().cpu()
            model.setup_caches(max_batch=B, max_len=T + 1)
            prefill(model, ids.to(device))
            step = decode_one_token(model, next_tok.to(device), torch.tensor([T], device=device),
                                    torch.full((B,), T + 1, dtype=torch.int32, device=device)).double().cpu()
            err = max((full - ref_full).abs().max().item(), (step - ref_step).abs().max().item()) / scale
            agree = (full.argmax(-1) == ref_full.argmax(-1)).double().mean().item()
            row.update(max_err=err, argmax_agree=agree, ok=bool(err <= PARITY_TOL[dtype]))
            del model
        except Exception as e:
            _log(f"parity {_dtype_name(dtype)}: raised {_first_line(e)}")
            row.update(max_err=None, argmax_agree=None, ok=False, error=_first_line(e))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ main
def default_out_dir(device) -> str:
    date = datetime.date.today().isoformat()
    return os.path.join(report.REPO_ROOT, "benchmarks", "results", f"{date}-{report.slug(report.device_name(device))}")


def main(argv=None) -> int:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # CPU ops (the float64 reference, the dry run) take kernels.reference
    try:
        return _main(argv)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _main(argv) -> int:
    from benchmarks.bench_kernels import cpu_reference_rows, run_kernel_suites

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run of the plumbing")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<gpu>/)")
    p.add_argument("--smoke", action="store_true", help="the tiniest sizes (tests of this script)")
    p.add_argument("--no-hf-compile", action="store_true",
                   help="skip transformers' static cache + torch.compile peer (its compile takes a minute or more)")
    args = p.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"gpu_check: error: --device {args.device}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()  # benchmarks.common times with triton.testing.do_bench once CUDA is up
    out_dir = args.out or default_out_dir(device)
    os.makedirs(out_dir, exist_ok=True)

    started = time.perf_counter()
    section_s = {}
    doc = report.environment(device)
    _log(f"{doc['device_name']}: measuring ceilings")
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    notes: list[str] = []
    errors: list[str] = []

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            rows.extend(fn())
        except Exception as e:  # a section that dies is reported; the next one still runs
            errors.append(f"{name}: {_first_line(e)}")
            _log(f"{name}: FAILED {_first_line(e)}")
        section_s[name] = round(time.perf_counter() - t0, 1)

    if cuda:
        section("checks", lambda: run_checks(device, ALL_DTYPES))
    else:
        notes.append("dry run on CPU: the kernel checks need CUDA and were skipped")
    section("parity", lambda: model_parity(device, ALL_DTYPES if cuda else (torch.float32,), args.smoke))
    if cuda:
        doc["kernel_label"] = f"Triton kernels on {doc['device_name']} (quick)"
        section("kernels", lambda: run_kernel_suites(device, [torch.bfloat16], True, ceilings, notes, errors))
    else:
        doc["kernel_label"] = "CPU reference path (PyTorch), not Triton kernel results"
        section("kernels", lambda: cpu_reference_rows([torch.float32], True, args.smoke, ceilings, notes))
    gen_dtype = torch.bfloat16 if cuda else torch.float32
    plan = bench_generate.make_plan(device, quick=True, smoke=args.smoke)
    if args.no_hf_compile:
        plan.compile_pairs = set()
    section("generate", lambda: bench_generate.run(device, gen_dtype, plan, ceilings, notes, errors))
    section("patch", lambda: bench_patch.run(device, gen_dtype, quick=True, smoke=args.smoke, notes=notes))
    if cuda and torch.cuda.device_count() > 1:  # TP parity against one GPU, TP decode and DP training timings
        from benchmarks import bench_parallel

        section("parallel", lambda: bench_parallel.run(device, gen_dtype, True, args.smoke, notes, errors))
    else:
        notes.append(f"parallel: skipped, tensor parallelism needs more than one GPU "
                     f"(this machine has {torch.cuda.device_count() if cuda else 0})")
    section("engine", lambda: bench_engine.gpu_rows(device, args.smoke))

    def serve():
        from benchmarks import bench_serve  # needs the serve extra; without it this section fails alone

        serve_rows, serve_notes = bench_serve.gpu_check_section(device, args.smoke, log=_log)
        notes.extend(serve_notes)
        return serve_rows

    section("serve", serve)
    section("train", lambda: bench_train.gpu_check_rows(device, args.smoke, notes, errors))

    failed = [r for r in rows if r["kind"] in ("check", "parity") and not r["ok"]]
    doc.update({"settings": {"script": "gpu_check", "smoke": args.smoke, "hf_compile": not args.no_hf_compile},
                "ceilings": ceilings, "rows": rows,
                "notes": notes + errors, "errors": errors, "failed_checks": len(failed),
                "section_seconds": section_s, "total_seconds": round(time.perf_counter() - started, 1)})
    sys.stdout.write(report.render(doc))
    report.write_json(os.path.join(out_dir, "results.json"), doc)
    report.write_markdown(os.path.join(out_dir, "results.md"), doc)
    try:  # the numbers are already on disk; a plotting problem must not turn into a traceback
        report.plot(doc, out_dir)
    except Exception as e:
        errors.append(f"plots: {_first_line(e)}")
        _log(errors[-1])
    verdict = "all checks passed" if not failed and not errors else \
        f"{len(failed)} check(s) failed, {len(errors)} section/op error(s)"
    print(f"{verdict}; {doc['total_seconds']:.0f} s; results in {out_dir}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
