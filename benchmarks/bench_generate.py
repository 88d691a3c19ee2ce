"""End-to-end generation speed: fastgpt against transformers on the same weights.

For each model size and batch:
  * prefill tokens/s  = batch x prompt tokens / time of the prompt's forward pass;
  * decode tokens/s   = batch / time of one decode step;
  * the weight-streaming floor of a decode step = bytes of weights read per step / measured copy
    bandwidth: at small batch a step cannot be faster than streaming every weight once from memory;
  * decode ms per token at contexts 16, 256 and 1024: with a static cache and split-KV attention it should
    stay close to flat (weights dominate; the KV read grows linearly but is small next to them).

Both engines are timed the same way, through their own ``generate``: a call making 1 new token is the
prefill (+ one sampling step); a call making n + 1 new tokens adds n decode steps, so
    decode ms per step = (t(n + 1) - t(1)) / n.
Greedy decoding, no EOS stop, random weights from a fixed seed (or --model's checkpoint); random prompts.
transformers runs eager (its default attention and dynamic cache) and, on CUDA only, with its static cache
and its automatic torch.compile of the decode step. fastgpt's own prefill forward and decode step are also
timed under torch.compile(fullgraph=True) against eager (rows "compiled": every model on CUDA, the tiny
one on a CPU outside --quick).

On a CPU the suite adds the batch-1 decode comparison (rows of kind "cpu_decode"; ``--cpu-decode`` runs
only it): gpt2-sized fp32 weights, a 16-token prompt, 32 greedy tokens; the same tokens out of both
engines (checked); end-to-end tokens/s and decode ms per step of both, as the median over interleaved
pairs (fastgpt, transformers) of each pair's ratio, so a load that drifts during the run hits both sides
alike; fastgpt's step timed directly as well, against two floors measured in each pair: weight bytes /
copy bandwidth (bytes read + written, benchmarks.common's convention) and weight bytes / read-only
bandwidth (a sum over a 256 MB tensor: the traffic pattern of a decode step's weight reads). CPU timings on
a shared machine are noisy: the load average is recorded with them.

    fastgpt bench generate [--quick]                          # through the CLI
    python -m benchmarks.bench_generate [--quick]             # the same suite, a table on stdout
    python -m benchmarks.bench_generate --cpu-decode [--threads N]  # only the CPU batch-1 comparison
    pytest benchmarks/bench_generate.py --benchmark-enable    # pytest-benchmark (decode step, prefill)
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable (for benchmarks.common)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from fastgpt.config import GPTConfig  # noqa: E402
from fastgpt.generate import decode_one_token, generate, prefill  # noqa: E402
from fastgpt.model import GPT  # noqa: E402

# A small stand-in that keeps GPT-2's vocabulary (so the head is realistic) but almost no body.
TINY = dict(n_layer=2, n_head=4, n_embd=128)
CONTEXTS = (16, 256, 1024)


@dataclass
class CpuDecodePlan:
    model: str = "gpt2"
    pairs: int = 5  # interleaved (fastgpt, transformers) pairs; medians of their ratios are reported
    prompt_len: int = 16
    new_tokens: int = 32
    step_reps: int = 15  # direct decode steps timed in each pair (their median is the pair's step)


@dataclass
class Plan:
    models: list[str]
    batches: list[int]
    prompt_len: int
    new_tokens: int
    reps: int
    contexts: tuple[int, ...] = CONTEXTS
    # (model, batch) pairs that also run transformers' static cache + torch.compile (minutes of compiling
    # each); empty off CUDA, where transformers does not auto-compile
    compile_pairs: set = field(default_factory=set)
    position_rep_ms: float = 100.0
    # models whose own prefill and decode step are also timed under torch.compile (fastgpt's ops whole in
    # the graph) against eager: every model on CUDA; on a CPU the tiny one (inductor compiles in seconds)
    compiled_models: tuple = ()
    # the CPU batch-1 comparison (rows of kind "cpu_decode"); None skips it (CUDA)
    cpu_decode: CpuDecodePlan | None = None


def make_plan(device, quick: bool, smoke: bool = False, model_path: str | None = None) -> Plan:
    """Sizes by device and mode. CPU keeps to gpt2 at batch 1 (+ a tiny model) so it stays fast."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if smoke:  # plumbing only: the numbers mean nothing
        plan = Plan(models=["tiny"], batches=[1], prompt_len=8, new_tokens=4, reps=1, contexts=(16, 256),
                    position_rep_ms=1.0)
    elif cuda and quick:
        plan = Plan(models=["gpt2", "gpt2-xl"], batches=[1, 8, 64], prompt_len=128, new_tokens=32, reps=3,
                    compile_pairs={("gpt2", 1)})
    elif cuda:
        plan = Plan(models=["gpt2", "gpt2-xl"], batches=[1, 8, 64], prompt_len=512, new_tokens=64, reps=5,
                    compile_pairs={(m, b) for m in ("gpt2", "gpt2-xl") for b in (1, 8, 64)})
    elif quick:
        plan = Plan(models=["tiny", "gpt2"], batches=[1], prompt_len=64, new_tokens=16, reps=3,
                    position_rep_ms=50.0)
    else:
        plan = Plan(models=["tiny", "gpt2"], batches=[1, 8], prompt_len=128, new_tokens=32, reps=3)
    # compiled rows: on CUDA every model, gpt2 only with --quick (gpu_check's plan: compiling gpt2-xl's 48
    # layers would take minutes of its budget); on a CPU the tiny model outside --quick
    if cuda:
        plan.compiled_models = ("gpt2",) if quick else tuple(plan.models)
    else:
        plan.compiled_models = ("tiny",) if not quick or smoke else ()
    if not cuda:
        plan.cpu_decode = (CpuDecodePlan(model="tiny", pairs=1, prompt_len=8, new_tokens=4, step_reps=3) if smoke
                           else CpuDecodePlan(pairs=3 if quick else 5))
    if model_path is not None:
        plan.models = [model_path]
        plan.compiled_models = (model_path,) if cuda else ()
        plan.compile_pairs = {(model_path, b) for (_, b) in plan.compile_pairs}
        if plan.cpu_decode is not None:
            plan.cpu_decode.model = model_path
    return plan


