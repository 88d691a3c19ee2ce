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

    fastgpt bench generate [--quick]                    # through the CLI
    pytest benchmarks/bench_generate.py --benchmark-enable   # pytest-benchmark, skips without CUDA
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from fastgpt.config import GPTConfig
from fastgpt.generate import decode_one_token, generate
from fastgpt.model import GPT

# A small stand-in that keeps GPT-2's vocabulary (so the head is realistic) but almost no body.
TINY = dict(n_layer=2, n_head=4, n_embd=128)
CONTEXTS = (16, 256, 1024)


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
    plan.compiled_models = tuple(plan.models) if cuda else ("tiny",) if not quick or smoke else ()
    if model_path is not None:
        plan.models = [model_path]
        plan.compiled_models = (model_path,) if cuda else ()
        plan.compile_pairs = {(model_path, b) for (_, b) in plan.compile_pairs}
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
    for name in plan.models:
        try:
            rows += _run_model(name, device, dtype, plan, ceilings, notes)
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"generate {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _log(errors[-1])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
