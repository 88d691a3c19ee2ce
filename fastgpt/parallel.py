"""Past one device, on ``torch.distributed``: tensor-parallel inference and data-parallel training.

This is the only module of fastgpt that calls ``torch.distributed``; the model and the training loop call
the functions below and never branch on a rank. Processes are started by ``torchrun``, which sets
RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT; the backend follows the device (nccl for CUDA, gloo
for CPU), so the CPU tests run the very code that runs across GPUs.

Tensor parallelism (inference): Megatron-LM's split (Shoeybi et al. 2019) applied to GPT-2, the TP group
being the whole launch. With tp ranks, rank r holds heads [r*nh/tp, (r+1)*nh/tp):
    ln_1, ln_2, ln_f, wpe        replicated
    attn.c_attn  (3C, C)         column-parallel, its rows regrouped: rank r keeps the q rows, the k rows and
                                 the v rows of its own heads (3C/tp, C) -- a plain split of the fused rows
                                 would hand rank 0 all of q and half of k
    attention                    unchanged on the rank's heads (flash / decode kernels, KV cache of nh/tp)
    attn.c_proj  (C, C)          row-parallel: the columns of its heads; one all-reduce, then the bias
    mlp.c_fc     (4C, C)         column-parallel, rows [r*4C/tp, (r+1)*4C/tp)
    mlp.c_proj   (C, 4C)         row-parallel: the fused gelu_mlp kernel runs on the shard with a zero bias
                                 and no residual; one all-reduce, then bias and residual, once
    wte (V, C), tied head        vocab-parallel: rows [r*V'/tp, (r+1)*V'/tp) of the table padded with zero
                                 rows to V' = tp * ceil(V/tp); the lookup masks the ids of other ranks and
                                 all-reduces (a sum of one row and zeros, exact); the head's logits are
                                 all-gathered and the padding is cut off
Two all-reduces per block and two collectives per forward, of (B, T, C) or (B, T, V/tp) elements.
Every rank runs the same generation loop: the inputs of every sampling step are results of the same
collectives, bit for bit the same on every rank, so the same seed picks the same token everywhere and
nothing needs to be broadcast. The TP modules are for inference (their collectives have no backward).
The engine runs the same way on every rank; ``TPGroup`` is what its ranks settle once when it is made
(settings, the shared generator's seed, the KV-cache size), and ``Lockstep`` carries the server's requests
from rank 0, which takes them over HTTP, to the other ranks before each step.

Data parallelism (training): DDP, or FSDP2's ``fully_shard`` per block and at the root. The loop draws
each optimizer step's windows as one global batch (batch x grad-accum x world) and every rank takes its
share; gradients are synchronised on the last micro-step only.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from fastgpt.config import GPTConfig
from fastgpt.model import MLP, GPT, TiedEmbedding


# ------------------------------------------------------------------------------------------ the launch
@dataclass(frozen=True)
class World:
    """This process's place in the launch (from torchrun's environment; a lone process is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ=None) -> "World":
        """Read the launch from the environment: no process group, no collective, so callers can
        validate everything against it before any rank waits for another."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = cls(rank=int(env.get("RANK", 0)), size=int(env["WORLD_SIZE"]),
                        local_rank=int(env.get("LOCAL_RANK", env.get("RANK", 0))))
        except ValueError:
            raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers") from None
        if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
            raise ValueError(f"bad launch environment: RANK={world.rank}, WORLD_SIZE={world.size}, "
                             f"LOCAL_RANK={world.local_rank}")
        return world

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_device(world: World, name: str | None) -> torch.device:
    """The device of this rank: the one asked for in a lone process; in a launch of several ranks on
    CUDA, the GPU of this rank's LOCAL_RANK."""
    from fastgpt.cli import resolve_device

    device = resolve_device(name)
    if world.size == 1 or device.type == "cpu":
        return device
    if device.index is not None and name not in (None, "auto"):
        raise ValueError(f"--device {name} names one GPU, but each of the {world.size} ranks takes the GPU of "
                         "its LOCAL_RANK: pass --device cuda")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"rank {world.rank} has LOCAL_RANK {world.local_rank}, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s): launch at most that many processes per node")
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, device: torch.device) -> bool:
    """Join the launch's process group: nccl for CUDA, gloo for CPU. Returns True when this call created
    it (then ``destroy_process_group`` is the caller's), False for a lone process or an existing group."""
    if world.size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"the environment (rank {world.rank} of {world.size})")
    return True


