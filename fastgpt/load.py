"""Hugging Face GPT-2 checkpoints in and out.

In: a local dir (config.json + model.safetensors, sharded safetensors, or pytorch_model.bin) or a hub
name fetched with ``huggingface_hub`` when it is installed and online. The model is built on the meta
device and the checked tensors are assigned (no double allocation, no random init). HF stores GPT-2's
projections as Conv1D, (in, out): they are transposed into nn.Linear's (out, in).

Out: ``save_pretrained`` writes the same format, which transformers loads back; every file goes to a
temporary name first and is renamed, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from fastgpt.config import GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# non-parameter tensors some HF versions store: the causal mask buffers (lm_head.weight, tied, is skipped too)
_SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_model_dir(name_or_path) -> str:
    """A local checkpoint dir for a path or a hub name (downloaded with huggingface_hub)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or (os.sep != "/" and os.sep in path)
    if os.path.exists(path):
        raise NotADirectoryError(f"{path}: not a directory (expected an HF checkpoint dir with config.json)")
    if looks_local or path.count("/") > 1:
        raise FileNotFoundError(f"{path}: model directory not found")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and huggingface_hub is not installed to fetch it from the hub "
            "(pip install 'fastgpt[hub]')") from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=path,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                            "vocab.json", "merges.txt", "tokenizer.json", "generation_config.json",
                            # the chat template and special tokens fastgpt serve renders chats with
                            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"])
    except Exception as e:  # offline, unknown repo, auth: one message that says which
        raise FileNotFoundError(f"could not fetch {path!r} from the Hugging Face hub: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _read_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    binf = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        files = [st]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index}: unreadable shard index ({e})") from None
        files = [os.path.join(model_dir, s) for s in shards]
    elif os.path.isfile(binf):
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{binf}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from None
    else:
        raise FileNotFoundError(f"{model_dir}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
    state = {}
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: weight shard listed in the index is missing")
        try:
            state.update(load_file(path, device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: corrupt safetensors file ({e})") from None
    return state


def hf_name(key: str) -> str | None:
    """GPT's parameter name for an HF GPT-2 tensor name; None for the tensors fastgpt does not load
    (causal-mask buffers, and lm_head.weight: the head is tied to wte)."""
    if key.endswith(_SKIPPED_SUFFIXES) or key == "lm_head.weight":
        return None
    return key if key.startswith("transformer.") else "transformer." + key


def hf_to_fastgpt(state: dict[str, torch.Tensor]) -> dict:
    """Map HF GPT-2 tensor names/layouts onto GPT's parameters; every key and shape is checked."""
    out = {}
    for key, t in state.items():
        name = hf_name(key)
        if name is None:
            continue
        if name.endswith(CONV1D_WEIGHTS) and t.dim() == 2:
            t = t.t()
        out[name] = t
    return out


def _check_against_model(state: dict, model, source: str) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                             f"but config.json implies {tuple(p.shape)}")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (fast and exact there); bf16 on GPUs (GPT-2's activations overflow fp16 rarely, bf16 never)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_pretrained(cls, name_or_path, device=None, dtype=None, cpu_decode_layout: bool = True):
    model_dir = resolve_model_dir(name_or_path)
    config = GPTConfig.from_hf(os.path.join(model_dir, "config.json"))
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or default_dtype(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    source = os.path.join(model_dir, next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(model_dir, f))),
                                          "model.safetensors"))
    state = hf_to_fastgpt(_read_state_dict(model_dir))
    with torch.device("meta"):
        model = cls(config)
    _check_against_model(state, model, source)
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if device.type == "cpu" and cpu_decode_layout:
        model.use_cpu_decode_layout()
    return model.eval()


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose from float32, float16, bfloat16")
    return table[name]


def fastgpt_to_hf(model) -> dict[str, torch.Tensor]:
    """GPT's parameters in HF GPT2LMHeadModel's names and Conv1D layouts (head omitted: it is tied),
    as views on the model's device: nothing is copied."""
    return {name: (p.t() if name.endswith(CONV1D_WEIGHTS) else p)
            for name, p in model.state_dict().items()}


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path (same directory, so the rename is atomic)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the renamed file gets a normal file's mode
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def save_pretrained(model, path, tokenizer=None) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in fastgpt_to_hf(model).items()}
    atomic_write(os.path.join(path, "model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(model.config.to_hf(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
