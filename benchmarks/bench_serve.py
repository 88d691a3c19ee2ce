"""Serving benchmark: `fastgpt serve` under load, against `transformers serve` and the offline engine.

    python -m benchmarks.bench_serve                          # starts every server itself (the bundled model)
    python -m benchmarks.bench_serve --url http://127.0.0.1:8000 --peers none   # a server already running
    python -m benchmarks.bench_serve --num-requests 64 --request-rates 2,4,8,inf --max-concurrency 64

Workload (in the spirit of vLLM's "random" dataset): N requests whose prompt and output lengths are drawn
uniformly from --prompt-len A:B and --output-len C:D tokens; a prompt is random token ids decoded to text,
so every peer is sent the same text. Greedy, and every request generates exactly its output length
(fastgpt: ignore_eos; transformers: an EOS id no token has). Arrivals are a Poisson process at each
request rate (inf: all at once), with at most --max-concurrency requests in flight. Each server is
warmed up first (transformers' first request compiles for seconds).

Metrics, with the definitions of vLLM's benchmark_serving.py (measured by this client, streaming):
  TTFT     request sent -> first chunk carrying text
  ITL      the gaps between consecutive chunks carrying text, pooled over all requests
  TPOT     per request, (latency - TTFT) / (output tokens - 1), over requests with more than one token
  latency  request sent -> last chunk carrying text (E2EL)
  request throughput = completed / duration, output token throughput = output tokens / duration, where
  duration runs from the first request sent to the last one done; mean, median and p99 (numpy) of each.
Output tokens are the completion_tokens of the usage each server reports in its stream. Each run also
records the CPU seconds every peer's process used meanwhile ("CPU s": a server's whole process, HTTP
included; the offline engine's is this process): on a shared machine those vary far less than wall time.

Peers in the same run, on the same requests and weights: `transformers serve --continuous-batching`
(needs transformers[serving] and accelerate); fastgpt's offline Engine.generate with all requests at
once (no HTTP at all: the server's overhead is the gap between it and the server at rate inf); with --peers
thread, fastgpt serve --engine-thread too (the engine on the server's thread, sharing its GIL). Every
peer gets the same torch thread count (--threads; the default is fastgpt serve's: the cores minus one).
All peers are started before any is measured and then take turns, --repeats times (the table shows each
one's median run, serve.json has every run), so a shift in the machine's load falls on all alike.
The issue's targets, checked at rate inf: fastgpt serve's output tok/s >= 80% of the offline engine's
and >= 2x transformers serve's.

Writes serve.json, serve.md and serve.png (latency percentiles and throughput against request rate) to
--out (default benchmarks/results/<date>-<machine>/). CPU timings on a shared machine are noisy: the
load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.report import SERVE_COLUMNS  # noqa: E402
from benchmarks.serve_process import REPO_ROOT, ServerProcess, httpx, tree_total  # noqa: E402

TARGET_VS_OFFLINE = 0.8
TARGET_VS_TRANSFORMERS = 2.0
GPU_GOAL_TTFT_MS = 20.0
GPU_GOAL_TPOT_MS = 5.0
THREAD_PEER = "fastgpt serve, engine thread"  # --peers thread: the server before its engine had a process


# ------------------------------------------------------------------------------------------ workload
@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


def make_requests(tokenizer, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                  vocab_size: int | None = None) -> list[BenchRequest]:
    """n requests with uniform random lengths; each prompt is random ids (never EOS) decoded to text."""
    rng = np.random.default_rng(seed)
    vocab = min(tokenizer.vocab_size, vocab_size or tokenizer.vocab_size)
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(n):
        p_len = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        ids = [int(t) for t in rng.integers(0, vocab, size=p_len) if t != eos][:p_len] or [1]
        text = tokenizer.decode(ids)
        out.append(BenchRequest(text, len(tokenizer.encode(text)), int(rng.integers(output_len[0], output_len[1] + 1))))
    return out


# -------------------------------------------------------------------------------------------- client
@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _send(client, url: str, body: dict, prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    sent = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if not (choices and choices[0].get("text")):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last = now
    except (httpx.HTTPError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = (last or time.perf_counter()) - sent
    result.success = last is not None and result.output_tokens > 0
    if not result.success and not result.error:
        result.error = "no text or no usage in the stream"
    return result


async def run_load(url: str, bodies: list[dict], prompt_lens: list[int], rate: float, concurrency: int,
                   seed: int) -> tuple[list[RequestResult], float]:
    """Send every body (streaming) at a Poisson rate (inf: at once), at most `concurrency` in flight."""
    rng = np.random.default_rng(seed)
    gaps = [0.0] * len(bodies) if math.isinf(rate) else list(rng.exponential(1.0 / rate, size=len(bodies)))
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(client, body, prompt_len):
        async with semaphore:
            return await _send(client, url, body, prompt_len)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for body, prompt_len, gap in zip(bodies, prompt_lens, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(client, body, prompt_len)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration


def serving_metrics(results: list[RequestResult], duration: float) -> dict:
    """vLLM's calculate_metrics: throughputs, and mean / median / p99 of TTFT, TPOT, ITL, E2EL in ms."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_out = sum(r.output_tokens for r in ok)
    row = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "total_input": sum(r.prompt_len for r in ok), "total_output": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        arr = np.asarray(values or [0.0]) * 1e3
        row.update({f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
                    f"p99_{name}_ms": float(np.percentile(arr, 99))})
    errors = [r.error for r in results if not r.success]
    if errors:
        row["first_error"] = errors[0]
    return row


