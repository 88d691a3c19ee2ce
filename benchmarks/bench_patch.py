"""transformers' GPT-2 patched by fastgpt (``fastgpt.patch_transformers``) against the same model unpatched.

One GPT2LMHeadModel with random weights (HF's own init, dropout off so that training runs through the
kernels), deep-copied; one copy patched. Both are timed the same way, in the same run:
  * prefill: ``model(ids, logits_to_keep=1)`` with a fresh cache, what ``generate`` runs on the prompt;
  * decode:  ms per step of greedy ``generate`` = (t(n + 1 new tokens) - t(1)) / n, HF's DynamicCache;
  * train:   ``model(ids, labels=ids).loss.backward()`` + an AdamW step.
  * compiled (on CUDA; on a CPU outside --quick/--smoke): both models under torch.compile(fullgraph=True),
    prefill as above, and a training step whose loss is computed from the logits in the compiled function
    (HF's labels= loss breaks the graph in transformers' own code).
The peer is transformers' own attention (SDPA, its default). On CUDA the patched model runs the Triton
kernels; on a CPU it runs kernels.reference (plain PyTorch), so CPU rows show what the patch costs or
saves around the same PyTorch math, nothing about the kernels, and are labelled so.
Goals on an H200 (issue 13): patched prefill >= 1.5x, patched training step >= 1.3x the unpatched model.

A parity row checks the patched model on the device against the unpatched one in float64 on the CPU.

    python -m benchmarks.bench_patch [--device cuda] [--quick] [--smoke] [--threads N]    # prints the tables
    (benchmarks/gpu_check.py runs it too)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

from benchmarks.common import bench_ms

GOALS = {"prefill": 1.5, "train": 1.3}  # H200, bfloat16, gpt2 (issue 13)
PARITY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}  # as gpu_check's model parity
TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=211, n_positions=128)


def _log(msg: str) -> None:
    print(f"[bench_patch] {msg}", file=sys.stderr, flush=True)


def make_plan(device, quick: bool, smoke: bool = False) -> dict:
    """Model and shapes by device and mode: (batch, prompt) for prefill, (batch, prompt, new) for decode,
    (batch, length) for a training step."""
    cuda = torch.device(device).type == "cuda"
    if smoke:  # plumbing only: the numbers mean nothing
        return dict(model="tiny", prefill=[(1, 16)], decode=[(1, 8, 4)], train=[(1, 16)], compiled=[],
                    timing=dict(rep_ms=1.0, min_reps=1))
    if cuda:
        return dict(model="gpt2", prefill=[(1, 1024), (8, 1024)] if quick else [(1, 512), (1, 1024), (8, 1024),
                                                                                 (32, 1024)],
                    decode=[(1, 128, 32), (8, 128, 32)], train=[(8, 1024)] if quick else [(4, 1024), (8, 1024)],
                    compiled=[(8, 1024)], timing=dict(rep_ms=200.0 if quick else 500.0))
    return dict(model="gpt2", prefill=[(1, 128)] if quick else [(1, 128), (4, 256)],
                decode=[(1, 16, 8)], train=[(1, 64)] if quick else [(1, 64), (2, 128)],
                compiled=[] if quick else [(1, 64)], timing=dict(rep_ms=200.0 if quick else 1000.0, min_reps=3))


def build_models(name: str, device, dtype):
    """(patched, unpatched) GPT2LMHeadModels holding the same random weights, eval mode, dropout off."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import fastgpt
    from fastgpt.config import PRESETS

    transformers.logging.set_verbosity_error()
    shape = TINY if name == "tiny" else PRESETS[name]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    hf = hf.to(device=device, dtype=dtype).eval()
    return fastgpt.patch_transformers(copy.deepcopy(hf)), hf