# ---------------------------------------------------------------------------------------------- models
def build_model(name: str, device, dtype, seed: int = 0) -> tuple[GPT, str]:
    """(model, label): a preset or 'tiny' with seeded random weights, or a local checkpoint dir."""
    device = torch.device(device)
    if name == "tiny" or name in _presets():
        config = GPTConfig(**TINY) if name == "tiny" else GPTConfig.from_preset(name)
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the device itself: gpt2-xl is slow to init on a CPU
            model = GPT(config)
        model = model.to(dtype).eval()
        if device.type == "cpu":
            model.use_cpu_decode_layout()  # as from_pretrained does on CPU
        return model, name
    model = GPT.from_pretrained(name, device=device, dtype=dtype)
    return model, name.rstrip("/").split("/")[-1]


def _presets():
    from fastgpt.config import PRESETS

    return PRESETS


def transformers_peer(model: GPT):
    """transformers' GPT2LMHeadModel holding the same weights as model (same device and dtype), or None
    when transformers is not installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    import transformers

    from fastgpt.load import fastgpt_to_hf

    transformers.logging.set_verbosity_error()  # its generation-config advice would bury the progress lines
    with torch.device(model.device):
        hf = GPT2LMHeadModel(GPT2Config(**model.config.to_hf()))
    hf = hf.to(model.dtype).eval()
    missing, unexpected = hf.load_state_dict(fastgpt_to_hf(model), strict=False)
    left_out = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if left_out or unexpected:
        raise RuntimeError(f"weights did not map onto transformers' GPT-2: missing {left_out}, unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        hf.lm_head.weight = hf.transformer.wte.weight  # tie, as GPT-2 does (and as our model does)
    return hf


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of weights one decode step reads: every parameter once (wte through the tied head), except the
    position table, of which it reads one row."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - wpe.numel() * wpe.element_size()


# ---------------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps: int) -> float:
    """Median wall time of fn() over reps calls after one warm-up call (compiles, allocations, autotuning)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_generate(run, prompt, n: int, device, reps: int) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of run(prompt, new_tokens) from calls making 1 and n + 1 tokens."""
    t_one = median_ms(lambda: run(prompt, 1), device, reps)
    t_more = median_ms(lambda: run(prompt, n + 1), device, reps)
    # a decode step cannot take negative time: a negative difference is noise, shown as such (None)
    step = (t_more - t_one) / n
    return t_one, (step if step > 0 else None)


def _fastgpt_runner(model):
    return lambda prompt, n: generate(model, prompt, n, temperature=0.0)


def _hf_runner(hf, static: bool):
    from transformers import GenerationConfig

    def run(prompt, n):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, cache_implementation="static" if static else None)
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg)

    return run


@torch.inference_mode()
def decode_ms_at_context(model: GPT, batch: int, context: int, rep_ms: float) -> float:
    """ms of one decode step whose cache holds `context` positions (the new token's included).

    The cache is filled with random keys/values (never zeros) rather than by generating up to the
    position: the step's work is the same, and reaching 1024 by generation would take minutes on a CPU."""
    from benchmarks.common import bench_ms

    # one cache length for every context, so only the number of valid positions changes between them
    max_len = max(context, min(model.config.n_positions, max(CONTEXTS)))
    model.setup_caches(max_batch=batch, max_len=max_len)
    for block in model.transformer.h:
        block.attn.kv_cache.k_cache.normal_()
        block.attn.kv_cache.v_cache.normal_()
    g = torch.Generator(device="cpu").manual_seed(context)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=g).to(model.device)
    input_pos = torch.tensor([context - 1], device=model.device)
    seqlens = torch.full((batch,), context, dtype=torch.int32, device=model.device)
    return bench_ms(lambda: decode_one_token(model, tokens, input_pos, seqlens), rep_ms=rep_ms)