def launch_tensor_parallel(tp: int, device_name: str | None) -> tuple[World, torch.device]:
    """Check that torchrun started exactly tp processes, pick this rank's device and join the group.
    Every rank checks the same environment, so a bad launch fails alike on each before they meet."""
    world = World.from_env()
    if tp != world.size:
        if world.size == 1:
            raise ValueError(f"--tp {tp} needs {tp} processes, one per shard: launch with "
                             f"torchrun --nproc-per-node {tp} -m fastgpt ... --tp {tp}")
        raise ValueError(f"torchrun started {world.size} processes but --tp is {tp}: pass --tp {world.size} "
                         "(each process holds one shard of the model)")
    device = rank_device(world, device_name)
    init_process_group(world, device)
    return world, device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ collectives
def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum t over the group, in place; returns t."""
    dist.all_reduce(t, group=group)
    return t


def all_gather_last_dim(t: torch.Tensor, group=None) -> torch.Tensor:
    """(..., n) on each rank -> (..., n * group size), the ranks' pieces in rank order."""
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def sum_across(world: World, *values: float) -> list[float]:
    """Each value summed over the ranks (float64)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def all_true(world: World, flag: bool) -> bool:
    """True when flag is true on every rank."""
    if world.size == 1:
        return bool(flag)
    return sum_across(world, float(bool(flag)))[0] == world.size


def gather_objects(world: World, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def on_main(world: World, fn):
    """fn() on rank 0, its result on every rank. An exception fn raises is raised on every rank (the same
    type and message), so no rank is left waiting in a collective for one that failed."""
    if world.size == 1:
        return fn()
    result = error = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:  # every rank raises it below
            error = e
    payload = [(result, error)] if world.is_main else [None]
    if world.is_main and error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # an exception that cannot travel: its type and message can
            payload = [(None, RuntimeError(f"{type(error).__name__}: {error}"))]
    dist.broadcast_object_list(payload, src=0)
    result, sent_error = payload[0]
    if world.is_main and error is not None:
        raise error
    if sent_error is not None:
        raise sent_error
    return result


# --------------------------------------------------------------------------------- tensor parallelism
def check_tensor_parallel(config: GPTConfig, tp: int) -> None:
    """Whole heads (and so whole widths) per rank, or a clear error."""
    if isinstance(tp, bool) or int(tp) != tp or tp < 1:
        raise ValueError(f"tensor-parallel size must be an integer >= 1, got {tp}")
    if config.n_head % tp:
        sizes = [d for d in range(1, config.n_head + 1) if config.n_head % d == 0]
        raise ValueError(f"tensor-parallel size {tp} does not divide the model's {config.n_head} attention heads "
                         f"(each rank holds whole heads); choose one of {sizes}")
    if config.n_embd % tp:  # implied by the heads (n_embd = n_head * head_dim); said plainly if ever not
        raise ValueError(f"tensor-parallel size {tp} does not divide the model's width n_embd={config.n_embd}")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp: each rank holds the same number of rows."""
    return tp * math.ceil(vocab_size / tp)


def shard_plan(name: str, config: GPTConfig, rank: int, tp: int):
    """Which part of parameter `name` (GPT's layout) rank holds under tensor parallelism:
    (dim, [(start, stop), ...]), pieces concatenated along dim, or None when it is replicated."""
    C = config.n_embd
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        w = C // tp  # this rank's heads within each of q, k and v
        return 0, [(part * C + rank * w, part * C + (rank + 1) * w) for part in range(3)]
    if name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        w = 4 * C // tp
        return 0, [(rank * w, (rank + 1) * w)]
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        w = (4 * C if name.endswith("mlp.c_proj.weight") else C) // tp
        return 1, [(rank * w, (rank + 1) * w)]
    if name == "transformer.wte.weight":
        w = padded_vocab(config.vocab_size, tp) // tp
        return 0, [(rank * w, min((rank + 1) * w, config.vocab_size))]
    return None


