"""Checkpoints in and out: HF formats, clear errors naming the file, atomic saves, meta-device loading.

(That HF's Conv1D weights are transposed correctly is proven by the logits parity in test_model.py.)
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastgpt import GPT, GPTConfig
from helpers import make_hf_checkpoint, max_rel_err, random_ids, train_tiny_tokenizer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

FP32_REL_TOL = 1e-4


@pytest.fixture
def checkpoint(tmp_path):
    """A fresh checkpoint dir per test (tests here corrupt theirs)."""
    return make_hf_checkpoint(tmp_path / "ckpt", seed=4)


def _assert_same_logits(model, hf_model, seed=0):
    ids = random_ids(2, 17, model.config.vocab_size, seed=seed)
    with torch.no_grad():
        assert max_rel_err(model(ids), hf_model(ids).logits) <= FP32_REL_TOL


# -------------------------------------------------------------------------------------------- formats
def test_pytorch_model_bin_loads(reference_path, tmp_path):
    path, hf_model = make_hf_checkpoint(tmp_path / "bin", seed=5, safe_serialization=False)
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    _assert_same_logits(GPT.from_pretrained(path), hf_model)


def test_original_gpt2_key_layout_loads(reference_path, tmp_path):
    """The original gpt2 upload: names without 'transformer.', causal-mask buffers stored as tensors, and
    an lm_head copy; all of that is understood or skipped."""
    path, hf_model = make_hf_checkpoint(tmp_path / "old", seed=6)
    state = load_file(os.path.join(path, "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    n_pos = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    old["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(old, os.path.join(path, "model.safetensors"))
    _assert_same_logits(GPT.from_pretrained(path), hf_model)


def test_sharded_safetensors_load(reference_path, tmp_path):
    path, hf_model = make_hf_checkpoint(tmp_path / "plain", seed=7)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    _assert_same_logits(GPT.from_pretrained(sharded), hf_model)
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1]}: weight shard listed in the index is missing"):
        GPT.from_pretrained(sharded)


# --------------------------------------------------------------------------------------------- errors
def test_missing_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"{missing}: model directory not found"):
        GPT.from_pretrained(missing)


def test_file_instead_of_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=f"{f}: not a directory"):
        GPT.from_pretrained(f)


def test_missing_config_json(checkpoint):
    path, _ = checkpoint
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=f"{os.path.join(path, 'config.json')}: config.json not found"):
        GPT.from_pretrained(path)


def test_no_weights(checkpoint):
    path, _ = checkpoint
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=f"{path}: no weights found"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(checkpoint, damage):
    path, _ = checkpoint
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    with open(st, "wb") as f:
        f.write(data[:len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(ValueError, match=f"{st}: corrupt safetensors file"):
        GPT.from_pretrained(path)


def test_corrupt_pytorch_model_bin_names_the_file(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path / "bin", seed=5, safe_serialization=False)
    binf = os.path.join(path, "pytorch_model.bin")
    data = open(binf, "rb").read()
    with open(binf, "wb") as f:
        f.write(data[:len(data) // 3])
    with pytest.raises(ValueError, match=f"{binf}: corrupt or unreadable checkpoint"):
        GPT.from_pretrained(path)


def test_shape_mismatch_with_config_names_the_file(checkpoint):
    path, _ = checkpoint
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["n_embd"] = 32  # the weights are 64 wide
    json.dump(cfg, open(cfg_path, "w"))
    st = os.path.join(path, "model.safetensors")
    with pytest.raises(ValueError, match=f"{st}: transformer.* has shape .*64.*but config.json implies .*32"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("change, message", [
    ("extra", r"unexpected tensors \['transformer.h.0.attn.extra_scale'\]"),
    ("missing", r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\]"),
])
def test_unexpected_or_missing_keys_name_the_file(checkpoint, change, message):
    path, _ = checkpoint
    st = os.path.join(path, "model.safetensors")
    state = load_file(st)
    if change == "extra":
        state["transformer.h.0.attn.extra_scale"] = torch.randn(3)
    else:
        del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, st)
    with pytest.raises(ValueError, match=f"{st}: {message}"):
        GPT.from_pretrained(path)


def test_unknown_dtype_name(checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        GPT.from_pretrained(checkpoint[0], dtype="float8")


# ------------------------------------------------------------------------------------------------ hub
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline hub with an empty cache; any socket connect is recorded (and refused)."""
    import socket

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    try:  # huggingface_hub reads these at import time, and transformers has imported it already
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)  # so the names below cannot be local dirs by accident
    return attempts


