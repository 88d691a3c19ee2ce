"""Engine throughput: many requests of random lengths, offline, against transformers on the same weights.

    python -m benchmarks.bench_engine                     # gpt2-shaped, 64 requests (the issue's target)
    python -m benchmarks.bench_engine --quick             # 16 shorter requests, two concurrencies
    python -m benchmarks.bench_engine --out DIR           # also bench_engine.json / .txt / .png in DIR

Workload (vLLM's random dataset, stated as ranges): N requests whose prompt and output lengths are
uniform integers in the given ranges and whose prompt tokens are uniform over the vocabulary, all from one
seed. Greedy, no EOS stop: every request makes exactly its output length (ignore_eos / min_new_tokens).
One model for everyone: gpt2-shaped with seeded random weights (or --model), fp32 on CPU, bf16 on CUDA.

Systems, on the same requests in the same run, at each concurrency c:
  fastgpt engine        Engine.generate with max_num_seqs = c (KV cache sized to hold the whole workload)
  transformers CB       transformers' continuous batching (its ContinuousBatchingManager, the machinery of
                        generate_batch, fed add_request(ids, max_new_tokens=n) so each request keeps its own
                        length) with max_requests_per_batch = c
  transformers static   generate() on batches of c requests in arrival order, left-padded with an attention
                        mask; every row runs to its batch's longest output
  fastgpt static        GPT.generate on the same batches. It has no padding mask, so the rows are left-padded
                        with EOS tokens that it attends to: this prices a static batch; its tokens differ.
Output tokens/s counts each request's own output length (the tokens a static batch makes past a row's
length are waste) over the wall time from the first request in to the last token out, with every system
built beforehand (KV cache allocated, graphs captured, transformers' manager warmed up). Where two systems
run the same greedy computation (the fastgpt engine and each transformers system) their tokens are compared
request by request; fp32 rounding differs between implementations, so a near-tie can flip a few.

``gpu_rows`` is the engine section of benchmarks/gpu_check.py: graph replay against eager, gpt2 output
tokens/s at 256 requests, and the CUDA-graph decode step at batch 1.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # CPU runs take the PyTorch path; the interpreter's times mean nothing

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.bench_generate import build_model, transformers_peer  # noqa: E402
from fastgpt import Engine, SamplingParams  # noqa: E402
from fastgpt.load import atomic_write_text  # noqa: E402

SYSTEMS = ("fastgpt engine", "transformers CB", "transformers static", "fastgpt static")
# the goals on this CPU (fastgpt engine output tokens/s over the peer's) and on an H200
GOALS = {"transformers CB": 2.5, "transformers static": 3.0}
GPU_TOK_S_GOAL, GPU_STEP_US_GOAL = 50_000, 200


@dataclass
class Workload:
    num_requests: int = 64
    prompt_range: tuple[int, int] = (16, 512)
    output_range: tuple[int, int] = (16, 256)
    seed: int = 0
    concurrency: tuple[int, ...] = (4, 16, 64)


QUICK = Workload(num_requests=16, prompt_range=(16, 128), output_range=(16, 64), concurrency=(4, 16))


def _log(msg: str) -> None:
    print(f"[bench engine] {msg}", file=sys.stderr, flush=True)


def make_requests(vocab_size: int, w: Workload) -> list[tuple[list[int], int]]:
    """[(prompt ids, output length)] * N, uniform lengths in the ranges (inclusive), uniform token ids."""
    g = torch.Generator().manual_seed(w.seed)

    def lengths(lo, hi):
        return torch.randint(lo, hi + 1, (w.num_requests,), generator=g).tolist()

    prompt_lens, output_lens = lengths(*w.prompt_range), lengths(*w.output_range)
    return [(torch.randint(0, vocab_size, (p,), generator=g).tolist(), o) for p, o in zip(prompt_lens, output_lens)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- systems
def max_batch_tokens(device) -> int:
    """The token budget of a step, for both continuous-batching systems: the engine's default."""
    from fastgpt.engine.engine import CPU_MAX_BATCHED_TOKENS, CUDA_MAX_BATCHED_TOKENS

    return CUDA_MAX_BATCHED_TOKENS if torch.device(device).type == "cuda" else CPU_MAX_BATCHED_TOKENS