@contextlib.contextmanager
def _reference_ops_on_cpu():
    """CPU ops take kernels.reference while timing (the interpreter's timings would mean nothing)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _ids(vocab_size: int, batch: int, length: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 100_003 + length)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def _prefill_fn(model, ids):
    def run():
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1).logits
    return run


def _generate_fn(model, ids, n):
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return run


def _train_fn(model, ids):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _compiled_train_fn(model, ids):
    """A training step whose forward and loss are one compiled graph (its backward compiled with it)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def loss_of(ids):
        logits = model(ids, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    compiled = torch.compile(loss_of, fullgraph=True)

    def step():
        compiled(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _compiled_rows(plan, patched, hf, dtype, backend) -> list[dict]:
    """Both models compiled (fullgraph): prefill and a training step, patched against unpatched."""
    rows, timing, vocab = [], plan["timing"], hf.config.vocab_size
    for B, T in plan["compiled"]:
        ids = _ids(vocab, B, T, patched.device)
        torch._dynamo.reset()
        _log(f"compiled prefill {plan['model']} B={B} T={T}")
        fns = [torch.compile(_prefill_fn(m, ids), fullgraph=True) for m in (patched, hf)]
        ms = [bench_ms(fn, **timing) for fn in fns]
        rows.append(_row(plan["model"], "prefill", f"B={B} T={T}", dtype, backend + ", torch.compile", *ms, B * T))
        _log(f"compiled train {plan['model']} B={B} T={T}")
        ms = [bench_ms(_compiled_train_fn(m, ids), **timing) for m in (patched, hf)]
        rows.append(_row(plan["model"], "train", f"B={B} T={T}", dtype, backend + ", torch.compile", *ms, B * T))
        for m in (patched, hf):
            m.eval()
    torch._dynamo.reset()
    return rows


def run_suite(ctx) -> list[dict]:
    """The ``patch`` suite of ``fastgpt bench`` (benchmarks/cli.py); --model does not apply (random weights
    of the plan's preset)."""
    if ctx.model:
        ctx.notes.append("patch: --model ignored (the suite builds both HF models from a preset's shape)")
    return run(ctx.device, ctx.dtypes[0], ctx.quick, ctx.smoke, ctx.notes)


def _row(model_name, phase, shape, dtype, backend, patched_ms, hf_ms, tokens) -> dict:
    return {"kind": "patch", "model": model_name, "phase": phase, "shape": shape,
            "dtype": str(dtype).replace("torch.", ""), "backend": backend, "patched_ms": patched_ms, "hf_ms": hf_ms,
            "speedup": hf_ms / patched_ms if patched_ms else None, "goal": GOALS.get(phase),
            "patched_tok_s": tokens / (patched_ms * 1e-3), "hf_tok_s": tokens / (hf_ms * 1e-3)}


def parity(device, dtype, smoke: bool = False) -> dict:
    """Patched on device in dtype vs unpatched in float64 on the CPU: logits of a left-padded batch and of
    an unpadded one (the two attention paths), relative to the largest reference logit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import fastgpt

    shape = TINY if smoke else dict(n_layer=4, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    label = f"HF GPT-2 {shape['n_layer']}L {shape['n_embd']}C patched, random weights"
    row = {"kind": "parity", "model": label, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "against": "unpatched, CPU float64", "tol": PARITY_TOL[dtype]}
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double().eval()
    patched = fastgpt.patch_transformers(copy.deepcopy(reference).to(device=device, dtype=dtype))
    ids = _ids(shape["vocab_size"], 2, 67, "cpu")  # an odd length, not a multiple of any block size
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    errs, agree, scale = [], [], 0.0
    with torch.no_grad():
        for m in (None, mask):
            ref = reference(ids, attention_mask=m).logits
            got = patched(ids.to(device), attention_mask=None if m is None else m.to(device)).logits.double().cpu()
            keep = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
            scale = max(scale, ref[keep].abs().max().item())
            errs.append((got - ref)[keep].abs().max().item())
            agree.append((got.argmax(-1) == ref.argmax(-1))[keep].double().mean().item())
    err = max(errs) / scale
    row.update(max_err=err, argmax_agree=min(agree), ok=bool(err <= PARITY_TOL[dtype]))
    return row


def run(device, dtype, quick: bool = True, smoke: bool = False, notes: list[str] | None = None) -> list[dict]:
    """The parity row, then the timing rows: prefill, decode, train for each shape of the plan."""
    device = torch.device(device)
    plan = make_plan(device, quick, smoke)
    backend = "Triton kernels" if device.type == "cuda" else "CPU reference path (PyTorch)"
    if notes is not None and device.type == "cpu":
        notes.append("patched-HF rows on CPU run kernels.reference (PyTorch), not the Triton kernels")
    rows = []
    with _reference_ops_on_cpu() if device.type == "cpu" else contextlib.nullcontext():
        _log(f"parity on {device} {dtype}")
        rows.append(parity(device, dtype, smoke))
        patched, hf = build_models(plan["model"], device, dtype)
        vocab = hf.config.vocab_size
        timing = plan["timing"]
        for B, T in plan["prefill"]:
            _log(f"prefill {plan['model']} B={B} T={T}")
            ids = _ids(vocab, B, T, device)
            ms = [bench_ms(_prefill_fn(m, ids), **timing) for m in (patched, hf)]
            rows.append(_row(plan["model"], "prefill", f"B={B} T={T}", dtype, backend, *ms, B * T))
        for B, T, n in plan["decode"]:
            _log(f"decode {plan['model']} B={B} prompt={T} new={n}")
            ids = _ids(vocab, B, T, device)
            ms = []
            for m in (patched, hf):
                one, many = bench_ms(_generate_fn(m, ids, 1), **timing), bench_ms(_generate_fn(m, ids, n + 1), **timing)
                ms.append(max(many - one, 1e-9) / n)
            rows.append(_row(plan["model"], "decode", f"B={B} prompt={T} +{n}", dtype, backend, *ms, B))
        for B, T in plan["train"]:
            _log(f"train {plan['model']} B={B} T={T}")
            ids = _ids(vocab, B, T, device)
            ms = [bench_ms(_train_fn(m, ids), **timing) for m in (patched, hf)]
            rows.append(_row(plan["model"], "train", f"B={B} T={T}", dtype, backend, *ms, B * T))
        rows += _compiled_rows(plan, patched, hf, dtype, backend)
    return rows


def main(argv=None) -> int:
    from benchmarks import report

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_patch", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on CUDA, "
                                                 "float32 on CPU)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (1 is steadier on a shared machine)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.cuda.init()  # benchmarks.common times with do_bench once CUDA is up
    started = time.perf_counter()
    notes: list[str] = []
    rows = run(device, dtype, args.quick, args.smoke, notes)
    doc = {**report.environment(device), "rows": rows, "notes": notes}
    sys.stdout.write(report.render(doc))
    print(f"{time.perf_counter() - started:.0f} s")
    return 0 if all(r["ok"] for r in rows if r["kind"] == "parity") else 1


if __name__ == "__main__":
    sys.exit(main())
