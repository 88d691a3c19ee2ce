"""A training step (forward + backward + AdamW): fastgpt's fused kernels against its PyTorch reference path
and transformers' GPT2LMHeadModel, on the same data in the same run.

    run(device, dtype, quick, smoke, ceilings, notes, errors) -> rows (kind "train")
    goals(rows) -> rows (kind "goal"): the issue's targets for gpt2 at 8 x 1024 in bf16, met or not
    fastgpt bench train [--quick] [--device cuda]        python -m benchmarks.bench_train [--quick] [--smoke]

Contenders, one after another on the same initial weights and the same seeded token batches:
  fused         fastgpt's GPT, loss = model(x, targets=y): the Triton kernels forward and backward and the
                fused linear cross-entropy (no (B, T, V) logits)
  reference     the same GPT inside kernels.reference_ops(): PyTorch ops and SDPA attention, materialised
                logits + F.cross_entropy (what `fastgpt train --reference-ops` runs)
  transformers  GPT2LMHeadModel with attn_implementation="sdpa", loss from its labels (its own shift)
On CUDA a step runs under bf16 autocast with fp32 master weights and torch.optim.AdamW(fused=True); the
median step time is triton.testing.do_bench's; peak memory is torch.cuda.max_memory_allocated over one
step, with each contender alone on the GPU (weights, gradients and AdamW state included). On a CPU the
step is fp32 and timed with a perf_counter loop; peak memory is not measured there ("-"), and "fused"
differs from "reference" only in the chunked loss (the Triton kernels need a GPU; the interpreter's
timings mean nothing).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from dataclasses import dataclass

import torch

from benchmarks.common import bench_ms

PATHS = ("fused", "reference", "transformers")
# (model preset or "tiny", batch, sequence): gpt2 at 8 x 1024 is the yardstick
FULL_SHAPES = [("gpt2", 8, 1024), ("gpt2", 16, 512), ("gpt2-medium", 4, 1024), ("gpt2-large", 2, 1024)]
QUICK_SHAPES = [("gpt2", 8, 1024)]
CPU_SHAPES = [("tiny", 4, 128)]
SMOKE_SHAPES = [("smoke", 2, 32)]
TINY = dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192)  # a CPU-sized model with a real head
SMOKE = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512)
GOALS = {"tokens_vs_reference": 1.5, "tokens_vs_transformers": 1.3, "memory_vs_reference": 0.60}


def _log(msg: str) -> None:
    print(f"[bench train] {msg}", file=sys.stderr, flush=True)


@dataclass
class Contender:
    path: str
    model: torch.nn.Module
    loss: callable  # (x, y) -> loss


def _config(name: str, seq: int):
    from fastgpt.config import GPTConfig

    if name == "tiny":
        return GPTConfig(n_positions=max(seq, 128), **TINY)
    if name == "smoke":
        return GPTConfig(n_positions=max(seq, 32), **SMOKE)
    return GPTConfig.from_preset(name)


def _fastgpt(config, device, seed: int):
    from fastgpt.model import GPT

    torch.manual_seed(seed)
    return GPT(config).to(device).train()


def _transformers(model):
    """GPT2LMHeadModel (SDPA attention) with its own copy of model's weights, or None without transformers."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    from fastgpt.load import fastgpt_to_hf

    transformers.logging.set_verbosity_error()
    with torch.device(model.device):
        hf = GPT2LMHeadModel(GPT2Config(**model.config.to_hf(), attn_implementation="sdpa"))
    hf.load_state_dict(fastgpt_to_hf(model), strict=False)  # copies: the peer trains its own weights
    hf.lm_head.weight = hf.transformer.wte.weight  # tied, as GPT-2 (and ours) is
    return hf.train()


def contender(path: str, config, device, seed: int = 0) -> Contender | None:
    import kernels

    model = _fastgpt(config, device, seed)
    if path == "fused":
        return Contender(path, model, lambda x, y: model(x, targets=y))
    if path == "reference":
        def loss(x, y):
            with kernels.reference_ops():
                return model(x, targets=y)
        return Contender(path, model, loss)
    hf = _transformers(model)
    del model
    if hf is None:
        return None
    # labels = the window itself: transformers shifts them (T - 1 targets; the compute is the same T tokens)
    return Contender(path, hf, lambda x, y: hf(input_ids=x, labels=x).loss)