def take_shard(name: str, full, config: GPTConfig, rank: int, tp: int, transposed: bool = False) -> torch.Tensor:
    """This rank's shard of parameter `name` from `full` (a tensor, or a safetensors slice that reads only
    what is indexed), in GPT's layout. transposed: `full` is in HF's Conv1D (in, out) layout."""
    plan = shard_plan(name, config, rank, tp)
    if plan is None:
        return (full if isinstance(full, torch.Tensor) else full[:]).clone()  # never a view of the whole
    dim, ranges = plan
    read_dim = 1 - dim if transposed else dim
    pieces = [full[a:b] if read_dim == 0 else full[:, a:b] for a, b in ranges]
    t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=read_dim)
    if transposed:
        t = t.t()
    if name == "transformer.wte.weight":  # zero rows pad the last rank to the others' size
        rows = padded_vocab(config.vocab_size, tp) // tp
        if t.shape[0] < rows:
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
    return t.clone(memory_format=torch.contiguous_format)  # its own storage: not a view of a file or the whole


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T, plus the bias once: x's features are split across the ranks, each
    holding the matching columns of W (out, in / tp) and the whole bias, added after the all-reduce."""

    def __init__(self, in_features: int, out_features: int, group=None, device=None, dtype=None):
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.group = group

    def forward(self, x):
        y = all_reduce_(F.linear(x, self.weight), self.group)
        return y.add_(self.bias)


class TensorParallelMLP(MLP):
    """c_fc column-parallel, c_proj row-parallel. The fused gelu_mlp kernel runs unchanged on the shard;
    its epilogue gets a zero bias and no residual, which are added once, after the all-reduce."""

    def __init__(self, n_embd: int, tp: int, group=None):
        nn.Module.__init__(self)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd // tp)
        self.c_proj = nn.Linear(4 * n_embd // tp, n_embd)
        self.group = group
        self.register_buffer("zero_bias", torch.zeros(n_embd), persistent=False)

    def forward(self, x, residual=None):
        y = kernels.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.zero_bias)
        y = all_reduce_(y, self.group).add_(self.c_proj.bias)
        return y if residual is None else y.add_(residual)


class VocabParallelEmbedding(TiedEmbedding):
    """Rows [start, start + rows) of the (padded) tied table. The lookup zeroes the ids other ranks hold and
    all-reduces; the head computes this rank's logits and all-gathers them, cutting the padding off."""

    def __init__(self, rows: int, n_embd: int, start: int, vocab_size: int, group=None):
        super().__init__(rows, n_embd)
        self.start, self.vocab_size, self.group = start, vocab_size, group

    def forward(self, ids):
        local = ids - self.start
        here = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # (B, T, C)
        return all_reduce_(x.masked_fill_(~here[..., None], 0.0), self.group)

    def logits(self, x):
        return all_gather_last_dim(F.linear(x, self.weight), self.group)[..., :self.vocab_size]  # (..., V)


