"""Pretraining and fine-tuning: ``fastgpt train`` and the Python API under it (``train(TrainConfig(...))``).

One run, start to end:
    documents -> tokenizer (given, taken from --init, or trained on the data) -> <out>/data/*.bin (memmap)
    model: from scratch (--preset or explicit sizes) or from a checkpoint (--init gpt2|PATH)
    loop:  AdamW (decay on weight matrices only), linear warm-up then cosine decay, gradient accumulation,
           gradient clipping; validation loss every --eval-interval steps; a checkpoint every
           --checkpoint-interval steps
    end:   the final model (HF GPT-2 dir + tokenizer, in --save-dtype) in <out>, and training.json

Checkpoints are HF GPT-2 dirs under <out>/checkpoints/step-NNNNNN, plus training_state.pt (optimizer
state, step, RNG states of the data sampler and of torch, the run's config): ``--resume`` continues a
killed run exactly where its last checkpoint left it. A checkpoint is written into a hidden temporary dir
and renamed into place, and an old one is renamed away before it is deleted, so a kill at any moment
leaves only complete checkpoints under a checkpoint's name.

Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs data-parallel, DDP or FSDP2 (--fsdp); the
distributed pieces live in ``fastgpt.parallel``. --batch-size is per rank and micro-step: each step's
batch x grad-accum x world windows are drawn as one global batch and split, so N ranks with grad-accum A
train as one process with grad-accum N x A. Rank 0 logs, tokenises and writes the checkpoints (FSDP:
every rank writes its optimizer shard with torch.distributed.checkpoint); a resume needs the same world size.

Ops: the model calls ``kernels``, which dispatches by device. On CUDA a step runs fastgpt's Triton
kernels forward and backward (bf16 autocast, fp32 master weights), and the loss comes from
``model(x, targets=y)``: the fused linear cross-entropy, which never materialises the logits. On a CPU
the same calls take the PyTorch reference ops (the loss still chunked). ``--reference-ops`` runs the
plain PyTorch path on every device instead (SDPA attention, materialised logits + F.cross_entropy), for
comparison; the run's log says which path it is on. Dropout (``--dropout``) is GPT-2's resid_pdrop and
embd_pdrop; attention dropout is not supported.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import kernels
from fastgpt import data as datalib
from fastgpt import parallel

CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")  # complete checkpoints only; temporaries are hidden
STATE_FILE = "training_state.pt"
# validation batches are drawn with their own fixed seed, not the run's: every evaluation of every run on
# the same data sees the same windows, so losses compare across steps, seeds and fine-tunes
EVAL_SEED = 1234
DEFAULT_SIZES = dict(n_layer=4, n_head=6, n_embd=192, n_positions=256)  # the bundled model's shape


@dataclass
class TrainConfig:
    out_dir: str
    data: list[str] = field(default_factory=list)  # text files, folders, .jsonl prompt/completion files
    corpus: str | None = None  # "stdlib": pydoc topics + stdlib docstrings, gathered at run time
    # model: from a checkpoint, or from scratch (preset, then explicit sizes on top, else DEFAULT_SIZES)
    init: str | None = None
    preset: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None
    # tokenizer: a dir with tokenizer files; else --init's; else one trained on the training split
    tokenizer: str | None = None
    vocab_size: int = 4096
    # optimisation
    block_size: int | None = None  # default: min(n_positions, 256)
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    dropout: float = 0.0  # resid_pdrop and embd_pdrop of the run (also over a checkpoint's own values)
    reference_ops: bool = False  # the plain PyTorch path (kernels.reference_ops) instead of the kernels
    compile: bool = False  # torch.compile the model's forward + loss (the backward is compiled with it)
    # bookkeeping
    val_fraction: float = 0.05
    eval_interval: int = 100
    eval_iters: int = 20
    checkpoint_interval: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    save_dtype: str = "float32"  # dtype of the final model in out_dir (checkpoints stay fp32)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard instead of DDP

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if not self.data and not self.corpus:
            raise ValueError("no training data: give --data PATH [PATH ...] or --corpus stdlib")
        if self.corpus not in (None, "stdlib"):
            raise ValueError(f"unknown corpus {self.corpus!r}; the only built-in corpus is 'stdlib'")
        sizes = [n for n in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(self, n) is not None]
        if self.init and (self.preset or sizes):
            raise ValueError("--init starts from a checkpoint, whose shape is fixed: drop --preset and sizes")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_interval", "eval_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 byte tokens + <|endoftext|>), got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        from fastgpt.load import parse_dtype

        parse_dtype(self.save_dtype)  # fail now, not after the training


@dataclass
class TrainResult:
    out_dir: str
    step: int
    losses: list[float]  # training loss of every step run in this call, in order (before its update)
    evals: list[dict]  # {"step", "train_loss", "val_loss", "val_ppl"} per validation
    resumed_from: int | None
    seconds: float
    tokens: int


# -------------------------------------------------------------------------------------------- pieces
def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weight matrices; never biases, LayerNorm gains, or the embeddings
    (decaying the tied token embedding would also shrink the output layer toward uniform)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(("wte.weight", "wpe.weight"))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to lr over warmup_steps, then a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def loss_sum_and_count(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the targets that count (not IGNORE_INDEX), and their number.
    The model computes it from its last hidden states (kernels.linear_cross_entropy, whose default
    ignore_index is IGNORE_INDEX, -100): no logits tensor."""
    loss = model(x, targets=y, reduction="sum")
    return loss, int((y != datalib.IGNORE_INDEX).sum())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs (fp32 master weights and optimizer state); fp32 on CPU. The fused ops cast
    for autocast themselves (bf16 GEMMs, fp32 statistics, the residual stream kept fp32)."""
    return torch.bfloat16 if device.type == "cuda" else None


def ops_path(device: torch.device, reference_ops: bool) -> str:
    """Which implementation a training step runs, for the log."""
    if reference_ops:
        return "the PyTorch reference ops (--reference-ops: SDPA attention, materialised logits + F.cross_entropy)"
    if kernels.uses_triton(torch.empty(0, device=device)):
        return ("fastgpt's Triton kernels, forward and backward (layer_norm, gelu_mlp, linear_cross_entropy; "
                "an op without a backward kernel takes PyTorch, see kernels' docstring)")
    return "the PyTorch reference ops (CPU), the loss through the chunked linear cross-entropy"


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, tokens, mask, batch_size: int, block_size: int, iters: int, seed: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, world=None) -> float:
    """Mean loss per target token over `iters` fixed batches (the same ones at every call: comparable).
    With a world of several ranks each evaluates its share of the batches and the sums are reduced."""
    world = world or parallel.World()
    generator = torch.Generator().manual_seed(seed)
    batches = [datalib.sample_batch(tokens, mask, batch_size, block_size, generator) for _ in range(iters)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, weight in parallel.eval_share(world, iters):
        x, y = batches[index]
        with _autocast(device, amp_dtype):
            loss, n = loss_sum_and_count(model, x.to(device), y.to(device))
        total, count = total + weight * float(loss), count + weight * n
    total, count = parallel.sum_across(world, total, count)
    model.train(was_training)
    return total / max(count, 1)


class Progress:
    """One stderr line: rewritten in place on a terminal, one line per update otherwise (logs, pipes)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.open_line = False

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def log(self, text: str) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (hidden temporaries of an interrupted save never match)."""
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := CHECKPOINT_NAME.match(name))]
    return [os.path.join(root, name) for _, name in sorted(found)]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_training_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {ckpt} is not a training checkpoint") from None
    except Exception as e:  # pickle/zip errors: a damaged file
        raise ValueError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the renames are still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: str) -> None:
    """Rename away first, then delete: a kill mid-delete leaves a hidden dir, not a broken checkpoint."""
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale_temporaries(out_dir: str) -> None:
    root = checkpoint_dir(out_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((".step-", ".trash-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(out_dir: str, step: int, model, tokenizer, state: dict, keep: int) -> str:
    return publish_checkpoint(new_checkpoint_dir(out_dir, step), out_dir, step, model, tokenizer, state, keep)


def new_checkpoint_dir(out_dir: str, step: int) -> str:
    """The hidden temporary dir a checkpoint is written into (other ranks may add files to it)."""
    root = checkpoint_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from other users
    return tmp


def publish_checkpoint(tmp: str, out_dir: str, step: int, model, tokenizer, state: dict, keep: int) -> str:
    """Write the weights and the training state into tmp, then rename it into place and prune."""
    root = checkpoint_dir(out_dir)
    final = os.path.join(root, f"step-{step:06d}")
    try:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        state_path = os.path.join(tmp, STATE_FILE)
        torch.save(state, state_path)
        with open(state_path, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (a resumed run that ends where it began)
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        _remove_dir(old)
    return final


# ---------------------------------------------------------------------------------------------- data
def _data_paths(out_dir: str) -> dict:
    d = os.path.join(out_dir, "data")
    return dict(dir=d, train=os.path.join(d, "train.bin"), val=os.path.join(d, "val.bin"),
                train_mask=os.path.join(d, "train.mask.bin"), val_mask=os.path.join(d, "val.mask.bin"))


def gather_documents(config: TrainConfig) -> list[datalib.Document]:
    docs = datalib.stdlib_documents() if config.corpus == "stdlib" else []
    if config.data:
        docs += datalib.read_documents(config.data)
    return docs


def prepare_data(config: TrainConfig, docs, tokenizer, block_size: int, log) -> dict:
    """Tokenise the documents once into <out>/data/*.bin; return the memory-mapped splits."""
    paths = _data_paths(config.out_dir)
    os.makedirs(paths["dir"], exist_ok=True)
    train_docs, val_docs = datalib.split_documents(docs, config.val_fraction)
    val_tokens = val_mask = None
    if val_docs:
        val_tokens, val_mask = datalib.encode_documents(tokenizer, val_docs)
        how = f"{len(val_docs)} of {len(docs)} documents held out"
        if len(val_tokens) < block_size + 1:  # the held-out documents do not fill one window
            train_docs, val_tokens, val_mask = docs, None, None
    train_tokens, train_mask = datalib.encode_documents(tokenizer, train_docs)
    if val_tokens is None and config.val_fraction > 0:  # hold out the tail of the token stream instead
        n_val = max(block_size + 1, int(len(train_tokens) * config.val_fraction))
        datalib.check_enough_tokens(len(train_tokens) - n_val, block_size, "training (after the validation tail)")
        val_tokens, train_tokens = train_tokens[-n_val:], train_tokens[:-n_val]
        if train_mask is not None:
            val_mask, train_mask = train_mask[-n_val:], train_mask[:-n_val]
        how = f"the last {n_val} tokens held out"
    elif val_tokens is None:
        how = "no validation split"
    datalib.check_enough_tokens(len(train_tokens), block_size, "training")
    if val_tokens is not None:
        datalib.check_enough_tokens(len(val_tokens), block_size, "validation")
    for name, array in (("train", train_tokens), ("val", val_tokens), ("train_mask", train_mask),
                        ("val_mask", val_mask)):
        if array is not None:
            datalib.write_array(paths[name], array)
        elif os.path.exists(paths[name]):
            os.unlink(paths[name])  # a stale file from an earlier run must not be mistaken for this one's
    log(f"data: {len(train_tokens):,} training tokens, "
        f"{0 if val_tokens is None else len(val_tokens):,} validation tokens ({how}); "
        f"{'loss on completions only' if train_mask is not None else 'loss on every token'}")
    return open_data(config.out_dir, tokenizer.vocab_size)


def open_data(out_dir: str, vocab_size: int) -> dict:
    paths = _data_paths(out_dir)
    if not os.path.exists(paths["train"]):
        raise FileNotFoundError(f"{paths['train']}: tokenised data missing")
    val = datalib.open_tokens(paths["val"], vocab_size) if os.path.exists(paths["val"]) else None
    return dict(train=datalib.open_tokens(paths["train"], vocab_size),
                train_mask=datalib.open_mask(paths["train_mask"]),
                val=val, val_mask=datalib.open_mask(paths["val_mask"]))


# ---------------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig, tokenizer, device):
    from fastgpt import GPT, GPTConfig
    from fastgpt.load import resolve_model_dir

    if config.init:
        model = GPT.from_pretrained(resolve_model_dir(config.init), device=device, dtype=torch.float32,
                                    cpu_decode_layout=False)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {config.init} embeds only "
                             f"{model.config.vocab_size}")
        return model
    sizes = dict(DEFAULT_SIZES) if config.preset is None else {}
    for name in DEFAULT_SIZES:
        if getattr(config, name) is not None:
            sizes[name] = getattr(config, name)
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=tokenizer.vocab_size, bos_token_id=eos, eos_token_id=eos)
    gpt_config = (GPTConfig.from_preset(config.preset, **common, **sizes) if config.preset
                  else GPTConfig(**common, **sizes))
    torch.manual_seed(config.seed)  # the initial weights follow the seed
    return GPT(gpt_config).to(device).train()


def build_tokenizer(config: TrainConfig, train_docs, log):
    from fastgpt import Tokenizer
    from fastgpt.load import resolve_model_dir

    source = config.tokenizer or config.init
    if source:
        return Tokenizer.from_pretrained(resolve_model_dir(source))
    texts = (t for d in train_docs for t in ((d.prompt, d.text) if d.prompt is not None else (d.text,)))
    tokenizer = Tokenizer.train(texts, vocab_size=config.vocab_size)
    log(f"tokenizer: trained a byte-level BPE of {tokenizer.vocab_size} tokens on the training split")
    return tokenizer


# ------------------------------------------------------------------------------------------ training
def train(config: TrainConfig, resume: bool = False, stream=None) -> TrainResult:
    """Run (or, with resume=True and a checkpoint in config.out_dir, continue) a training run.

    Progress goes to `stream` (stderr by default). torch's CPU thread count (config.threads) is put back
    afterwards, so a caller's process is left as it was.
    """
    threads_before = torch.get_num_threads()
    try:
        return _train(config, resume, stream)
    finally:
        torch.set_num_threads(threads_before)


def _train(config: TrainConfig, resume: bool, stream) -> TrainResult:
    world = parallel.World.from_env()  # torchrun's ranks; read before any collective, validated against below
    progress = Progress((stream or sys.stderr) if world.is_main else io.StringIO())  # one progress line: rank 0's
    log = progress.log
    out_dir = config.out_dir
    ckpt = latest_checkpoint(out_dir) if resume else None
    state = None
    if ckpt is not None:
        state = load_training_state(ckpt)
        saved = TrainConfig(**state["config"])
        if config.max_steps != saved.max_steps:
            log(f"resume: max_steps {saved.max_steps} -> {config.max_steps} (the cosine stretches to match)")
        config = dataclasses.replace(saved, max_steps=config.max_steps, out_dir=out_dir)
    config.validate()
    if ckpt is None and list_checkpoints(out_dir):
        raise FileExistsError(f"{out_dir} already holds checkpoints of a run: pass --resume to continue it, "
                              "or choose another --out")
    if state is not None and state.get("world_size", 1) != world.size:
        n = state.get("world_size", 1)
        raise ValueError(f"{ckpt} was written by a run of {n} process(es) and this one has {world.size}: the data "
                         f"split and the optimizer state follow the world size, so resume with {n} "
                         f"(torchrun --nproc-per-node {n} ...{' or no torchrun' if n == 1 else ''})")
    # every check above ran on every rank alike; only now do the ranks meet
    device = parallel.rank_device(world, config.device)
    created_group = parallel.init_process_group(world, device)
    if world.is_main:
        _clean_stale_temporaries(out_dir)
    if config.threads and device.type == "cpu":
        torch.set_num_threads(config.threads)
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr

    from fastgpt import GPT, Tokenizer

    # rank 0 reads, tokenises and writes the data; the others open what it wrote (parallel.on_main raises
    # its errors on every rank)
    def write_data(documents) -> None:
        prepare_data(config, documents, tokenizer, block_size, log)

    if state is None:
        docs = []

        def make_tokenizer():
            docs.extend(gather_documents(config))
            return build_tokenizer(config, datalib.split_documents(docs, config.val_fraction)[0], log)

        tokenizer = parallel.on_main(world, make_tokenizer)
        model = build_model(config, tokenizer, device)
        block_size = config.block_size or min(model.config.n_positions, 256)
        parallel.on_main(world, lambda: write_data(docs))
        data = open_data(out_dir, tokenizer.vocab_size)
        step = 0
    else:
        tokenizer = Tokenizer.from_pretrained(ckpt)
        model = GPT.from_pretrained(ckpt, device=device, dtype=torch.float32, cpu_decode_layout=False).train()
        block_size = state["block_size"]
        try:
            data = open_data(out_dir, tokenizer.vocab_size)
            lengths = (len(data["train"]), 0 if data["val"] is None else len(data["val"]))
            matches = lengths == tuple(state["data_tokens"])
        except (OSError, ValueError):
            matches = False
        if not parallel.all_true(world, matches):  # the data dir was removed or replaced: tokenise again, same result
            parallel.on_main(world, lambda: write_data(gather_documents(config)))
            data = open_data(out_dir, tokenizer.vocab_size)
        step = state["step"]
        log(f"resumed from {ckpt} at step {step}")
    if block_size > model.config.n_positions:
        raise ValueError(f"block_size {block_size} exceeds the model's context length {model.config.n_positions}")

    if model.config.attn_pdrop > 0:
        log(f"the checkpoint's attn_pdrop={model.config.attn_pdrop} is ignored: fastgpt has no attention dropout")
    model.set_dropout(config.dropout, config.dropout)  # before DDP / FSDP wrap the model

    if world.size > 1 and state is None:  # dropout draws differ across ranks, as across one process's micro-steps
        torch.manual_seed(config.seed + 1_000_003 * world.rank)
    sharded = config.fsdp and world.size > 1  # the optimizer state lives in shards, saved by every rank
    train_model = parallel.wrap_for_training(model, world, device, fsdp=config.fsdp)  # DDP / FSDP2 / model
    if config.compile:
        # forward + fused loss in one graph, its backward compiled by AOTAutograd; the fastgpt ops are single
        # operators in it (kernels/library.py). fullgraph only on one process: DDP's optimizer splits the
        # graph at its buckets on purpose. Evaluation (no grad, eval mode) compiles its own graph.
        train_model = torch.compile(train_model, fullgraph=world.size == 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=1e-8)
    sampler = torch.Generator().manual_seed(config.seed)  # the data position: which windows come next
    tokens_seen = 0
    evals: list[dict] = []
    if state is not None:
        if sharded:
            parallel.load_sharded_optimizer(model, optimizer, os.path.join(ckpt, "optimizer"))
        else:
            optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler_rng"])
        rng = state["rank_rng"][world.rank] if state.get("rank_rng") else state
        torch.set_rng_state(rng["torch_rng"])
        if device.type == "cuda" and rng.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rng["cuda_rng"], device)
        tokens_seen = state["tokens_seen"]
        evals = list(state["evals"])

    n_params = model.num_params()
    amp_dtype = autocast_dtype(device)
    precision = "bf16 autocast" if amp_dtype is not None else "fp32"
    log(f"model: {n_params / 1e6:.2f}M parameters, {model.config.n_layer} layers, {model.config.n_head} heads, "
        f"width {model.config.n_embd}, context {model.config.n_positions}, vocab {model.config.vocab_size}"
        + (f", dropout {config.dropout:g}" if config.dropout else ""))
    ranks = f" x {world.size} ranks ({'FSDP2' if config.fsdp else 'DDP'})" if world.size > 1 else ""
    log(f"training on {device}{ranks} in {precision} with {ops_path(device, config.reference_ops)}"
        + (", torch.compile'd (the first steps compile)" if config.compile else ""))
    ops = kernels.reference_ops if config.reference_ops else contextlib.nullcontext
    tokens_per_step = config.batch_size * config.grad_accum * world.size * block_size
    log(f"{config.max_steps} steps of {tokens_per_step:,} tokens (batch {config.batch_size} x accum "
        f"{config.grad_accum}{f' x {world.size} ranks' if world.size > 1 else ''} x block {block_size}), "
        f"lr {config.lr:g} -> {min_lr:g}, warm-up {config.warmup_steps}")

    eval_model = model if not config.compile else torch.compile(model, fullgraph=True)

    def run_eval():
        kw = dict(batch_size=config.batch_size, block_size=block_size, iters=config.eval_iters,
                  seed=EVAL_SEED, device=device, amp_dtype=amp_dtype, world=world)
        with ops():
            record = {"step": step, "train_loss": evaluate(eval_model, data["train"], data["train_mask"], **kw)}
            if data["val"] is not None:
                record["val_loss"] = evaluate(eval_model, data["val"], data["val_mask"], **kw)
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        evals.append(record)
        val = (f", val loss {record['val_loss']:.4f}, val ppl {record['val_ppl']:.2f}"
               if "val_loss" in record else "")
        log(f"step {step}: train loss {record['train_loss']:.4f}{val}")

    def checkpoint():
        rng = {"torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rank_rng = parallel.gather_objects(world, rng)
        run_state = {
            "step": step, "optimizer": None if sharded else optimizer.state_dict(), "sampler_rng": sampler.get_state(),
            **rng, "rank_rng": rank_rng if world.size > 1 else None, "world_size": world.size,
            "tokens_seen": tokens_seen, "block_size": block_size, "config": asdict(config), "evals": evals,
            "data_tokens": [len(data["train"]), 0 if data["val"] is None else len(data["val"])],
        }
        weights = parallel.full_model(model, world, config.fsdp)  # FSDP: gathered onto rank 0
        tmp = parallel.on_main(world, lambda: new_checkpoint_dir(out_dir, step))
        if sharded:
            parallel.save_sharded_optimizer(model, optimizer, os.path.join(tmp, "optimizer"))
        path = parallel.on_main(world, lambda: publish_checkpoint(tmp, out_dir, step, weights, tokenizer, run_state,
                                                                  config.keep_checkpoints))
        log(f"saved checkpoint {path} (step {step})")

    resumed_from = step if state is not None else None
    losses: list[float] = []
    t_start = time.perf_counter()
    t_log, tokens_log = t_start, tokens_seen
    model.train()
    while step < config.max_steps:
        if config.eval_interval and step % config.eval_interval == 0 and not (state and step == resumed_from):
            run_eval()
        lr = lr_at(step, config.lr, min_lr, config.warmup_steps, config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        # the step's windows, all ranks' and micro-steps', drawn at once; this rank takes its share
        batch = datalib.sample_batch(data["train"], data["train_mask"],
                                     config.batch_size * config.grad_accum * world.size, block_size, sampler)
        for micro, (x, y) in enumerate(parallel.local_micro_batches(*batch, world, config.grad_accum)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with parallel.gradient_sync(train_model, enabled=micro == config.grad_accum - 1):
                with ops(), _autocast(device, amp_dtype):
                    loss_sum, count = loss_sum_and_count(train_model, x, y)
                loss = loss_sum / max(count, 1)
                (loss / config.grad_accum).backward()
            step_loss += float(loss.detach()) / config.grad_accum
        step_loss = parallel.sum_across(world, step_loss)[0] / world.size  # every rank logs and checks the mean
        if not math.isfinite(step_loss):
            raise ValueError(f"step {step}: the loss is {step_loss}; try a lower --lr")
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        step += 1
        tokens_seen += tokens_per_step
        if step % config.log_interval == 0 or step == config.max_steps:
            now = time.perf_counter()
            rate = (tokens_seen - tokens_log) / max(now - t_log, 1e-9)
            t_log, tokens_log = now, tokens_seen
            progress.update(f"step {step}/{config.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | "
                            f"{rate:,.0f} tokens/s | {now - t_start:.0f} s")
        if config.checkpoint_interval and step % config.checkpoint_interval == 0 and step < config.max_steps:
            checkpoint()
    if not evals or evals[-1]["step"] != step:
        run_eval()
    if resumed_from != step or not list_checkpoints(out_dir):
        checkpoint()
    seconds = time.perf_counter() - t_start

    from fastgpt.load import atomic_write_text, parse_dtype

    save_dtype = parse_dtype(config.save_dtype)
    weights = parallel.full_model(model, world, config.fsdp)
    report = {"config": asdict(config), "step": step, "seconds_this_call": round(seconds, 1),
              "resumed_from": resumed_from, "tokens_seen": tokens_seen, "n_params": n_params,
              "vocab_size": tokenizer.vocab_size, "block_size": block_size, "evals": evals, "world_size": world.size}

    def write_final():
        final = weights if save_dtype == torch.float32 else copy.deepcopy(weights).to(save_dtype)
        final.save_pretrained(out_dir, tokenizer=tokenizer)
        atomic_write_text(os.path.join(out_dir, "training.json"), json.dumps(report, indent=2) + "\n")

    parallel.on_main(world, write_final)
    log(f"done: step {step}, {seconds:.0f} s; model in {out_dir}")
    if created_group:
        parallel.destroy_process_group()
    return TrainResult(out_dir=out_dir, step=step, losses=losses, evals=evals, resumed_from=resumed_from,
                       seconds=seconds, tokens=tokens_seen)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    from fastgpt.cli import positive_int

    d = TrainConfig(out_dir="")
    src = p.add_argument_group("data")
    src.add_argument("--data", nargs="+", default=[], metavar="PATH",
                     help="UTF-8 text files or folders; .jsonl files hold {prompt, completion} pairs "
                          "(loss on the completion only)")
    src.add_argument("--corpus", choices=["stdlib"], default=None,
                     help="built-in corpus gathered at run time: 'stdlib' = pydoc topics + stdlib docstrings")
    src.add_argument("--val-fraction", type=float, default=d.val_fraction,
                     help="share held out for validation (whole documents; 0 = none)")
    src.add_argument("--out", required=True, help="run dir: checkpoints, tokenised data, the final model")
    src.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (its saved settings win, "
                          "except --max-steps)")
    m = p.add_argument_group("model")
    m.add_argument("--init", default=None, help="fine-tune from a checkpoint: 'gpt2' or an HF GPT-2 dir")
    m.add_argument("--preset", default=None, help="start from scratch with a GPT-2 shape (gpt2, gpt2-medium, ...)")
    for name in DEFAULT_SIZES:
        m.add_argument("--" + name.replace("_", "-"), type=positive_int, default=None,
                       help=f"from scratch (default {DEFAULT_SIZES[name]})")
    m.add_argument("--tokenizer", default=None,
                   help="dir with tokenizer files (default: --init's, else train one on the data)")
    m.add_argument("--vocab-size", type=positive_int, default=d.vocab_size, help="of a newly trained tokenizer")
    o = p.add_argument_group("optimisation")
    o.add_argument("--block-size", type=positive_int, default=None, help="window length (default min(context, 256))")
    o.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    o.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per step")
    o.add_argument("--max-steps", type=positive_int, default=None, help=f"optimizer steps (default {d.max_steps})")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default lr / 10)")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 = off)")
    o.add_argument("--dropout", type=float, default=d.dropout,
                   help="GPT-2's resid_pdrop and embd_pdrop for this run (default 0; attention dropout is not "
                        "supported)")
    o.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the forward and the fused loss (and with them the backward); the fastgpt "
                        "ops stay whole in the graph")
    o.add_argument("--reference-ops", action="store_true",
                   help="run the plain PyTorch ops (SDPA attention, materialised logits) instead of fastgpt's "
                        "kernels, for comparison")
    b = p.add_argument_group("bookkeeping")
    b.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between validations (0 = at the end only)")
    b.add_argument("--eval-iters", type=positive_int, default=d.eval_iters, help="batches per validation")
    b.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval, help="0 = at the end only")
    b.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints)
    b.add_argument("--log-interval", type=positive_int, default=d.log_interval)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    b.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    b.add_argument("--save-dtype", default=d.save_dtype, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the final model written to --out")
    b.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (default: DDP)")


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["out_dir"] = args.out
    return TrainConfig(**values)


def run(args) -> int:
    config = config_from_args(args)
    if args.resume:
        config.max_steps = args.max_steps if args.max_steps is not None else _saved_max_steps(config)
    train(config, resume=args.resume)
    return 0


def _saved_max_steps(config: TrainConfig) -> int:
    ckpt = latest_checkpoint(config.out_dir)
    return load_training_state(ckpt)["config"]["max_steps"] if ckpt else config.max_steps