def _step_fn(c: Contender, x, y, device):
    params = [p for p in c.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())

    def step():
        with amp:
            loss = c.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def measure(path: str, name: str, batch: int, seq: int, device, timing: dict) -> dict | None:
    """One contender at one shape: median step ms, tokens/s, peak memory (CUDA). None when unavailable."""
    config = _config(name, seq)
    g = torch.Generator().manual_seed(1234)  # the same windows for every contender
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    c = contender(path, config, device)
    if c is None:
        return None
    step = _step_fn(c, x, y, device)
    loss0 = float(step())  # warm-up: allocations, autotuning and compiles outside the timing
    ms = bench_ms(step, **timing)
    peak_gb = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    del c, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"kind": "train", "model": name, "batch": batch, "seq": seq,
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32", "path": path,
            "step_ms": ms, "tokens_per_s": batch * seq / (ms * 1e-3), "peak_gb": peak_gb, "first_loss": loss0}


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Adds to each row its tokens/s and peak memory relative to the reference path at the same shape."""
    ref = {(r["model"], r["batch"], r["seq"]): r for r in rows if r["path"] == "reference"}
    hf = {(r["model"], r["batch"], r["seq"]): r for r in rows if r["path"] == "transformers"}
    for r in rows:
        key = (r["model"], r["batch"], r["seq"])
        base, peer = ref.get(key), hf.get(key)
        r["vs_reference"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_transformers"] = r["tokens_per_s"] / peer["tokens_per_s"] if peer else None
        r["mem_vs_reference"] = (r["peak_gb"] / base["peak_gb"]) if base and base["peak_gb"] and r["peak_gb"] else None
    return rows


def run(device, dtype=None, quick: bool = False, smoke: bool = False, ceilings: dict | None = None,
        notes: list[str] | None = None, errors: list[str] | None = None) -> list[dict]:
    """Training-step rows for every shape x contender (dtype: bf16 autocast on CUDA, fp32 on a CPU)."""
    device = torch.device(device)
    notes = notes if notes is not None else []
    errors = errors if errors is not None else []
    if smoke:
        shapes, timing = SMOKE_SHAPES, dict(warmup_ms=1, rep_ms=1, min_reps=1)
    elif device.type == "cpu":
        shapes, timing = CPU_SHAPES, dict(warmup_ms=1, rep_ms=500 if quick else 2000, min_reps=3)
    else:
        shapes, timing = (QUICK_SHAPES if quick else FULL_SHAPES), dict(warmup_ms=100, rep_ms=500 if quick else 2000)
    if device.type == "cpu":
        notes.append("train on CPU: fp32 PyTorch ops on every path; 'fused' differs from 'reference' only in "
                     "the chunked loss (the Triton kernels need a GPU)")
    rows = []
    for name, batch, seq in shapes:
        for path in PATHS:
            _log(f"{name} {batch}x{seq} {path}")
            try:
                row = measure(path, name, batch, seq, device, timing)
            except Exception as e:  # one failing contender must not hide the others
                msg = f"train {name} {batch}x{seq} {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                errors.append(msg)
                _log(msg)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if row is None:
                notes.append(f"train {path}: not available (transformers is not installed)")
                continue
            rows.append(row)
    return _with_ratios(rows)


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals for gpt2 at 8 x 1024 (bf16, CUDA): one row each, with what was measured."""
    fused = [r for r in rows if r["path"] == "fused" and (r["model"], r["batch"], r["seq"]) == ("gpt2", 8, 1024)
             and r["dtype"] == "bf16 autocast"]
    if not fused:
        return []
    r = fused[0]
    out = []
    for goal, key, target, higher in (("tokens/s >= 1.5x the reference path", "vs_reference",
                                       GOALS["tokens_vs_reference"], True),
                                      ("tokens/s >= 1.3x transformers (SDPA)", "vs_transformers",
                                       GOALS["tokens_vs_transformers"], True),
                                      ("peak memory <= 60% of the reference path", "mem_vs_reference",
                                       GOALS["memory_vs_reference"], False)):
        value = r.get(key)
        ok = value is not None and (value >= target if higher else value <= target)
        out.append({"kind": "goal", "goal": f"gpt2 8x1024 bf16: {goal}", "measured": value, "target": target,
                    "ok": bool(ok)})
    return out


def run_suite(ctx) -> list[dict]:
    """The ``train`` suite of ``fastgpt bench`` (see benchmarks/cli.py): the rows and the goals."""
    rows = run(ctx.device, ctx.dtypes[0], ctx.quick, ctx.smoke, ctx.ceilings, ctx.notes, ctx.errors)
    return rows + goals(rows)


def gpu_check_rows(device, smoke: bool = False, notes: list[str] | None = None,
                   errors: list[str] | None = None) -> list[dict]:
    """benchmarks/gpu_check.py's training section: gpt2 at 8 x 1024 (the smoke model off a GPU), the goals."""
    rows = run(device, quick=True, smoke=smoke or torch.device(device).type != "cuda", notes=notes, errors=errors)
    return rows + goals(rows)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="gpt2 at 8 x 1024 only (CUDA); shorter timing")
    p.add_argument("--smoke", action="store_true", help="the tiniest model, one repetition (plumbing)")
    a = p.parse_args(argv)
    from benchmarks import report

    notes, errors = [], []
    rows = run(a.device, quick=a.quick, smoke=a.smoke, notes=notes, errors=errors)
    rows += goals(rows)
    doc = {**report.environment(a.device), "ceilings": {}, "rows": rows, "notes": notes + errors}
    sys.stdout.write(report.render(doc))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