@torch.inference_mode()
def compiled_rows(model: GPT, label: str, plan: Plan, dtype) -> list[dict]:
    """The prefill forward and one decode step, each compiled (fullgraph) against eager: rows of kind
    "compiled", at the plan's first batch. generate's own loop stays eager; these are its two calls."""
    from benchmarks.common import compiled_row

    batch, T = plan.batches[0], plan.prompt_len
    device = model.device
    g = torch.Generator(device="cpu").manual_seed(7)
    prompt = torch.randint(0, model.config.vocab_size, (batch, T), generator=g).to(device)
    model.setup_caches(max_batch=batch, max_len=T + 1)
    positions = torch.arange(T, device=device)
    timing = dict(rep_ms=max(plan.position_rep_ms, 1.0), min_reps=3)
    rows = [compiled_row(label, "prefill", f"B={batch} T={T}", dtype,
                         lambda: model(prompt, input_pos=positions, last_only=True), timing, batch * T)]
    tokens, input_pos = prompt[:, -1], torch.tensor([T], device=device)
    seqlens = torch.full((batch,), T + 1, dtype=torch.int32, device=device)
    rows.append(compiled_row(label, "decode step", f"B={batch} context={T + 1}", dtype,
                             lambda: decode_one_token(model, tokens, input_pos, seqlens), timing, batch))
    model.clear_caches()
    return rows


# ------------------------------------------------------------------------------------------------- run
def _log(msg: str) -> None:
    print(f"[bench generate] {msg}", file=sys.stderr, flush=True)


def _row(model_label, batch, plan, dtype, peer, ours, theirs, floor_ms) -> dict:
    (o_pre, o_dec), (p_pre, p_dec) = ours, theirs
    tokens = batch * plan.prompt_len
    return {
        "kind": "generate", "model": model_label, "batch": batch, "prompt_len": plan.prompt_len,
        "new_tokens": plan.new_tokens, "dtype": str(dtype).replace("torch.", ""), "peer": peer,
        "ours_prefill_ms": o_pre, "peer_prefill_ms": p_pre,
        "ours_prefill_tok_s": tokens / (o_pre * 1e-3), "peer_prefill_tok_s": tokens / (p_pre * 1e-3) if p_pre else None,
        "prefill_speedup": p_pre / o_pre if p_pre else None,
        "ours_decode_ms": o_dec, "peer_decode_ms": p_dec,
        "ours_decode_tok_s": batch / (o_dec * 1e-3) if o_dec else None,
        "peer_decode_tok_s": batch / (p_dec * 1e-3) if p_dec else None,
        "decode_speedup": p_dec / o_dec if (p_dec and o_dec) else None,
        "floor_ms": floor_ms, "pct_floor": 100.0 * floor_ms / o_dec if o_dec else None,
    }


