"""The engine: requests in, tokens out, many requests at once over one paged KV cache.

    engine = Engine.from_pretrained("gpt2", device="cuda")
    outs = engine.generate(["Hello", "The os module"], SamplingParams(max_tokens=32, temperature=0))

Offline, ``generate`` runs everything to completion; online (a server), ``add_request`` queues a request
and every ``step`` runs one batch and returns what changed. One step:

    scheduler.schedule()   which sequences run, and how many tokens each (scheduler.py)
    runner.execute()       one packed ragged forward pass over the paged cache (runner.py)
    sample()               per-request parameters and generators (sampling.py)
    _process()             append tokens, fork n > 1 samples, detokenise, stop checks, free blocks

Defaults that depend on the device (each can be given instead):
  * max_num_batched_tokens: 512 on CPU (gpt2's fp32 MLP matmul ran as fast per row at 512 rows as at 1024
    and 2048 on the 2-core development machine, and a mixed step stays short enough that decoding
    requests keep flowing); 8192 on CUDA (enough rows to fill the GPU in a prefill, vLLM's offline default).
  * num_blocks: on CPU, a 1 GiB cache (less if max_num_seqs full-context sequences need less); on CUDA,
    80% of the memory free once the model is loaded (the rest is headroom for activations, logits and
    the CUDA graphs' pool). Either way at least one full-context sequence fits.
  * prepack_weights: on CPU, the fp32 projection weights get oneDNN-packed copies, which every step's
    batched products read (gpt2: a 32-row decode step's linears and MLPs 2x, prefill steps 1.3-1.4x),
    for one more copy of them in memory (0.5 GB for gpt2); nothing on CUDA.

Tensor parallelism: give the engine a model sharded by heads across a torchrun launch
(``Engine.from_pretrained(..., tp=N)`` on every rank, or ``Engine(parallel.load_tensor_parallel(...))``),
and make the same calls on every rank, with the same arguments in the same order (``generate``, or
add_request / abort_request / step). Every rank then runs the same deterministic schedule and nothing is
broadcast per step: the scheduler and the block manager decide from those calls alone (no clock, no
randomness), the logits are results of the same collectives (bit for bit the same on every rank), and the
generators are seeded alike (a request's seed; the shared one from rank 0's seed, sent once). When the
engine is made, the ranks agree on its settings (a mismatch is the same ValueError on every rank) and on
the KV-cache size: the cache holds the rank's own heads, and on CUDA the blocks are those that fit in
every rank's free memory. Only the server needs more: rank 0 takes the requests and hands each step's
inputs to the other ranks (``fastgpt.parallel.Lockstep``, serve/engine_loop.py).

CUDA graphs are off under tensor parallelism (GRAPHS_OFF_UNDER_TP says why); the steps run eagerly.
"""

from __future__ import annotations

import os

import torch

from fastgpt.engine.block_manager import BlockManager
from fastgpt.engine.params import MAX_LOGPROBS, RequestOutput, SamplingParams
from fastgpt.engine.runner import ModelRunner, bytes_per_block
from fastgpt.engine.sampling import SampleRows, sample
from fastgpt.engine.scheduler import ScheduledBatch, Scheduler
from fastgpt.engine.sequence import Request, Sequence, add_text

CPU_MAX_BATCHED_TOKENS = 512
CUDA_MAX_BATCHED_TOKENS = 8192
CPU_KV_CACHE_BYTES = 1 << 30
CUDA_KV_CACHE_FRACTION = 0.8
# Capturing a step whose all-reduces are NCCL calls is possible (ProcessGroupNCCL skips its watchdog while
# a stream captures), but it could not be tried without several GPUs, and it adds ways for ranks to part:
# a rank whose capture fails would run eagerly while the others replay, their collectives no longer pair
# up and every rank hangs; and destroy_process_group is reported to hang after NCCL work was captured
# (pytorch/pytorch#115388). Until a multi-GPU run validates it, TP steps run eagerly.
GRAPHS_OFF_UNDER_TP = "off under tensor parallelism (not validated with NCCL collectives in the graph)"