def _tensor_parallel_structure(model: GPT, rank: int, tp: int, group) -> None:
    """Swap in the TP modules with their local shapes, on the meta device (weights come by assign)."""
    config = model.config
    C = config.n_embd
    rows = padded_vocab(config.vocab_size, tp) // tp
    model.clear_caches()  # a cache of every head would not fit the rank's share
    with torch.device("meta"):
        model.transformer.wte = VocabParallelEmbedding(rows, C, rank * rows, config.vocab_size, group)
        for block in model.transformer.h:
            block.attn.n_head = config.n_head // tp
            block.attn.c_attn = nn.Linear(C, 3 * C // tp)
            block.attn.c_proj = RowParallelLinear(C // tp, C, group)
            block.mlp = TensorParallelMLP(C, tp, group)


def _finish(model: GPT, device, cpu_decode_layout: bool) -> GPT:
    for module in model.modules():
        if isinstance(module, TensorParallelMLP):
            module.zero_bias = torch.zeros_like(module.c_proj.bias)  # a buffer, not in the state dict
    model.requires_grad_(False)  # the collectives have no backward: TP is for inference
    if device.type == "cpu" and cpu_decode_layout:
        model.use_cpu_decode_layout()
    return model.eval()


def tensor_parallel(model: GPT, group=None) -> GPT:
    """Shard a whole in-memory GPT across the group (default: every rank), in place; returns it.

    Every rank must hold the same full model (tests, benchmarks, models made in code); checkpoints load
    sharded from the start with ``load_tensor_parallel``."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    check_tensor_parallel(model.config, tp)
    full = {name: t.detach() for name, t in model.state_dict().items()}
    local = {name: take_shard(name, t, model.config, rank, tp) for name, t in full.items()}
    del full
    _tensor_parallel_structure(model, rank, tp, group)
    model.load_state_dict(local, strict=True, assign=True)
    return _finish(model, model.device, cpu_decode_layout=False)


class _CheckpointReader:
    """The tensors of an HF GPT-2 checkpoint by GPT name, read lazily: a safetensors slice reads only the
    bytes it is indexed with; a pytorch_model.bin is memory-mapped, so slicing it copies only the slice."""

    def __init__(self, model_dir: str):
        import json

        from safetensors import SafetensorError, safe_open

        from fastgpt.load import WEIGHT_FILES

        self.entries = {}  # GPT name -> (zero-argument getter of an indexable view, is Conv1D, shape)
        st = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        binf = os.path.join(model_dir, "pytorch_model.bin")
        if os.path.isfile(st) or os.path.isfile(index):
            files = [st]
            if not os.path.isfile(st):
                try:
                    with open(index, encoding="utf-8") as f:
                        files = [os.path.join(model_dir, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
                except (OSError, ValueError, KeyError) as e:
                    raise ValueError(f"{index}: unreadable shard index ({e})") from None
            for path in files:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: weight shard listed in the index is missing")
                try:
                    handle = safe_open(path, framework="pt", device="cpu")
                    for key in handle.keys():
                        shape = tuple(handle.get_slice(key).get_shape())
                        self._add(key, lambda h=handle, k=key: h.get_slice(k), shape)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{path}: corrupt safetensors file ({e})") from None
        elif os.path.isfile(binf):
            try:
                state = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{binf}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from None
            for key, t in state.items():
                self._add(key, lambda t=t: t, tuple(t.shape))
        else:
            raise FileNotFoundError(f"{model_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")

    def _add(self, key: str, getter, shape: tuple) -> None:
        from fastgpt.load import CONV1D_WEIGHTS, hf_name

        name = hf_name(key)
        if name is not None:
            conv1d = name.endswith(CONV1D_WEIGHTS) and len(shape) == 2  # stored (in, out)
            self.entries[name] = (getter, conv1d, shape[::-1] if conv1d else shape)  # shape in GPT's layout

    def shard(self, name: str, config: GPTConfig, rank: int, tp: int) -> torch.Tensor:
        getter, conv1d, _ = self.entries[name]
        return take_shard(name, getter(), config, rank, tp, transposed=conv1d)


def load_tensor_parallel(name_or_path, device=None, dtype=None, group=None, cpu_decode_layout: bool = True) -> GPT:
    """This rank's shard of an HF GPT-2 checkpoint, across the group (default: every rank of the launch).

    Every rank calls it. The model is built on the meta device and each rank reads only its own shard
    (plus the replicated LayerNorms, positions and biases) from the file, so the whole model is never
    materialised, not even once per host. Returns a GPT whose forward, ``generate`` and ``stream`` work as
    on one device, every rank calling them with the same arguments."""
    from fastgpt.load import _check_against_model, default_dtype, parse_dtype, resolve_model_dir

    if not dist.is_initialized():
        raise RuntimeError("load_tensor_parallel needs a process group: launch with torchrun and call "
                           "fastgpt.parallel.init_process_group first")
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    model_dir = resolve_model_dir(name_or_path)
    config = GPTConfig.from_hf(os.path.join(model_dir, "config.json"))
    check_tensor_parallel(config, tp)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    reader = _CheckpointReader(model_dir)
    with torch.device("meta"):
        model = GPT(config)
    # names and full shapes checked as load_pretrained checks them, before a byte of weights is read
    _check_against_model({name: torch.empty(shape, device="meta") for name, (_, _, shape) in reader.entries.items()},
                         model, model_dir)
    local = {name: reader.shard(name, config, rank, tp).to(device=device, dtype=dtype) for name in reader.entries}
    _tensor_parallel_structure(model, rank, tp, group)
    model.load_state_dict(local, strict=True, assign=True)
    return _finish(model, device, cpu_decode_layout)


# ------------------------------------------------------------------------------- the engine under TP
class TPGroup:
    """What an engine on a tensor-parallel model settles with the other ranks, once, when it is made.

    The engine runs the same schedule on every rank (engine.py): each decision is a function of the requests
    (the same on every rank), the logits (the same collectives' results) and the generators, which must
    therefore be seeded alike; and of the settings and the KV-cache size, which must agree."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._src = 0 if group is None else dist.get_global_rank(group, 0)

    def min(self, value: int) -> int:
        """The smallest value over the ranks (e.g. the KV blocks that fit in every GPU's free memory)."""
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def shared_seed(self, generator: torch.Generator) -> int:
        """Seed generator from rank 0's fresh random seed, on every rank; returns the seed."""
        payload = [generator.seed() if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=self._src, group=self.group)
        generator.manual_seed(payload[0])
        return payload[0]

    def check_same(self, what: str, settings: dict) -> None:
        """Raise the same ValueError on every rank unless settings are equal on all of them."""
        everyone = [None] * self.size
        dist.all_gather_object(everyone, settings, group=self.group)
        differ = sorted(k for k in settings if len({repr(s.get(k)) for s in everyone}) > 1)
        if differ:
            per_rank = "; ".join(f"{k}: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(everyone))
                                 for k in differ)
            raise ValueError(f"{what} must be the same on every tensor-parallel rank, but {per_rank}")


def tensor_parallel_group(model) -> TPGroup | None:
    """The TP group of a model sharded by ``tensor_parallel`` / ``load_tensor_parallel``; None for a whole model."""
    wte = model.transformer.wte
    return TPGroup(wte.group) if isinstance(wte, VocabParallelEmbedding) else None


class Lockstep:
    """The server under TP: rank 0 takes the requests over HTTP; before each engine step it hands the step's
    inputs (new requests, aborts, calls, in the order it applies them) to every rank, which apply the same
    and step alike. Every rank makes one (collectively); rank 0 calls ``share(commands)``, the others
    ``share()``, which returns what rank 0 sent: a list, or None when the server stops.

    The commands are Python objects and go through a group of their own, gloo, CPU to CPU: on CUDA the
    default group is NCCL, whose object broadcast would round-trip through the GPU and whose waiting rank
    spins a kernel while the server idles; and on any backend a group of their own keeps them from ever
    pairing up with the model's collectives."""

    def __init__(self, world: World):
        self.world = world
        self.group = dist.new_group(backend="gloo")
        self.closed = False

    def share(self, commands: list | None = None) -> list | None:
        payload = [commands if self.world.is_main else None]
        dist.broadcast_object_list(payload, src=0, group=self.group)
        if payload[0] is None:
            self.closed = True
        return payload[0]

    def close(self) -> None:
        """Rank 0: tell the other ranks that the server stopped (once; later calls do nothing)."""
        if self.world.is_main and not self.closed:
            self.share(None)


# ----------------------------------------------------------------------------------- data parallelism
def wrap_for_training(model: GPT, world: World, device: torch.device, fsdp: bool = False):
    """The module the training loop runs: DDP, or FSDP2 (``fully_shard`` on every block, then the root,
    which keeps the tied embedding/head and the final LayerNorm); the model itself in a lone process."""
    if world.size == 1:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # FSDP2 is public from torch 2.6
            raise ValueError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
                             f"torch {torch.__version__}") from None

        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model) -> GPT:
    return getattr(model, "module", model)  # DDP keeps the model as .module; FSDP2 shards it in place


@contextlib.contextmanager
def gradient_sync(model, enabled: bool):
    """Around a micro-step's forward and backward: with enabled=False the gradients only accumulate
    locally (DDP's no_sync, FSDP2's requires_gradient_sync off); the last micro-step syncs them."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def local_micro_batches(x: torch.Tensor, y: torch.Tensor, world: World, grad_accum: int):
    """This rank's micro-batches of one optimizer step's global batch (world x grad_accum x B windows):
    rank r takes windows [r*A*B, (r+1)*A*B), micro-step m the m-th B of those. The ranks' and micro-steps'
    shares add up to the whole batch, so N ranks with A micro-steps see what 1 process with N*A sees."""
    per_rank = x.shape[0] // world.size
    B = per_rank // grad_accum
    start = world.rank * per_rank
    return [(x[start + m * B:start + (m + 1) * B], y[start + m * B:start + (m + 1) * B]) for m in range(grad_accum)]


def eval_share(world: World, iters: int) -> list[tuple[int, float]]:
    """(batch index, weight) pairs this rank evaluates out of `iters`: every world-th batch, then repeats
    of weight 0 so that every rank runs the same number of forwards (FSDP gathers weights in each)."""
    mine = [(i, 1.0) for i in range(world.rank, iters, world.size)]
    rounds = math.ceil(iters / world.size)
    return mine + [(mine[-1][0] if mine else 0, 0.0)] * (rounds - len(mine))


def full_model(model, world: World, fsdp: bool) -> GPT | None:
    """A plain GPT with the whole weights on rank 0 (None elsewhere), to save. Under FSDP every rank
    must call it (the shards are gathered); otherwise it is the model itself."""
    if not fsdp or world.size == 1:
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_sharded_optimizer(model, optimizer, path: str) -> None:
    """FSDP: every rank writes its shard of the optimizer state with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)


def load_sharded_optimizer(model, optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: the sharded optimizer state of an FSDP checkpoint is missing")
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
