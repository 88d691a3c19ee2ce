"""Past one device: tensor-parallel decode and data-parallel training throughput, one process per rank.

    fastgpt bench parallel [--quick | --smoke] [--device cpu | cuda]
    python -m benchmarks.bench_parallel [--smoke] [--device cpu]      # the same, without the CLI

Each world size is one job (``torchrun --nproc-per-node N``, on 127.0.0.1): one process for the baseline,
then every TP size that divides the heads (and fits the GPUs; 2 ranks on a CPU). Rank 0 reports.
  tp_decode  one decode step (batch B, a cache of `context` random keys/values) of a model with random
             weights, sharded by heads: ms per step, tokens/s, and the step's collectives (2 all-reduces per
             block, the embedding's all-reduce, the head's all-gather, of the same shapes) timed alone
             over as many calls; plus a parity row: the TP logits against the unsharded model's.
  tp_engine  the engine on the sharded model (the same random weights): Engine.generate of a fixed batch of
             greedy requests, output tokens/s, and how many requests came out with the same tokens as
             at TP=1. Every TP size runs eagerly (CUDA graphs are off under TP, so the one-process row
             runs without them too, and the ratio is TP's alone).
  dp_train   optimizer steps (forward, backward, AdamW) on random tokens through
             fastgpt.parallel.wrap_for_training, as ``fastgpt train`` runs them: DDP and FSDP2, tokens/s
             summed over the ranks, and the scaling over one process.
Every rank runs a fixed number of calls (a time budget could end ranks at different calls and leave one
waiting in a collective); the medians of rank 0 are reported. On a CPU the ranks share the cores, each with
one thread, and gloo moves tensors through local sockets: these numbers check the plumbing and the
accounting, not the speed of anything.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_NOTE = ("parallel on CPU: the ranks share the cores (one thread each) and gloo goes through local sockets; "
            "the numbers check correctness and plumbing, not speed")


# ------------------------------------------------------------------------------------------- the plan
def make_plan(device, quick: bool, smoke: bool) -> dict:
    cuda = torch.device(device).type == "cuda"
    if smoke:
        return dict(models=["tiny"], batches=[1], context=16, train_model="tiny", train_batch=2, block=32,
                    decode_reps=3, train_steps=2, modes=["ddp"],
                    engine=dict(requests=2, prompt_len=5, max_tokens=4, reps=1))
    if not cuda:
        return dict(models=["gpt2"], batches=[1], context=256, train_model="tiny", train_batch=4, block=64,
                    decode_reps=10 if quick else 30, train_steps=4 if quick else 10, modes=["ddp", "fsdp"],
                    engine=dict(requests=4, prompt_len=16, max_tokens=8 if quick else 16, reps=1 if quick else 3))
    return dict(models=["gpt2"] if quick else ["gpt2", "gpt2-xl"], batches=[1, 8] if quick else [1, 8, 64],
                context=512, train_model="gpt2", train_batch=8, block=512, decode_reps=20 if quick else 50,
                train_steps=5 if quick else 10, modes=["ddp", "fsdp"],
                engine=dict(requests=32, prompt_len=128, max_tokens=128, reps=3 if quick else 5))


def _config(name: str):
    from fastgpt.config import GPTConfig

    if name == "tiny":
        return GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=4096, n_positions=256)
    return GPTConfig.from_preset(name)


def tp_sizes(config, max_ranks: int) -> list[int]:
    return [t for t in range(2, max_ranks + 1) if config.n_head % t == 0]


# -------------------------------------------------------------------------------------------- workers
def _timed(fn, reps: int, device) -> float:
    """Median ms of fn() over reps calls after two warm-up calls, on every rank alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def _tp_decode(plan, name, batch, world, device, dtype) -> list[dict]:
    from benchmarks.gpu_check import PARITY_TOL
    from fastgpt import parallel
    from fastgpt.generate import decode_one_token
    from fastgpt.model import GPT

    config = _config(name)
    torch.manual_seed(0)  # every rank builds the same whole model, then keeps its shard
    with torch.device(device):
        model = GPT(config)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, 33), generator=g).to(device)
    rows = []
    if world.size > 1:
        expected = model(ids).float()
        parallel.tensor_parallel(model)
        err = ((model(ids).float() - expected).abs().max() / expected.abs().max()).item()
        rows.append({"kind": "parity", "model": f"{name}, random weights, TP={world.size}", "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "against": "the unsharded model, same device",
                     "max_err": err, "tol": PARITY_TOL[dtype], "argmax_agree": None, "ok": err <= PARITY_TOL[dtype]})
    context = min(plan["context"], config.n_positions)
    model.setup_caches(max_batch=batch, max_len=context)
    for block in model.transformer.h:  # a cache of random keys/values, never zeros
        block.attn.kv_cache.k_cache.normal_()
        block.attn.kv_cache.v_cache.normal_()
    tokens = torch.randint(0, config.vocab_size, (batch,), generator=g).to(device)
    pos = torch.tensor([context - 1], device=device)
    seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
    step_ms = _timed(lambda: decode_one_token(model, tokens, pos, seqlens), plan["decode_reps"], device)
    comm_ms = None
    if world.size > 1:
        x = torch.randn(batch, 1, config.n_embd, device=device, dtype=dtype)
        logits = torch.randn(batch, 1, model.transformer.wte.num_embeddings, device=device, dtype=dtype)

        def collectives():
            for _ in range(2 * config.n_layer + 1):  # attn.c_proj and mlp.c_proj per block, the embedding
                parallel.all_reduce_(x)
            parallel.all_gather_last_dim(logits)  # the head

        comm_ms = _timed(collectives, plan["decode_reps"], device)
    rows.append({"kind": "tp_decode", "model": name, "batch": batch, "context": context,
                 "dtype": str(dtype).replace("torch.", ""), "tp": world.size, "decode_ms": step_ms,
                 "tok_s": batch / (step_ms * 1e-3), "comm_ms": comm_ms,
                 "comm_pct": 100.0 * comm_ms / step_ms if comm_ms is not None else None})
    return rows