def fastgpt_engine(model, requests, concurrency: int, cuda_graphs: bool = True):
    """(seconds, outputs, engine stats)."""
    block_size = 16
    need = sum(-(-(len(ids) + n) // block_size) for ids, n in requests)
    engine = Engine(model, max_num_seqs=concurrency, num_blocks=need, block_size=block_size,
                    max_num_batched_tokens=max_batch_tokens(model.device), cuda_graphs=cuda_graphs)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    engine.generate([requests[0][0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    _sync(model.device)
    t0 = time.perf_counter()
    outs = engine.generate([ids for ids, _ in requests], params)
    _sync(model.device)
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    del engine
    return seconds, [o.outputs[0].token_ids for o in outs], stats


def transformers_cb(hf, requests, concurrency: int):
    """(seconds, outputs) of transformers' continuous batching on the requests."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    longest = max(n for _, n in requests)
    config = GenerationConfig(do_sample=False, max_new_tokens=longest, eos_token_id=-1, pad_token_id=0)
    # the same token budget per step as our engine's, and a cache that holds the whole workload, as ours
    # does; left to itself on a CPU it would size its cache to 60% of the machine's RAM
    page = 256
    pages = -(-sum(len(ids) + n for ids, n in requests) // page) + concurrency
    cb = ContinuousBatchingConfig(max_requests_per_batch=concurrency, num_blocks=pages, page_size=page,
                                  max_batch_tokens=max_batch_tokens(hf.device))
    with hf.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb,
                                                block=True, timeout=30) as manager:
        t0 = time.perf_counter()
        for i, (ids, n) in enumerate(requests):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=n)
        results = {}
        while len(results) < len(requests):
            r = manager.get_result(timeout=5)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped early")
                continue
            if r.is_finished():
                results[r.request_id] = r
        _sync(hf.device)
        seconds = time.perf_counter() - t0
    return seconds, [list(results[f"r{i}"].generated_tokens) for i in range(len(requests))]


def _batches(requests, size):
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def transformers_static(hf, requests, batch: int):
    """(seconds, outputs): generate() on left-padded static batches in arrival order."""
    from transformers import GenerationConfig

    outputs = []
    t0 = time.perf_counter()
    for chunk in _batches(requests, batch):
        T, n = max(len(ids) for ids, _ in chunk), max(m for _, m in chunk)
        ids = torch.zeros((len(chunk), T), dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (p, _) in enumerate(chunk):
            ids[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = 1
        config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                  pad_token_id=0)
        with torch.inference_mode():
            out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device), generation_config=config)
        outputs += [out[r, T:T + m].tolist() for r, (_, m) in enumerate(chunk)]
    _sync(hf.device)
    return time.perf_counter() - t0, outputs


def fastgpt_static(model, requests, batch: int, pad_token: int):
    """(seconds, None): GPT.generate on the same static batches, left-padded with real EOS tokens."""
    t0 = time.perf_counter()
    for chunk in _batches(requests, batch):
        T, n = max(len(ids) for ids, _ in chunk), max(m for _, m in chunk)
        ids = torch.full((len(chunk), T), pad_token, dtype=torch.long)
        for r, (p, _) in enumerate(chunk):
            ids[r, T - len(p):] = torch.tensor(p)
        model.generate(ids.to(model.device), n)
    _sync(model.device)
    model.clear_caches()
    return time.perf_counter() - t0, None


def _agreement(ours, theirs) -> dict:
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / max(len(a), 1)
              for a, b in zip(ours, theirs)]
    return {"same_requests": same, "mean_matching_prefix": sum(prefix) / len(prefix)}


# ------------------------------------------------------------------------------------------------- run
def run(device="cpu", dtype=None, workload: Workload | None = None, model_name: str = "gpt2",
        systems=SYSTEMS) -> dict:
    """A results document: workload, rows (one per system x concurrency), and the speedups at the top
    concurrency."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    w = workload or Workload()
    model, label = build_model(model_name, device, dtype)
    requests = make_requests(model.config.vocab_size, w)
    if max(len(p) + n for p, n in requests) > model.config.n_positions:
        raise ValueError(f"{label}: context {model.config.n_positions} is too short for the workload's ranges")
    hf = transformers_peer(model) if any(s.startswith("transformers") for s in systems) else None
    out_tokens = sum(n for _, n in requests)
    rows, reference = [], {}
    for c in w.concurrency:
        for system in systems:
            if system.startswith("transformers") and hf is None:
                continue
            _log(f"{system}, concurrency {c}: {len(requests)} requests, {out_tokens} output tokens")
            extra = {}
            if system == "fastgpt engine":
                seconds, outs, stats = fastgpt_engine(model, requests, c)
                extra = {k: stats[k] for k in ("preemptions", "steps", "total_blocks")}
                reference[c] = outs
            elif system == "transformers CB":
                seconds, outs = transformers_cb(hf, requests, c)
            elif system == "transformers static":
                seconds, outs = transformers_static(hf, requests, c)
            else:
                seconds, outs = fastgpt_static(model, requests, c, model.config.eos_token_id)
            if outs is not None and system != "fastgpt engine" and c in reference:
                extra.update(_agreement(reference[c], outs))
            row = {"kind": "engine", "model": label, "dtype": str(dtype).replace("torch.", ""), "system": system,
                   "concurrency": c, "requests": len(requests), "output_tokens": out_tokens, "seconds": seconds,
                   "output_tok_s": out_tokens / seconds, "req_s": len(requests) / seconds, **extra}
            rows.append(row)
            _log(f"  {seconds:.1f} s, {row['output_tok_s']:.1f} output tok/s")
            gc.collect()
    doc = report.environment(device)
    doc.update({"suite": "bench_engine", "workload": asdict(w), "model": label,
                "cpu_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "rows": rows,
                "speedups": speedups(rows)})
    return doc


def run_suite(ctx) -> list[dict]:
    """The ``engine`` suite of ``fastgpt bench`` (see benchmarks/cli.py): the quick workload with --quick, a
    tiny one with --smoke (without transformers' continuous batching, whose warm-up alone takes tens of
    seconds on a CPU); the speedup lines go to the notes. ``python -m benchmarks.bench_engine`` has the
    workload options."""
    systems = SYSTEMS
    if ctx.smoke:
        w = Workload(num_requests=4, prompt_range=(4, 24), output_range=(2, 6), concurrency=(2,))
        systems = tuple(s for s in SYSTEMS if s != "transformers CB")
    else:
        w = Workload(**asdict(QUICK)) if ctx.quick else Workload()
    doc = run(ctx.device, ctx.dtypes[0], workload=w, model_name=ctx.model or ("tiny" if ctx.smoke else "gpt2"),
              systems=systems)
    lines = render(doc).splitlines()
    ctx.notes += [f"engine: {lines[1]}"] + [line for line in lines if line.startswith(("fastgpt engine vs ",
                                                                                       "fastgpt static:"))]
    return doc["rows"]


def speedups(rows: list[dict]) -> dict:
    """fastgpt engine's output tok/s over each peer's: at the top concurrency, and over the peer's best."""
    top = max((r["concurrency"] for r in rows), default=None)
    engine = {r["concurrency"]: r for r in rows if r["system"] == "fastgpt engine"}
    out = {}
    for peer in SYSTEMS[1:]:
        peer_rows = [r for r in rows if r["system"] == peer]
        if not peer_rows or top not in engine:
            continue
        best = max(peer_rows, key=lambda r: r["output_tok_s"])
        at_top = next((r for r in peer_rows if r["concurrency"] == top), None)
        out[peer] = {
            "at_top_concurrency": engine[top]["output_tok_s"] / at_top["output_tok_s"] if at_top else None,
            "over_peer_best": engine[top]["output_tok_s"] / best["output_tok_s"],
            "peer_best_concurrency": best["concurrency"],
            "goal": GOALS.get(peer),
        }
    return out


COLUMNS = [("system", "system", ""), ("concurrency", "concurrency", "d"), ("seconds", "seconds", ".1f"),
           ("output tok/s", "output_tok_s", ".1f"), ("req/s", "req_s", ".3f"),
           ("same tokens", "same_requests", ""), ("matching prefix", "mean_matching_prefix", ".3f"),
           ("preemptions", "preemptions", "")]


def render(doc: dict) -> str:
    w = doc["workload"]
    lines = [f"Engine throughput, {doc['model']} ({doc['rows'][0]['dtype'] if doc['rows'] else '-'}) on "
             f"{doc['device_name']}, {doc['date']}, {doc['cpu_threads']} threads, load avg {doc['load_avg_1min']:.1f}",
             f"{w['num_requests']} requests, prompts {w['prompt_range'][0]}-{w['prompt_range'][1]} tokens, outputs "
             f"{w['output_range'][0]}-{w['output_range'][1]} tokens (uniform, seed {w['seed']}), greedy, no EOS stop",
             "", report.format_table(doc["rows"], COLUMNS), ""]
    for peer, s in doc["speedups"].items():
        goal = f" (goal {s['goal']}x: {'yes' if s['over_peer_best'] >= s['goal'] else 'NO'})" if s["goal"] else ""
        top = f"{s['at_top_concurrency']:.2f}x at the top concurrency, " if s["at_top_concurrency"] else ""
        lines.append(f"fastgpt engine vs {peer}: {top}{s['over_peer_best']:.2f}x over its best "
                     f"(concurrency {s['peer_best_concurrency']}){goal}")
    if any(r["system"] == "fastgpt static" for r in doc["rows"]):
        lines.append("fastgpt static: GPT.generate has no padding mask; its rows are left-padded with EOS tokens "
                     "(timing only, tokens not compared)")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    """Output tokens/s against concurrency, one line per system; bars when there is one concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, rows = doc["workload"], doc["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    if len(levels) == 1:
        values = [next(r["output_tok_s"] for r in rows if r["system"] == s) for s in systems]
        bars = ax.bar(systems, values, color=[f"C{SYSTEMS.index(s)}" for s in systems])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set(xlabel=f"concurrency {levels[0]}")
        ax.tick_params(axis="x", labelsize=8)
    else:
        for s in systems:
            series = sorted((r for r in rows if r["system"] == s), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in series], [r["output_tok_s"] for r in series], "o-",
                    color=f"C{SYSTEMS.index(s)}", label=s)
        ax.set(xscale="log", xlabel="concurrency (max running requests / static batch size)")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    ax.set(ylabel="output tokens/s")
    ax.grid(alpha=0.3)
    ax.set_title(f"{doc['model']} {rows[0]['dtype']}: {w['num_requests']} requests, prompts {w['prompt_range'][0]}-"
                 f"{w['prompt_range'][1]}, outputs {w['output_range'][0]}-{w['output_range'][1]}, greedy\n"
                 f"{doc['device_name']}, {doc['cpu_threads']} threads, {doc['date'][:10]}", fontsize=9)
    report._save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ GPU section
def gpu_rows(device="cuda", smoke: bool = False) -> list[dict]:
    """gpu_check's engine section: graph replay vs eager (check row), gpt2 output tok/s at 256 requests
    and the CUDA-graph decode step at batch 1 (engine rows)."""
    from benchmarks.common import bench_ms

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, label = build_model("tiny" if smoke else "gpt2", device, dtype)
    if device.type != "cuda":  # a dry run of the plumbing: no graphs to check or time
        return _throughput_row(model, label, dtype, smoke)
    rows = []

    # 1. replay == eager on one decode batch
    engine = Engine(model, num_blocks=2048, max_num_seqs=64)
    for i, (ids, _) in enumerate(make_requests(model.config.vocab_size, Workload(num_requests=5, seed=1,
                                                                                 prompt_range=(1, 200)))):
        engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    batch = engine.scheduler.schedule()
    replay = engine.runner.execute(batch).float().clone()
    eager = engine.runner.execute(batch, use_graphs=False).float()
    err = ((replay - eager).abs().max() / eager.abs().max()).item()
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-5)
    graphs = engine.runner.graphs is not None
    rows.append({"kind": "check", "op": "engine graph replay vs eager", "case": f"{label}, {len(batch.seqs)} decodes",
                 "dtype": str(dtype).replace("torch.", ""), "max_err": err, "tol": tol,
                 "ok": bool(graphs and err <= tol and torch.equal(replay.argmax(-1), eager.argmax(-1))),
                 **({} if graphs else {"error": f"no CUDA graphs: {engine.runner.graph_error}"})})

    # 2. the CUDA-graph decode step at batch 1 (its inputs copied in, the replay, the logits out)
    if graphs:
        seq, n = batch.seqs[:1], batch.num_new_tokens[:1]
        one = type(batch)(seq, n, 1)
        step_ms = bench_ms(functools.partial(engine.runner.execute, one))
        rows.append({"kind": "engine", "model": label, "dtype": str(dtype).replace("torch.", ""),
                     "system": "fastgpt engine: CUDA-graph decode step, batch 1", "concurrency": 1,
                     "step_us": step_ms * 1e3, "goal_us": GPU_STEP_US_GOAL})
    del engine
    return rows + _throughput_row(model, label, dtype, smoke)


def _throughput_row(model, label, dtype, smoke: bool) -> list[dict]:
    """3. output tokens/s at 256 requests (the issue's H200 goal: 50,000 for gpt2)."""
    w = Workload(num_requests=16 if smoke else 256, prompt_range=(16, 64 if smoke else 512),
                 output_range=(16, 32 if smoke else 256), concurrency=(256,))
    requests = make_requests(model.config.vocab_size, w)
    seconds, _, stats = fastgpt_engine(model, requests, 256)
    out_tokens = sum(n for _, n in requests)
    return [{"kind": "engine", "model": label, "dtype": str(dtype).replace("torch.", ""),
             "system": "fastgpt engine", "concurrency": 256, "requests": len(requests),
             "output_tokens": out_tokens, "seconds": seconds, "output_tok_s": out_tokens / seconds,
             "req_s": len(requests) / seconds, "preemptions": stats["preemptions"], "goal_tok_s": GPU_TOK_S_GOAL}]


# ----------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"{QUICK.num_requests} shorter requests, concurrency "
                                                        f"{', '.join(map(str, QUICK.concurrency))}")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default 64; 16 with --quick)")
    p.add_argument("--concurrency", default=None, help="comma-separated levels (default 4,16,64; 4,16 with --quick)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    p.add_argument("--model", default="gpt2", help="a preset (random weights) or a local checkpoint dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="folder for bench_engine.json / .txt / .png")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--plot", default=None, metavar="DIR", help="also write bench_engine.png into DIR")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    w = Workload(**asdict(QUICK)) if args.quick else Workload()
    if args.requests is not None:
        w.num_requests = args.requests
    if args.concurrency is not None:
        w.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    systems = tuple(s.strip() for s in args.systems.split(","))
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    doc = run(args.device, workload=w, model_name=args.model, systems=systems)
    text = render(doc)
    sys.stdout.write(text)
    json_path, plot_dir = args.json, args.plot
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_text(os.path.join(args.out, "bench_engine.txt"), text)
        json_path, plot_dir = json_path or os.path.join(args.out, "bench_engine.json"), plot_dir or args.out
    if json_path:
        report.write_json(json_path, doc)
        _log(f"wrote {json_path}")
    if plot_dir:
        os.makedirs(plot_dir, exist_ok=True)
        plot(doc, os.path.join(plot_dir, "bench_engine.png"))
        _log(f"wrote {os.path.join(plot_dir, 'bench_engine.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