def run(device, dtype, plan: Plan, ceilings: dict, notes: list[str] | None = None,
        errors: list[str] | None = None) -> list[dict]:
    """Rows of kind 'generate' (one per model x batch x peer) and 'decode_position' (per context).

    Given an errors list, a model that fails (out of memory, a kernel error) is reported there and the
    next model still runs; without one the exception propagates."""
    device = torch.device(device)
    notes = notes if notes is not None else []
    rows = []
    try:
        import transformers  # noqa: F401
    except ImportError:
        notes.append("transformers is not installed: generation has no peer (pip install 'fastgpt[bench]')")
    jobs = [(name, lambda name=name: _run_model(name, device, dtype, plan, ceilings, notes)) for name in plan.models]
    if plan.cpu_decode is not None and device.type == "cpu":
        jobs.append((f"cpu-decode {plan.cpu_decode.model}", lambda: [cpu_decode_row(plan.cpu_decode, dtype, notes)]))
    for name, job in jobs:
        try:
            rows += job()
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"generate {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _log(errors[-1])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_suite(ctx) -> list[dict]:
    """The ``generate`` suite of ``fastgpt bench`` (see benchmarks/cli.py)."""
    plan = make_plan(ctx.device, ctx.quick, ctx.smoke, ctx.model)
    rows = run(ctx.device, ctx.dtypes[0], plan, ctx.ceilings, ctx.notes, ctx.errors)
    if ctx.device.type == "cpu":
        ctx.notes.append("generation on CPU runs the model's reference path (PyTorch ops), not Triton kernels")
    return rows