@pytest.mark.parametrize("name", ["fastgpt-test-no-such-model", "fastgpt-tests/no-such-model"])
def test_hub_name_offline_is_a_clear_file_not_found(no_network, name):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(FileNotFoundError, match=f"could not fetch '{name}' from the Hugging Face hub"):
        GPT.from_pretrained(name)
    assert no_network == []


def test_hub_name_without_huggingface_hub(no_network, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed"):
        GPT.from_pretrained("fastgpt-tests/no-such-model")
    assert no_network == []


# ----------------------------------------------------------------------------------- meta + assign, dtype
def test_load_builds_on_meta_and_assigns_the_checkpoint(reference_path, checkpoint, monkeypatch):
    path, hf_model = checkpoint
    # loading must not initialise real memory: an init call on a non-meta tensor fails the test
    # (nn.Linear & co. still call their init on meta tensors, where it costs nothing)
    def refuse_real_init(tensor, *args, **kwargs):
        if not tensor.is_meta:
            pytest.fail("an init ran on real memory during loading")
        return tensor

    for fn in ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, fn, refuse_real_init)
    model = GPT.from_pretrained(path)
    monkeypatch.undo()
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params.values())
    # every parameter has storage of its own (nothing aliased between parameters)
    pointers = [p.untyped_storage().data_ptr() for p in params.values()]
    assert len(set(pointers)) == len(pointers)
    # and holds the checkpoint's values (HF's Conv1D weights transposed to nn.Linear)
    hf_state = hf_model.state_dict()
    for name, p in params.items():
        expected = hf_state[name]
        if p.dim() == 2 and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected = expected.t()
        assert torch.equal(p, expected), name
    assert not model.training


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", "bf16"])
def test_dtype_argument(checkpoint, dtype):
    path, hf_model = checkpoint
    model = GPT.from_pretrained(path, dtype=dtype)
    want = {"float16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)
    assert model.dtype == want and all(p.dtype == want for p in model.parameters())
    # the values are the checkpoint's, rounded once to the dtype
    wte = hf_model.state_dict()["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, wte.to(want))


# ----------------------------------------------------------------------------------------------- save
def _random_fastgpt_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=173, n_positions=40, n_embd=48, n_layer=2, n_head=4, eos_token_id=172,
                         bos_token_id=172)).eval()


def test_save_pretrained_round_trips_through_transformers(reference_path, tmp_path):
    from transformers import GPT2LMHeadModel

    model = _random_fastgpt_model()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    hf_model = GPT2LMHeadModel.from_pretrained(out).eval()
    _assert_same_logits(model, hf_model, seed=1)
    reloaded = GPT.from_pretrained(out)
    assert reloaded.config == model.config
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_save_pretrained_with_tokenizer(tmp_path):
    from fastgpt import Tokenizer

    tok = train_tiny_tokenizer()
    out = tmp_path / "saved"
    _random_fastgpt_model().save_pretrained(out, tokenizer=tok)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    assert Tokenizer.from_pretrained(out).encode("the quick fox") == tok.encode("the quick fox")


def test_save_leaves_no_temporary_files(tmp_path):
    out = tmp_path / "saved"
    _random_fastgpt_model().save_pretrained(out, tokenizer=train_tiny_tokenizer())
    _random_fastgpt_model(seed=1).save_pretrained(out)  # overwrite in place
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.startswith(".")]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "saved"
    first = _random_fastgpt_model(seed=0)
    first.save_pretrained(out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        _random_fastgpt_model(seed=1).save_pretrained(out)
    monkeypatch.undo()
    after = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert after == before  # same files, same bytes, no temporary left behind
    reloaded = GPT.from_pretrained(out)
    assert torch.equal(reloaded.transformer.wte.weight, first.transformer.wte.weight)