# --------------------------------------------------------------------------------------------- peers
def fastgpt_body(req: BenchRequest, model: str) -> dict:
    return {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def transformers_body(req: BenchRequest, model: str) -> dict:
    # greedy, exactly output_len tokens: an eos id no token has (transformers serve takes no ignore_eos)
    config = {"max_new_tokens": req.output_len, "do_sample": False, "eos_token_id": -1}
    return {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0, "stream": True,
            "generation_config": json.dumps(config)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """`transformers serve MODEL_DIR --continuous-batching` on a loopback port, always stopped."""

    def __init__(self, model_dir: str, device: str, threads: int, cache_blocks: int | None = None,
                 start_timeout_s: float = 300.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TRITON_INTERPRET": "0"}
        cache = ["--cb-num-blocks", str(cache_blocks)] if cache_blocks else []
        self.proc = subprocess.Popen(["transformers", "serve", model_dir, "--continuous-batching", "--device", device,
                                      "--host", "127.0.0.1", "--port", str(self.port), *cache],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer /health within {start_timeout_s:.0f} s")

    def tail(self) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().splitlines()[-5:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@dataclass
class Served:
    """A server under test: its name, its completions URL, and the bodies of the workload for it."""

    peer: str
    url: str
    bodies: list[dict]
    pid: int | None = None  # its process, when this run started it (for the CPU it uses)

    def warm_up(self, seed: int) -> None:
        warm = [dict(b, max_tokens=4) for b in self.bodies[:2]]
        asyncio.run(run_load(self.url, warm, [0] * len(warm), math.inf, 2, seed))

    def measure(self, reqs: list[BenchRequest], rate: float, concurrency: int, seed: int, log) -> dict:
        log(f"{self.peer}: {len(self.bodies)} requests at rate {rate:g}/s, concurrency {concurrency}")
        results, duration = asyncio.run(run_load(self.url, self.bodies, [r.prompt_len for r in reqs], rate,
                                                 concurrency, seed))
        row = {"kind": "serve", "peer": self.peer, "rate": rate, "concurrency": concurrency,
               **serving_metrics(results, duration)}
        if row["failed"]:
            log(f"{self.peer}: {row['failed']} request(s) failed, e.g. {row.get('first_error')}")
        return row


def process_cpu_s(pid: int | None) -> float | None:
    """user + system CPU seconds so far of a process and its descendants (a server's engine process
    included; Linux), None when unknown."""
    return None if pid is None else tree_total(pid, _cpu_s_one)


def _cpu_s_one(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_cpu(fn, pids: dict):
    """fn()'s result, and the CPU seconds each of pids ({name: pid}, 'bench' for this process) used meanwhile:
    which peer used the machine during a measurement, and whether an idle one did not."""
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    bench = time.process_time()
    out = fn()
    after = {name: process_cpu_s(pid) for name, pid in pids.items()}
    used = {name: round(after[name] - before[name], 2) for name in pids
            if before[name] is not None and after[name] is not None}
    used["bench"] = round(time.process_time() - bench, 2)
    return out, used


def median_runs(runs: list[dict]) -> list[dict]:
    """Per (peer, rate), the repeat with the median output throughput (the lower middle of an even count)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["peer"], r["rate"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["output_throughput"])
        out.append({**ranked[(len(ranked) - 1) // 2], "repeats": len(ranked)})
    return out


def transformers_cpu_cache_blocks(model_dir: str, max_num_seqs: int) -> int:
    """On CPU, transformers sizes its paged cache at 90% of the machine's RAM (14 GB here: the OOM killer
    took it); give it the KV capacity fastgpt's engine takes on CPU instead (engine.default_num_blocks:
    1 GiB, or max_num_seqs full contexts if less), in its blocks of 256 tokens."""
    from fastgpt.config import GPTConfig
    from fastgpt.engine.engine import CPU_KV_CACHE_BYTES

    cfg = GPTConfig.from_hf(os.path.join(model_dir, "config.json"))
    bytes_per_token = 2 * cfg.n_layer * cfg.n_embd * 4  # k and v, every layer, fp32
    tokens = min(CPU_KV_CACHE_BYTES // bytes_per_token, max_num_seqs * cfg.n_positions)
    return math.ceil(tokens / 256)


def offline_row(engine, reqs: list[BenchRequest]) -> dict:
    """fastgpt's Engine.generate on the same requests, all at once: output tok/s without HTTP."""
    from fastgpt import SamplingParams

    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    engine.generate([reqs[0].prompt], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    start = time.perf_counter()
    outs = engine.generate([r.prompt for r in reqs], params)
    duration = time.perf_counter() - start
    total_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"kind": "serve", "peer": "fastgpt offline", "rate": math.inf, "concurrency": len(reqs),
            "completed": len(outs), "failed": 0, "duration_s": duration,
            "total_input": sum(len(o.prompt_token_ids) for o in outs), "total_output": total_out,
            "request_throughput": len(outs) / duration, "output_throughput": total_out / duration}


# ----------------------------------------------------------------------------------------- reporting
COLUMNS = SERVE_COLUMNS  # the report renders serve rows of `fastgpt bench serve` with the same table


def own_cpu_s(row: dict) -> float | None:
    """CPU seconds the peer itself used in the run: its server process, or this process for the offline engine."""
    cpu = row.get("cpu_s") or {}
    return cpu.get("bench" if row["peer"] == "fastgpt offline" else row["peer"])


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def targets(rows: list[dict]) -> list[str]:
    """The issue's two CPU targets, at rate inf, as sentences (with the numbers)."""
    def at_inf(peer):
        return next((r for r in rows if r["peer"] == peer and math.isinf(r["rate"]) and r["completed"]), None)

    def cpu_ratio(a, b):  # b's CPU seconds per output token over a's: stable where wall time is not
        ca, cb = own_cpu_s(a), own_cpu_s(b)
        if not ca or not cb:
            return ""
        peer_per_token, ours_per_token = cb / b["total_output"], ca / a["total_output"]
        return f"; CPU per output token: {peer_per_token / ours_per_token:.2f}x as much for the peer"

    ours, offline, hf = at_inf("fastgpt serve"), at_inf("fastgpt offline"), at_inf("transformers serve")
    lines = []
    if ours and offline:
        ratio = ours["output_throughput"] / offline["output_throughput"]
        lines.append(f"fastgpt serve / offline engine output tok/s = {ratio:.2f} (target >= {TARGET_VS_OFFLINE}): "
                     f"{'met' if ratio >= TARGET_VS_OFFLINE else 'NOT met'}{cpu_ratio(ours, offline)}")
    threaded = at_inf(THREAD_PEER)
    if ours and threaded:
        ratio = ours["output_throughput"] / threaded["output_throughput"]
        lines.append(f"fastgpt serve (engine process) / {THREAD_PEER} output tok/s = {ratio:.2f}x"
                     f"{cpu_ratio(ours, threaded)}")
    if ours and hf:
        ratio = ours["output_throughput"] / hf["output_throughput"]
        lines.append(f"fastgpt serve / transformers serve output tok/s = {ratio:.2f}x (target >= "
                     f"{TARGET_VS_TRANSFORMERS}x): {'met' if ratio >= TARGET_VS_TRANSFORMERS else 'NOT met'}"
                     f"{cpu_ratio(ours, hf)}")
    return lines


def render(doc: dict, markdown: bool = False) -> str:
    from benchmarks.report import format_table

    rows = [{**r, "rate_label": _rate_label(r["rate"]), "own_cpu_s": own_cpu_s(r)} for r in doc["rows"]]
    s = doc["settings"]
    head = (f"{doc['device_name']} ({doc['device']}); torch {doc['torch']}; {doc['date']}; "
            f"commit {doc.get('git_commit')}; load average {doc.get('load_average')}")
    work = (f"{s['num_requests']} requests, prompt {s['prompt_len']} tokens, output {s['output_len']} tokens, "
            f"greedy, {s['threads']} torch thread(s) per peer; the median of {s['repeats']} repeat(s); times in ms")
    title = "# fastgpt serving benchmark\n\n" if markdown else ""
    out = [title + head, work, "", format_table(rows, COLUMNS, markdown)]
    notes = doc.get("targets", []) + doc.get("notes", [])
    if notes:
        out += [""] + [("- " if markdown else "* ") + n for n in notes]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    """TTFT and TPOT percentiles, and output tok/s, against request rate (inf drawn at the right end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from fastgpt.load import atomic_write

    served = [r for r in rows if r["peer"] != "fastgpt offline" and r["completed"]]
    finite = sorted({r["rate"] for r in served if not math.isinf(r["rate"])})
    inf_x = (finite[-1] * 2) if finite else 1.0

    def x(rate):
        return inf_x if math.isinf(rate) else rate

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, peer in enumerate(dict.fromkeys(r["peer"] for r in served)):
        color = f"C{i}"
        series = sorted((r for r in served if r["peer"] == peer), key=lambda r: x(r["rate"]))
        xs = [x(r["rate"]) for r in series]
        for ax, metric in zip(axes[:2], ("ttft", "tpot")):
            ax.plot(xs, [r[f"median_{metric}_ms"] for r in series], "o-", color=color, label=f"{peer} p50")
            ax.plot(xs, [r[f"p99_{metric}_ms"] for r in series], "s--", color=color, label=f"{peer} p99")
        axes[2].plot(xs, [r["output_throughput"] for r in series], "o-", color=color, label=peer)
    for r in rows:
        if r["peer"] == "fastgpt offline":
            axes[2].axhline(r["output_throughput"], color="grey", ls=":", label="fastgpt offline engine")
    ticks = finite + [inf_x]
    for ax, (ylabel, name) in zip(axes, (("TTFT (ms)", "time to first token"), ("TPOT (ms)", "time per output token"),
                                         ("output tokens/s", "output throughput"))):
        ax.set(xscale="log", xlabel="request rate (req/s)", ylabel=ylabel, title=name)
        if ax is not axes[2]:
            ax.set_yscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["inf"])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ gpu_check
def gpt2_checkpoint(path: str, smoke: bool = False) -> str:
    """A gpt2-shaped checkpoint (124M parameters; tiny with smoke) with random weights and the bundled
    tokenizer, written to path. The tokenizer knows only the first 4096 of gpt2's 50257 ids, so the
    embedding rows past it are zeroed: their logits are then exactly 0 while the known ids' random
    logits reach above 0, so greedy decoding stays inside the tokenizer and every token streams as text.
    The shapes, and so the cost of every step, are gpt2's."""
    import torch

    from fastgpt import GPT, GPTConfig, Tokenizer, default_model_dir

    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    shape = dict(n_layer=2, n_head=4, n_embd=128, n_positions=512) if smoke else {}
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", eos_token_id=tokenizer.eos_token_id, **shape))
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.vocab_size:] = 0
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


def gpu_check_section(device, smoke: bool = False, log=None) -> tuple[list[dict], list[str]]:
    """benchmarks/gpu_check.py's serving benchmark: fastgpt serve on `device` with a gpt2-shaped model,
    256 requests (prompts 64-256 tokens, outputs 64-256) at 64 concurrent streams, all sent at once;
    (rows, notes) with the goal (TTFT p50 <= 20 ms, TPOT p50 <= 5 ms on an H200) checked."""
    from fastgpt import Tokenizer, default_model_dir

    log = log or (lambda msg: print(f"[bench_serve] {msg}", file=sys.stderr, flush=True))
    n, lengths, concurrency = (8, (8, 16), 4) if smoke else (256, (64, 256), 64)
    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    reqs = make_requests(tokenizer, n, lengths, lengths, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = gpt2_checkpoint(os.path.join(tmp, "gpt2-random"), smoke)
        with ServerProcess("--model", model_dir, "--device", str(device), "--served-model-name", "gpt2",
                           "--max-num-seqs", "256") as server:
            served = Served("fastgpt serve", server.url + "/v1/completions", [fastgpt_body(r, "gpt2") for r in reqs])
            served.warm_up(0)
            row = served.measure(reqs, math.inf, concurrency, 0, log)
    rows = [row]
    row["model"] = "gpt2-shaped, random weights" + (" (smoke: tiny)" if smoke else "")
    ok = row["median_ttft_ms"] <= GPU_GOAL_TTFT_MS and row["median_tpot_ms"] <= GPU_GOAL_TPOT_MS
    notes = [f"serving ({row['model']}, {n} requests, {concurrency} concurrent streams): TTFT p50 "
             f"{row['median_ttft_ms']:.1f} ms, TPOT p50 {row['median_tpot_ms']:.2f} ms, ITL p50 "
             f"{row['median_itl_ms']:.2f} ms, {row['output_throughput']:.0f} output tok/s; goal TTFT p50 <= "
             f"{GPU_GOAL_TTFT_MS:g} ms and TPOT p50 <= {GPU_GOAL_TPOT_MS:g} ms on an H200: "
             + (("met" if ok else "NOT met") if str(device).startswith("cuda") else "no verdict (CPU dry run)")]
    if row["failed"]:
        raise RuntimeError(f"{row['failed']} serving request(s) failed, e.g. {row.get('first_error')}")
    return rows, notes


# ------------------------------------------------------------------------------------------------ run
def _parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text}")
    return lo, hi


def _parse_rates(text: str) -> list[float]:
    rates = [math.inf if t.strip() == "inf" else float(t) for t in text.split(",")]
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0 or inf, got {text}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="benchmark this running fastgpt server instead of starting one")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the bundled model)")
    p.add_argument("--served-model-name", default=None, help="the model name to send with --url")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=_parse_range, default=(16, 128), help="A:B tokens (uniform)")
    p.add_argument("--output-len", type=_parse_range, default=(16, 128), help="C:D tokens (uniform)")
    p.add_argument("--request-rates", type=_parse_rates, default=[math.inf],
                   help="comma-separated req/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--peers", default="transformers,offline",
                   help="comma-separated peers besides fastgpt serve: transformers, offline, thread (fastgpt "
                        "serve --engine-thread: the engine on the server's own thread), or none")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every peer (default: cores - 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each peer and rate this many times, taking turns; the table shows the median")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<machine>/)")