def _run_model(name, device, dtype, plan: Plan, ceilings: dict, notes: list[str]) -> list[dict]:
    rows = []
    bandwidth = ceilings["copy_gbs"] * 1e9
    model, label = build_model(name, device, dtype)
    ctx = model.config.n_positions
    if plan.prompt_len + plan.new_tokens + 1 > ctx:
        raise ValueError(f"{label}: context length {ctx} is too short for a {plan.prompt_len}-token prompt "
                         f"+ {plan.new_tokens + 1} new tokens")
    floor_ms = weight_bytes_per_step(model) / bandwidth * 1e3
    hf = transformers_peer(model)
    for batch in plan.batches:
        g = torch.Generator(device="cpu").manual_seed(1000 + batch)
        prompt = torch.randint(0, model.config.vocab_size, (batch, plan.prompt_len), generator=g).to(device)
        _log(f"{label} batch {batch}: fastgpt")
        ours = time_generate(_fastgpt_runner(model), prompt, plan.new_tokens, device, plan.reps)
        model.clear_caches()
        peers = []
        if hf is not None:
            peers.append(("transformers", False))
            if device.type == "cuda" and (name, batch) in plan.compile_pairs:
                peers.append(("transformers static+compile", True))
        if not peers:
            rows.append(_row(label, batch, plan, dtype, None, ours, (None, None), floor_ms))
        for peer, static in peers:
            _log(f"{label} batch {batch}: {peer}")
            try:
                theirs = time_generate(_hf_runner(hf, static), prompt, plan.new_tokens, device, plan.reps)
            except Exception as e:  # a peer that cannot run here is a note, not the end of the run
                notes.append(f"{label} batch {batch}: {peer} failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
                theirs = (None, None)
            if static and getattr(hf, "_compiled_call", None) is None:
                # transformers compiles the decode step itself when it can (it keeps the result in
                # _compiled_call); a version that did not must not be labelled as compiled
                peer = "transformers static cache (not compiled)"
            rows.append(_row(label, batch, plan, dtype, peer, ours, theirs, floor_ms))
    if name in plan.compiled_models:
        rows += compiled_rows(model, label, plan, dtype)
    contexts = [c for c in plan.contexts if c <= ctx]
    if len(contexts) < len(plan.contexts):
        notes.append(f"{label}: contexts above its length {ctx} skipped")
    for c in contexts:
        _log(f"{label} batch {plan.batches[0]}: decode step at context {c}")
        ms = decode_ms_at_context(model, plan.batches[0], c, plan.position_rep_ms)
        rows.append({"kind": "decode_position", "model": label, "batch": plan.batches[0],
                     "dtype": str(dtype).replace("torch.", ""), "context": c, "decode_ms": ms,
                     "floor_ms": floor_ms})
    return rows


# ------------------------------------------------------------------------------- CPU batch-1 decode
CPU_DECODE_GOALS = {"speedup": 1.5, "pct_floor": 70.0}  # issue 15: >= 1.5x transformers, >= 70% of the floor


def read_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    """Measured read-only bandwidth in GB/s: summing a tensor larger than the caches reads each byte once
    and writes almost nothing, which is the traffic pattern of a batch-1 decode step's weight reads."""
    from benchmarks.common import bench_ms

    src = torch.randn(nbytes // 4)
    return nbytes / (bench_ms(src.sum, rep_ms=50) * 1e-3) / 1e9


def _wall_s(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def _direct_step_ms(model: GPT, prompt, max_len: int, reps: int) -> float:
    """Median ms of decode_one_token with the prompt prefilled (a cache of prompt + 1 positions)."""
    T = prompt.shape[1]
    model.setup_caches(max_batch=1, max_len=max_len)
    tokens = prefill(model, prompt).argmax(-1)
    input_pos = torch.tensor([T])
    seqlens = torch.full((1,), T + 1, dtype=torch.int32)
    decode_one_token(model, tokens, input_pos, seqlens)  # warm-up
    return statistics.median(1e3 * _wall_s(lambda: decode_one_token(model, tokens, input_pos, seqlens))
                             for _ in range(reps))


def cpu_decode_row(cp: CpuDecodePlan, dtype, notes: list[str]) -> dict:
    """One row of kind "cpu_decode": fastgpt against transformers at batch 1 on the CPU (see the docstring)."""
    from benchmarks.common import copy_bandwidth_gbs

    load_before = os.getloadavg()[0]
    model, label = build_model(cp.model, "cpu", dtype)
    hf = transformers_peer(model)
    if hf is None:
        notes.append("cpu-decode: transformers is not installed; fastgpt's step against the floor only")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, cp.prompt_len), generator=g)
    n = cp.new_tokens
    ours, theirs = _fastgpt_runner(model), (_hf_runner(hf, static=False) if hf is not None else None)
    _log(f"cpu-decode {label}: warm-up and token check")
    ours_tokens = ours(prompt, n)
    same = torch.equal(ours_tokens, theirs(prompt, n)) if theirs else None
    nbytes = weight_bytes_per_step(model)
    samples: dict[str, list[float]] = {}

    def add(key, value):
        samples.setdefault(key, []).append(value)

    for i in range(cp.pairs):
        _log(f"cpu-decode {label}: pair {i + 1}/{cp.pairs}")
        # alternate which engine goes first, so neither always runs right after the other's allocations
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        t = {}
        for who in order:
            run_ = ours if who == "ours" else theirs
            if run_ is None:
                continue
            t[who] = (_wall_s(lambda: run_(prompt, 1)), _wall_s(lambda: run_(prompt, n)))
        step_ms = _direct_step_ms(model, prompt, cp.prompt_len + n, cp.step_reps)
        copy_gbs, read_gbs = copy_bandwidth_gbs("cpu"), read_bandwidth_gbs()
        add("ours_s", t["ours"][1])
        add("ours_prefill_ms", 1e3 * t["ours"][0])
        add("ours_gen_step_ms", 1e3 * (t["ours"][1] - t["ours"][0]) / (n - 1))
        add("step_ms", step_ms)
        add("copy_gbs", copy_gbs)
        add("read_gbs", read_gbs)
        add("pct_floor", 100 * nbytes / (copy_gbs * 1e9) * 1e3 / step_ms)
        add("pct_read_floor", 100 * nbytes / (read_gbs * 1e9) * 1e3 / step_ms)
        if "theirs" in t:
            hf_step = 1e3 * (t["theirs"][1] - t["theirs"][0]) / (n - 1)
            add("peer_s", t["theirs"][1])
            add("peer_prefill_ms", 1e3 * t["theirs"][0])
            add("peer_step_ms", hf_step)
            add("speedup", t["theirs"][1] / t["ours"][1])
            if hf_step > 0 and samples["ours_gen_step_ms"][-1] > 0:  # a negative difference is noise
                add("decode_speedup", hf_step / samples["ours_gen_step_ms"][-1])
    med = {k: statistics.median(v) for k, v in samples.items()}
    model.clear_caches()
    return {
        "kind": "cpu_decode", "model": label, "batch": 1, "dtype": str(dtype).replace("torch.", ""),
        "prompt_len": cp.prompt_len, "new_tokens": n, "pairs": cp.pairs, "threads": torch.get_num_threads(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
        "same_tokens": same, "peer": "transformers" if hf is not None else None,
        "ours_tok_s": n / med["ours_s"], "peer_tok_s": n / med["peer_s"] if "peer_s" in med else None,
        "speedup": med.get("speedup"),
        "ours_prefill_ms": med["ours_prefill_ms"], "peer_prefill_ms": med.get("peer_prefill_ms"),
        "ours_step_ms": med["step_ms"], "ours_step_ms_from_generate": med["ours_gen_step_ms"],
        "peer_step_ms": med.get("peer_step_ms"), "decode_speedup": med.get("decode_speedup"),
        "weight_mb": nbytes / 1e6,
        "copy_gbs": med["copy_gbs"], "floor_ms": nbytes / (med["copy_gbs"] * 1e9) * 1e3, "pct_floor": med["pct_floor"],
        "read_gbs": med["read_gbs"], "read_floor_ms": nbytes / (med["read_gbs"] * 1e9) * 1e3,
        "pct_read_floor": med["pct_read_floor"],
    }


def format_cpu_decode(r: dict) -> str:
    """The text table of one cpu_decode row, with the issue's goals."""
    def goal(value, target, unit):
        return f"(goal {target:g}{unit}: {'yes' if value is not None and value >= target else 'NO'})"

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    return "\n".join([
        f"CPU greedy generation, {r['model']} ({r['dtype']}), batch 1, prompt {r['prompt_len']}, {r['new_tokens']} "
        f"new tokens, {r['threads']} threads; medians of {r['pairs']} interleaved pairs; load average "
        f"{r['load_avg_before']:.1f} before, {r['load_avg_after']:.1f} after",
        f"  same tokens as transformers: {r['same_tokens']}",
        f"  {'':24}{'fastgpt':>10}{'transformers':>14}",
        f"  {'end-to-end tokens/s':24}{r['ours_tok_s']:>10.1f}{f(r['peer_tok_s'], '.1f'):>14}"
        f"   speedup {f(r['speedup'], '.2f')}x {goal(r['speedup'], CPU_DECODE_GOALS['speedup'], 'x')}",
        f"  {'prefill + 1 token ms':24}{r['ours_prefill_ms']:>10.1f}{f(r['peer_prefill_ms'], '.1f'):>14}",
        f"  {'decode ms / step':24}{r['ours_step_ms_from_generate']:>10.1f}{f(r['peer_step_ms'], '.1f'):>14}"
        f"   speedup {f(r['decode_speedup'], '.2f')}x {goal(r['decode_speedup'], CPU_DECODE_GOALS['speedup'], 'x')}"
        " (both from their generate)",
        f"  fastgpt's decode_one_token timed directly: {r['ours_step_ms']:.1f} ms/step",
        f"  weight-streaming floor: {r['weight_mb']:.0f} MB / {r['copy_gbs']:.1f} GB/s copy = "
        f"{r['floor_ms']:.1f} ms/step; fastgpt's step is at {r['pct_floor']:.0f}% of it "
        f"{goal(r['pct_floor'], CPU_DECODE_GOALS['pct_floor'], '%')}",
        f"  read-only floor:        {r['weight_mb']:.0f} MB / {r['read_gbs']:.1f} GB/s read = {r['read_floor_ms']:.1f}"
        f" ms/step; fastgpt's step is at {r['pct_read_floor']:.0f}% of it",
    ])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-decode", action="store_true",
                   help="only the CPU batch-1 comparison with transformers and the floor")
    p.add_argument("--quick", action="store_true", help="fewer sizes (3 pairs instead of 5 for --cpu-decode)")
    p.add_argument("--smoke", action="store_true", help="the tiniest sizes: plumbing only")
    p.add_argument("--model", default=None, help="a local GPT-2 checkpoint instead of random weights")
    p.add_argument("--device", default="cpu" if not torch.cuda.is_available() else "cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both engines (default: torch's); 1 avoids OpenMP stalls on a machine "
                        "shared with other busy processes")
    p.add_argument("--json", default=None, help="also write the results document as JSON here")
    args = p.parse_args(argv)
    previous, previous_threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"  # time the engine, never Triton's interpreter
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return _main(args, p)
    finally:  # undone for callers that share the process (tests)
        torch.set_num_threads(previous_threads)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _main(args, p) -> int:
    from benchmarks import report
    from benchmarks.common import measure_ceilings

    device = torch.device(args.device)
    plan = make_plan(device, args.quick, args.smoke, args.model)
    doc = report.environment(device)
    notes: list[str] = []
    if args.cpu_decode:
        if device.type != "cpu" or plan.cpu_decode is None:
            p.error("--cpu-decode runs on the CPU (--device cpu)")
        rows = [cpu_decode_row(plan.cpu_decode, torch.float32, notes)]
        print(format_cpu_decode(rows[0]))
        for note in notes:
            print(f"  * {note}")
        ceilings = {"copy_gbs": rows[0]["copy_gbs"]}
    else:
        ceilings = measure_ceilings(device)
        rows = run(device, torch.float32 if device.type == "cpu" else torch.bfloat16, plan, ceilings, notes)
    doc.update({"settings": {"suite": "generate", "cpu_decode_only": args.cpu_decode, "quick": args.quick,
                             "smoke": args.smoke, "model": args.model, "cpu_threads": torch.get_num_threads()},
                "ceilings": ceilings, "rows": rows, "notes": notes, "errors": []})
    if not args.cpu_decode:
        sys.stdout.write(report.render(doc))
    if args.json:
        report.write_json(args.json, doc)
    return 0


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # `fastgpt bench` needs no pytest; without it the pytest-benchmark tests are not defined
    pytest = None

if pytest is not None:
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @cuda_only
    @pytest.mark.parametrize("batch", [1, 8, 64])
    def test_decode_step_gpt2(benchmark, batch):
        model, _ = build_model("gpt2", "cuda", torch.bfloat16)
        model.setup_caches(batch, 1024)
        for block in model.transformer.h:  # a cache of random keys/values, never zeros
            block.attn.kv_cache.k_cache.normal_()
            block.attn.kv_cache.v_cache.normal_()
        tokens = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")
        pos = torch.tensor([255], device="cuda")
        seqlens = torch.full((batch,), 256, dtype=torch.int32, device="cuda")

        def step():
            with torch.inference_mode():
                decode_one_token(model, tokens, pos, seqlens)
            torch.cuda.synchronize()

        benchmark(step)

    @cuda_only
    @pytest.mark.parametrize("batch", [1, 8])
    def test_prefill_gpt2(benchmark, batch):
        model, _ = build_model("gpt2", "cuda", torch.bfloat16)
        prompt = torch.randint(0, model.config.vocab_size, (batch, 512), device="cuda")

        def run_prefill():
            generate(model, prompt, 1)
            torch.cuda.synchronize()

        benchmark(run_prefill)

    # CPU batch 1 (the cpu-decode comparison through pytest-benchmark): a gpt2 generate takes a second or
    # more on a CPU, so a few fixed rounds rather than pytest-benchmark's calibration
    @pytest.fixture(scope="module")
    def cpu_models():
        pytest.importorskip("transformers")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")  # the reference path, never Triton's interpreter
            model, _ = build_model("gpt2", "cpu", torch.float32)
            prompt = torch.randint(0, model.config.vocab_size, (1, CpuDecodePlan.prompt_len),
                                   generator=torch.Generator().manual_seed(0))
            yield model, transformers_peer(model), prompt

    @pytest.mark.parametrize("engine", ["fastgpt", "transformers"])
    def test_generate_cpu(benchmark, cpu_models, engine):
        model, hf, prompt = cpu_models
        run_ = _fastgpt_runner(model) if engine == "fastgpt" else _hf_runner(hf, static=False)
        n = CpuDecodePlan.new_tokens
        benchmark.extra_info["new_tokens"] = n
        out = benchmark.pedantic(run_, args=(prompt, n), rounds=3, iterations=1, warmup_rounds=1)
        assert out.shape == (1, prompt.shape[1] + n)

    def test_decode_step_cpu(benchmark, cpu_models):
        model, _, prompt = cpu_models
        T = prompt.shape[1]
        with torch.inference_mode():
            model.setup_caches(max_batch=1, max_len=T + CpuDecodePlan.new_tokens)
            tokens = prefill(model, prompt).argmax(-1)
        input_pos = torch.tensor([T])
        seqlens = torch.full((1,), T + 1, dtype=torch.int32)
        step = torch.inference_mode()(decode_one_token)
        benchmark.extra_info["weight_bytes"] = weight_bytes_per_step(model)
        logits = benchmark.pedantic(step, args=(model, tokens, input_pos, seqlens), rounds=10, iterations=1,
                                    warmup_rounds=2)
        assert logits.shape == (1, model.config.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