@torch.inference_mode()
def _tp_engine(plan, name, world, device, dtype) -> dict:
    from fastgpt import Engine, SamplingParams, parallel
    from fastgpt.model import GPT

    config = _config(name)
    torch.manual_seed(0)  # the weights of _tp_decode's model, sharded the same way
    with torch.device(device):
        model = GPT(config)
    model = model.to(dtype).eval()
    if world.size > 1:
        parallel.tensor_parallel(model)
    spec = plan["engine"]
    n, length, new = spec["requests"], min(spec["prompt_len"], config.n_positions // 2), spec["max_tokens"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    engine = Engine(model, max_num_seqs=n, num_blocks=n * -(-(length + new) // 16), cuda_graphs=False)
    outputs = []
    ms = _timed(lambda: outputs.append(engine.generate(prompts, params)), spec["reps"], device)
    return {"kind": "tp_engine", "model": name, "requests": n, "prompt_len": length, "max_tokens": new,
            "dtype": str(dtype).replace("torch.", ""), "tp": world.size, "generate_ms": ms,
            "tok_s": n * new / (ms * 1e-3), "tokens": [o.outputs[0].token_ids for o in outputs[-1]]}


def _dp_train(plan, mode, world, device) -> dict:
    from fastgpt import parallel
    from fastgpt.model import GPT
    from fastgpt.train import autocast_dtype, loss_sum_and_count, parameter_groups

    config = _config(plan["train_model"])
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    train_model = parallel.wrap_for_training(model, world, device, fsdp=mode == "fsdp")
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4)
    B, T = plan["train_batch"], min(plan["block"], config.n_positions)
    g = torch.Generator().manual_seed(world.rank)
    x = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, config.vocab_size, (B, T), generator=g).to(device)
    amp = autocast_dtype(device)

    def step():
        with parallel.gradient_sync(train_model, enabled=True):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, n = loss_sum_and_count(train_model, x, y)
            (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = _timed(step, plan["train_steps"], device)
    return {"kind": "dp_train", "model": plan["train_model"], "mode": mode if world.size > 1 else "one process",
            "ranks": world.size, "batch_per_rank": B, "block": T, "step_ms": ms,
            "tok_s": world.size * B * T / (ms * 1e-3)}


def worker(spec: dict) -> None:
    """One rank of one job: TP decode rows, then DP training rows; rank 0 writes them to spec['out']."""
    from fastgpt import parallel
    from fastgpt.load import parse_dtype

    world = parallel.World.from_env()
    device = parallel.rank_device(world, spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    parallel.init_process_group(world, device)
    plan, dtype = spec["plan"], parse_dtype(spec["dtype"])
    rows = []
    for name in plan["models"]:
        if world.size == 1 or world.size in tp_sizes(_config(name), world.size):
            for batch in plan["batches"]:
                rows += _tp_decode(plan, name, batch, world, device, dtype)
            rows.append(_tp_engine(plan, name, world, device, dtype))
    for mode in (["ddp"] if world.size == 1 else plan["modes"]):
        rows.append(_dp_train(plan, mode, world, device))
    if world.is_main:
        with open(spec["out"], "w", encoding="utf-8") as f:
            json.dump(rows, f)
    parallel.destroy_process_group()


# -------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nprocs: int, spec: dict, timeout: float) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=os.path.join(tmp, "rows.json"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "benchmarks.bench_parallel", "--worker", json.dumps(spec)]
        env = dict(os.environ, TRITON_INTERPRET="0")
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the {nprocs}-rank job did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
            raise RuntimeError(f"the {nprocs}-rank job failed: {' | '.join(tail)}")
        with open(spec["out"], encoding="utf-8") as f:
            return json.load(f)


def _log(msg: str) -> None:
    print(f"[bench parallel] {msg}", file=sys.stderr, flush=True)


def run(device, dtype, quick: bool, smoke: bool, notes: list[str], errors: list[str] | None = None,
        timeout: float = 1800) -> list[dict]:
    """Rows of kinds tp_decode, tp_engine, dp_train and parity, with each row's speedup / scaling over one
    process (and, for tp_engine, how many requests gave the tokens of TP=1)."""
    device = torch.device(device)
    plan = make_plan(device, quick, smoke)
    if device.type == "cuda":
        ranks = torch.cuda.device_count()
        if ranks < 2:
            notes.append(f"parallel: this machine has {ranks} GPU; tensor and data parallelism need 2 or more "
                         "(NCCL gives each rank its own GPU): skipped")
            return []
    else:
        ranks = 2
        notes.append(CPU_NOTE)
    # one process, every TP size that divides a model's heads (quick: 2 only), and all the ranks for DP
    tp = {t for m in plan["models"] for t in tp_sizes(_config(m), ranks) if not quick or t == 2}
    sizes = sorted({1, *tp, ranks})
    spec = dict(plan=plan, device="cuda" if device.type == "cuda" else "cpu", dtype=str(dtype).replace("torch.", ""))
    rows = []
    for n in sizes:
        _log(f"{n} rank(s)")
        try:
            rows += _launch(n, spec, timeout)
        except RuntimeError as e:
            if errors is None:
                raise
            errors.append(f"parallel, {n} rank(s): FAILED: {e}")
            _log(errors[-1])
    base_tp = {(r["model"], r["batch"]): r["tok_s"] for r in rows if r["kind"] == "tp_decode" and r["tp"] == 1}
    base_engine = {r["model"]: r for r in rows if r["kind"] == "tp_engine" and r["tp"] == 1}
    base_dp = next((r["tok_s"] for r in rows if r["kind"] == "dp_train" and r["ranks"] == 1), None)
    for r in rows:
        if r["kind"] == "tp_decode":
            base = base_tp.get((r["model"], r["batch"]))
            r["vs_one"] = r["tok_s"] / base if base else None
        elif r["kind"] == "tp_engine":
            base = base_engine.get(r["model"])
            r["vs_one"] = r["tok_s"] / base["tok_s"] if base else None
            same = sum(a == b for a, b in zip(r["tokens"], base["tokens"])) if base else None
            r["same_tokens"] = None if base is None else f"{same}/{r['requests']}"
        elif r["kind"] == "dp_train":
            r["vs_one"] = r["tok_s"] / base_dp if base_dp else None
    for r in rows:
        r.pop("tokens", None)  # compared; the report needs only the count
    return rows


def run_suite(ctx) -> list[dict]:
    """The ``parallel`` suite of ``fastgpt bench`` (see benchmarks/cli.py); a parity row off its tolerance
    is an error of the run."""
    rows = run(ctx.device, ctx.dtypes[0], ctx.quick, ctx.smoke, ctx.notes, ctx.errors)
    ctx.errors += [f"parallel: {r['model']}: logits off by {r['max_err']:.2e} (tolerance {r['tol']:.0e})"
                   for r in rows if r["kind"] == "parity" and not r["ok"]]
    return rows


def main(argv=None) -> int:
    import argparse

    from benchmarks import report

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    device = torch.device(args.device)
    notes: list[str] = []
    rows = run(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.quick, args.smoke, notes)
    doc = {**report.environment(device), "rows": rows, "notes": notes}
    sys.stdout.write(report.render(doc))
    return 0 if all(r["ok"] for r in rows if r["kind"] == "parity") else 1


if __name__ == "__main__":
    sys.exit(main())