def measure(args) -> dict:
    """Every peer under the workload of args: the results document (rows = each peer and rate's median
    run, runs = every run, targets, notes), nothing written."""
    import contextlib

    import torch

    from benchmarks import report
    from fastgpt import Engine, Tokenizer, default_model_dir

    def log(msg):
        print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)

    os.environ["TRITON_INTERPRET"] = "0"  # the offline peer runs the same plain PyTorch path as the server
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    model_dir = args.model or default_model_dir()
    peers = {p.strip() for p in args.peers.split(",")} - {"none", ""}
    unknown = peers - {"transformers", "offline", "thread"}
    if unknown:
        raise ValueError(f"--peers: unknown peer(s) {', '.join(sorted(unknown))}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    reqs = make_requests(tokenizer, args.num_requests, args.prompt_len, args.output_len, args.seed)
    doc = report.environment(args.device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    doc["settings"] = {"num_requests": args.num_requests, "prompt_len": list(args.prompt_len),
                       "output_len": list(args.output_len),
                       "request_rates": [_rate_label(r) for r in args.request_rates],
                       "max_concurrency": args.max_concurrency, "threads": threads, "repeats": args.repeats,
                       "model": model_dir, "url": args.url, "seed": args.seed}
    runs, notes = [], []

    with contextlib.ExitStack() as stack:
        # every peer is up before any is measured, and the repeats take turns, so a change in the machine's
        # load during the run falls on all of them alike (idle, each server costs ~no CPU)
        served = []
        name = args.served_model_name or "bench"
        if args.url:
            url = args.url
        else:
            server = stack.enter_context(ServerProcess(
                "--model", model_dir, "--device", args.device, "--threads", str(threads),
                "--served-model-name", name, "--max-num-seqs", str(args.max_num_seqs)))
            url, pid = server.url, server.pid
        served.append(Served("fastgpt serve", url + "/v1/completions", [fastgpt_body(r, name) for r in reqs],
                             None if args.url else pid))
        if "thread" in peers:
            threaded = stack.enter_context(ServerProcess(
                "--model", model_dir, "--device", args.device, "--threads", str(threads), "--engine-thread",
                "--served-model-name", name, "--max-num-seqs", str(args.max_num_seqs)))
            served.append(Served(THREAD_PEER, threaded.url + "/v1/completions",
                                 [fastgpt_body(r, name) for r in reqs], threaded.pid))
        if "transformers" in peers:
            try:
                blocks = transformers_cpu_cache_blocks(model_dir, args.max_num_seqs) if args.device == "cpu" else None
                hf = TransformersServe(model_dir, args.device, threads, cache_blocks=blocks)
            except (RuntimeError, OSError) as e:
                notes.append(f"transformers serve did not run here: {e}")
                log(notes[-1])
            else:
                stack.callback(hf.stop)
                stack.callback(lambda: hf.proc.poll() is not None and notes.append(
                    f"transformers serve exited during the run (status {hf.proc.returncode}): {hf.tail()}"))
                served.append(Served("transformers serve", hf.url + "/v1/completions",
                                     [transformers_body(r, model_dir) for r in reqs], hf.proc.pid))
        engine = None
        if "offline" in peers:
            torch.set_num_threads(threads)
            engine = Engine.from_pretrained(model_dir, device=args.device, max_num_seqs=args.max_num_seqs)
        for s in served:
            s.warm_up(args.seed)
        pids = {s.peer: s.pid for s in served if s.pid is not None}
        for rate in args.request_rates:
            for repeat in range(args.repeats):
                for s in served:
                    row, cpu = measure_cpu(lambda: s.measure(reqs, rate, args.max_concurrency, args.seed, log), pids)
                    runs.append({**row, "repeat": repeat, "cpu_s": cpu})
                if engine is not None and math.isinf(rate):
                    log(f"fastgpt offline: Engine.generate on the same {len(reqs)} requests")
                    row, cpu = measure_cpu(lambda: offline_row(engine, reqs), pids)
                    runs.append({**row, "repeat": repeat, "cpu_s": cpu})

    doc["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    doc["rows"] = median_runs(runs)
    doc["runs"] = runs
    doc["targets"] = targets(doc["rows"])
    doc["notes"] = notes
    return doc


def run(args) -> int:
    """measure(args), then the table on stdout and serve.json/.md/.png in the results folder."""
    import datetime

    from benchmarks import report
    from fastgpt.load import atomic_write_text

    doc = measure(args)
    machine = report.slug(report.device_name(args.device))
    out_dir = args.out or os.path.join(REPO_ROOT, "benchmarks", "results",
                                       f"{datetime.date.today().isoformat()}-{machine}")
    os.makedirs(out_dir, exist_ok=True)
    sys.stdout.write(render(doc))
    report.write_json(os.path.join(out_dir, "serve.json"), doc)
    atomic_write_text(os.path.join(out_dir, "serve.md"), render(doc, markdown=True))
    try:
        plot(doc["rows"], os.path.join(out_dir, "serve.png"), f"fastgpt serve, {doc['device_name']}")
    except Exception as e:  # the numbers are on disk already
        log(f"plot failed: {type(e).__name__}: {e}")
    print(f"results in {out_dir}")
    return 1 if any(r["failed"] for r in doc["runs"]) else 0


def run_suite(ctx) -> list[dict]:
    """The ``serve`` suite of ``fastgpt bench`` (benchmarks/cli.py): a real server process and the peers
    at rate inf, this module's default workload; 16 shorter requests with --quick; with --smoke 4 tiny ones
    against the offline engine only (transformers serve's start-up alone takes tens of seconds). Rate
    sweeps, repeats and serve.png come from ``python -m benchmarks.bench_serve``."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--device", str(ctx.device)] + (["--model", ctx.model] if ctx.model else [])
    if ctx.smoke:
        argv += ["--num-requests", "4", "--prompt-len", "4:16", "--output-len", "2:6", "--peers", "offline"]
    elif ctx.quick:
        argv += ["--num-requests", "16", "--prompt-len", "16:64", "--output-len", "16:64"]
    doc = measure(p.parse_args(argv))
    ctx.notes += [f"serve: {line}" for line in doc["targets"] + doc["notes"]]
    failed = sum(r["failed"] for r in doc["runs"])
    if failed:
        ctx.errors.append(f"serve: {failed} request(s) failed")
    return [{**r, "rate_label": _rate_label(r["rate"]), "own_cpu_s": own_cpu_s(r)} for r in doc["rows"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