def default_num_blocks(model, block_size: int, max_num_seqs: int) -> int:
    """KV-cache blocks when num_blocks is not given: on CUDA, CUDA_KV_CACHE_FRACTION of the free memory;
    on CPU, CPU_KV_CACHE_BYTES, or less when max_num_seqs full-context sequences need less. Never fewer
    than one full-context sequence needs. Blocks hold this process's heads; under tensor parallelism every
    rank must call this, and all get the smallest count of any rank (the same block tables run on each)."""
    per_block = bytes_per_block(model, block_size)
    full_context = -(-model.config.n_positions // block_size)
    if model.device.type == "cuda":
        budget = CUDA_KV_CACHE_FRACTION * torch.cuda.mem_get_info(model.device)[0]
        blocks = int(budget // per_block)
    else:
        blocks = min(int(CPU_KV_CACHE_BYTES // per_block), max_num_seqs * full_context)
    blocks = max(blocks, full_context)
    tp = _tensor_parallel_group(model)
    return blocks if tp is None else tp.min(blocks)


def _tensor_parallel_group(model):
    from fastgpt import parallel  # torch.distributed, only where a model might be sharded

    return parallel.tensor_parallel_group(model)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class Engine:
    def __init__(self, model, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, cuda_graphs: bool = True, compile: bool = False,
                 prepack_weights: bool = True):
        """model: a fastgpt GPT (any device and dtype it supports), whole or this rank's shard (then every
        rank makes its engine alike; see the module docstring); tokenizer: a fastgpt Tokenizer, or None for
        token-id prompts only (outputs then have no text). compile: run each step's packed forward through
        torch.compile (see runner.py; the first steps of each kind pay the compilation). prepack_weights:
        on a CPU, give the model's fp32 projection weights oneDNN-packed copies for the batched products
        (GPT.prepack_cpu_weights; one more copy of the weights in memory); ignored on CUDA."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.device
        self.tp = _tensor_parallel_group(model)  # None on one device
        if compile and self.tp is not None:
            raise ValueError("compile=True compiles the step of one device; it is not supported under tensor "
                             "parallelism")
        cuda = self.device.type == "cuda"
        self.block_size = _positive_int("block_size", block_size)
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = CUDA_MAX_BATCHED_TOKENS if cuda else CPU_MAX_BATCHED_TOKENS
        self.max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, max_num_seqs)
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        if self.tp is not None:  # the same schedule on every rank needs the same settings
            self.tp.check_same("the engine's settings", dict(
                block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
                device_type=self.device.type, dtype=str(model.dtype), tokenizer=type(tokenizer).__name__))
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, self.max_num_seqs, cuda_graphs and self.tp is None,
                                  compile=compile, prepack_weights=prepack_weights)
        if cuda and cuda_graphs and self.tp is not None:
            self.runner.graph_error = GRAPHS_OFF_UNDER_TP
        self.generator = torch.Generator(device=self.device)  # unseeded requests share it
        if self.tp is None:
            self.generator.seed()
        else:  # every rank draws the same noise for them
            self.tp.shared_seed(self.generator)
        self.requests: dict[str, Request] = {}
        self._next_id = 0
        self._counters = dict(steps=0, computed_tokens=0, generated_tokens=0, finished_requests=0)

    @classmethod
    def from_pretrained(cls, path_or_name=None, device=None, dtype=None, tp: int = 1, **options) -> "Engine":
        """An HF GPT-2 dir or hub name (None: the bundled default model) with its tokenizer, on device
        (None: CUDA when there is one, else the CPU) in dtype (None: fp32 on CPU, bf16 on CUDA).

        tp > 1: the model sharded by heads over the tp processes of a torchrun launch (every rank calls
        this alike; on CUDA each takes the GPU of its LOCAL_RANK). The process group is joined here unless
        it exists; ``fastgpt.parallel.destroy_process_group()`` leaves it."""
        from fastgpt import GPT, Tokenizer, default_model_dir, parallel
        from fastgpt.load import resolve_model_dir

        model_dir = default_model_dir() if path_or_name is None else resolve_model_dir(path_or_name)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir}: no config.json (not a GPT-2 checkpoint dir)")
        if _positive_int("tp", tp) > 1:
            _, device = parallel.launch_tensor_parallel(tp, device)
            model = parallel.load_tensor_parallel(model_dir, device=device, dtype=dtype)
        else:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = GPT.from_pretrained(model_dir, device=device, dtype=dtype)
        return cls(model, Tokenizer.from_pretrained(model_dir), **options)

    # ------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        """Queue a request: prompt is a string (needs the tokenizer) or a list of token ids. A request that
        can never run raises ValueError here, and nothing else changes."""
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        ctx, n = self.config.n_positions, params.n
        if len(ids) + params.max_tokens > ctx:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the context "
                             f"length {ctx}")
        kv_tokens = len(ids) + params.max_tokens - 1  # the last token is sampled, never computed
        if self.block_manager.blocks_for(kv_tokens) > self.num_blocks:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} needs more KV-cache "
                             f"than the engine has ({self.num_blocks} blocks of {self.block_size} tokens)")
        if n > self.max_num_seqs:
            raise ValueError(f"n={n} samples exceed max_num_seqs={self.max_num_seqs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: the engine was made without one")
        if params.logprobs is not None and params.logprobs > min(MAX_LOGPROBS, self.config.vocab_size):
            raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary of {self.config.vocab_size}")
        generators = [None] * n
        if params.seed is not None:  # sample i gets seed + i, so n seeded samples differ and repeat
            generators = [torch.Generator(device=self.device).manual_seed(params.seed + i) for i in range(n)]
        request = Request(request_id, ids, params, self._eos_token_id(), generators)
        seq = self._new_sequence(request, 0, list(ids))
        seq.num_forks = n - 1
        request.seqs.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return self.config.eos_token_id if eos is None else eos

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: the engine was made without one; pass token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.tolist() if prompt.dim() == 1 else None
            if ids is None:
                raise ValueError(f"a prompt tensor must be 1-D, got shape {tuple(prompt.shape)}")
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        V = self.config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"prompt token {t!r} is not a token id in [0, {V})")
        return ids

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        want = request.params.logprobs is not None
        return Sequence(request, index, token_ids, request.generators[index],
                        logprobs=[] if want else None, top_logprobs=[] if want else None)

    def abort_request(self, request_id: str) -> None:
        """Drop a request (unknown or finished ids are ignored); its blocks are freed now."""
        request = self.requests.pop(str(request_id), None)
        if request is not None:
            for seq in request.seqs:
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one batch; the RequestOutputs of the requests that changed (finished ones for the last time)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.runner.execute(batch)
        return self._process(batch, logits)

    def _process(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        bm, bs = self.block_manager, self.block_size
        self._counters["steps"] += 1
        sampling: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            self._counters["computed_tokens"] += n
            full = seq.num_computed // bs
            if full > seq.num_hashed_blocks:
                seq.last_hash = bm.cache_full_blocks(seq.block_table, seq.token_ids, seq.num_hashed_blocks, full,
                                                     seq.last_hash)
                seq.num_hashed_blocks = full
            if seq.num_computed == len(seq.token_ids):
                sampling.append(seq)

        rows, targets = [], []  # targets[s]: (sequence, or (parent, sample index) of a sample to fork)
        for r, seq in enumerate(sampling):
            rows.append(r)
            targets.append(seq)
            for i in range(1, 1 + seq.num_forks):
                rows.append(r)
                targets.append((seq, i))
        what = SampleRows(rows, [t.params if isinstance(t, Sequence) else t[0].params for t in targets],
                          [t.generator if isinstance(t, Sequence) else t[0].request.generators[t[1]]
                           for t in targets])
        drawn = sample(logits, what, self.generator)

        changed: dict[str, Request] = {}
        grown: list[Sequence] = []
        for s, target in enumerate(targets):
            if isinstance(target, tuple):
                target = self._fork(*target)
            self._append(target, drawn.tokens[s], drawn.logprobs[s], drawn.top_logprobs[s])
            grown.append(target)
            changed[target.request.request_id] = target.request
        self._detokenize(grown)
        for seq in grown:
            if not seq.finished and seq.num_output_tokens >= seq.params.max_tokens:
                seq.finish_reason = "length"
            if seq.finished:
                self.scheduler.finish(seq)
        outputs = []
        for request in changed.values():
            outputs.append(request.output())
            if request.finished:
                del self.requests[request.request_id]
                self._counters["finished_requests"] += 1
        return outputs

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """Sample `index` of parent's request, from the logits of its prompt: it shares the prompt's full
        blocks (one more reference each) and recomputes only the partial last block, into its own."""
        shared = parent.num_prompt_tokens // self.block_size
        child = self._new_sequence(parent.request, index, list(parent.request.prompt_token_ids))
        child.block_table = self.block_manager.share(parent.block_table[:shared])
        child.num_computed = shared * self.block_size
        child.num_hashed_blocks = min(parent.num_hashed_blocks, shared)
        child.last_hash = parent.last_hash if parent.num_hashed_blocks == shared else child.last_hash
        parent.num_forks -= 1
        parent.request.seqs.append(child)
        self.scheduler.running.append(child)
        return child

    def _append(self, seq: Sequence, token: int, logprob, top) -> None:
        seq.token_ids.append(token)
        self._counters["generated_tokens"] += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top)
        if token in seq.request.stop_token_ids:
            seq.finish_reason = "stop"  # the token stays in token_ids, not in the text
        elif self.tokenizer is not None:
            seq.pending.append(token)

    def _detokenize(self, seqs: list[Sequence]) -> None:
        todo = [s for s in seqs if s.pending]
        if not todo:
            return
        windows = [s.pending for s in todo]
        decode_batch = getattr(self.tokenizer, "decode_batch", None)
        texts = decode_batch(windows) if decode_batch else [self.tokenizer.decode(w) for w in windows]
        for seq, text in zip(todo, texts):
            final = seq.finished or seq.num_output_tokens >= seq.params.max_tokens
            add_text(seq, text, final)

    # -------------------------------------------------------------------------------------- offline
    def generate(self, prompts, sampling_params=None, progress: bool = False) -> list[RequestOutput]:
        """Run prompts (strings or lists of token ids) to completion; outputs in input order.

        sampling_params: one SamplingParams for all, or one per prompt (default: SamplingParams()). Every
        request is checked before any runs. Requests queued with add_request run alongside; their
        outputs are not part of the result."""
        if isinstance(prompts, (str, torch.Tensor)) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(f"generate-{self._next_id}")
                self._next_id += 1
                self.add_request(ids[-1], prompt, p)
        except Exception:
            for request_id in ids:
                self.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", dynamic_ncols=True)
        wanted = set(ids)
        tokens_before = self._counters["generated_tokens"]
        try:
            while len(results) < len(ids):
                steps = self._counters["steps"]
                outputs = self.step()
                if self._counters["steps"] == steps:  # nothing could be scheduled: a bug, not a wait
                    raise RuntimeError(f"the engine made no progress with {len(ids) - len(results)} requests "
                                       f"unfinished: {self.stats()}")
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    elapsed = bar.format_dict["elapsed"]
                    made = self._counters["generated_tokens"] - tokens_before
                    bar.set_postfix_str(f"{made / elapsed if elapsed > 0 else 0:.1f} output tok/s", refresh=False)
        finally:
            if bar is not None:
                bar.close()
            for request_id in wanted - set(results):  # interrupted: leave nothing of ours behind
                self.abort_request(request_id)
        return [results[i] for i in ids]

    # ---------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Counters since the engine was made, and the state now."""
        s = self.scheduler
        return {
            "preemptions": s.num_preemptions,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "free_blocks": self.block_manager.num_free_blocks,
            "total_blocks": self.num_blocks,
            "block_size": self.block_size,
            "running": len(s.running),
            "waiting": len(s.waiting),
            **self._counters,
            "cuda_graphs": None if self.runner.graphs is None else self.runner.graphs.sizes,
            "tensor_parallel": 1 if self.tp is None else self.tp.size,
        }
