"""GPT and GPTConfig: presets, config conversion, and logits parity with transformers' GPT2LMHeadModel.

Parity runs on the reference path (plain PyTorch) for several shapes, and once, on a small model,
through the Triton kernels under the interpreter. fp32 throughout: <= 1e-4 relative to the logits' scale.
"""

import json

import pytest
import torch

from fastgpt import GPT, GPTConfig
from fastgpt.config import PRESETS
from helpers import TINY, make_hf_checkpoint, max_rel_err, random_ids
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

FP32_REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------- config
def test_gpt2_preset_has_124M_params():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated or initialised


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_match_transformers_param_count(preset):
    """Every preset builds the same parameter count as transformers' GPT-2 of that shape (tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        ours = GPT(GPTConfig.from_preset(preset))
        theirs = GPT2LMHeadModel(GPT2Config(**PRESETS[preset]))
    assert ours.num_params() == theirs.num_parameters()


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt3'.*gpt2-medium"):
        GPTConfig.from_preset("gpt3")


def test_preset_overrides():
    cfg = GPTConfig.from_preset("gpt2", n_positions=256, vocab_size=1000)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (12, 12, 768, 256, 1000)
    assert cfg.head_dim == 64


def _hf_config_dict(**changes):
    from transformers import GPT2Config

    base = dict(vocab_size=517, n_positions=96, n_embd=48, n_layer=3, n_head=3, layer_norm_epsilon=3e-5,
                bos_token_id=7, eos_token_id=11)
    return GPT2Config(**{**base, **changes}).to_dict()


def test_from_hf_reads_a_transformers_config_dict():
    cfg = GPTConfig.from_hf(_hf_config_dict())
    # GPT2Config's dropouts (0.1 each) are read too; attention dropout is recorded but not applied
    assert cfg == GPTConfig(vocab_size=517, n_positions=96, n_embd=48, n_layer=3, n_head=3,
                            layer_norm_epsilon=3e-5, bos_token_id=7, eos_token_id=11,
                            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    assert GPTConfig.from_hf(_hf_config_dict(resid_pdrop=0.25, embd_pdrop=0.0)).resid_pdrop == 0.25


def test_from_hf_reads_a_config_object_and_a_path(tmp_path):
    from transformers import GPT2Config

    hf_cfg = GPT2Config(**{k: v for k, v in _hf_config_dict().items() if k != "transformers_version"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_config_dict()))
    assert GPTConfig.from_hf(hf_cfg) == GPTConfig.from_hf(str(path)) == GPTConfig.from_hf(_hf_config_dict())


def test_to_hf_round_trips_and_transformers_accepts_it():
    from transformers import GPT2Config

    cfg = GPTConfig(vocab_size=333, n_positions=77, n_embd=40, n_layer=5, n_head=5, layer_norm_epsilon=2e-5,
                    bos_token_id=3, eos_token_id=4)
    assert GPTConfig.from_hf(cfg.to_hf()) == cfg
    assert GPTConfig.from_hf(GPT2Config(**cfg.to_hf())) == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=50, n_head=4), "n_embd=50 is not divisible by n_head=4"),
    (dict(n_layer=0), "n_layer must be >= 1"),
    (dict(vocab_size=-5), "vocab_size must be >= 1"),
    (dict(n_head=0), "n_head must be >= 1"),
    (dict(n_positions=0), "n_positions must be >= 1"),
])
def test_bad_config_values_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), "model_type 'llama' is not a GPT-2 model"),
    (dict(activation_function="relu"), "activation_function 'relu' is not supported"),
    (dict(n_inner=100), "n_inner=100 is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(scale_attn_weights=False), "scale_attn_weights=false"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
    (dict(n_embd=50), "not divisible"),
])
def test_from_hf_rejects_unsupported_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_hf({**_hf_config_dict(), **changes})


def test_from_hf_names_a_missing_field():
    d = _hf_config_dict()
    del d["n_embd"]
    with pytest.raises(ValueError, match="lacks the field 'n_embd'"):
        GPTConfig.from_hf(d)


def test_from_hf_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{ not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        GPTConfig.from_hf(str(path))


# ------------------------------------------------------------------------------------- logits parity
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(dir, hf_model): n_embd 64, 2 layers, 4 heads, 101 tokens, written by transformers."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """Odd shapes: head dim 16, 3 heads, 3 layers, vocab 251, context 80."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("odd"), seed=2, vocab_size=251, n_embd=48, n_head=3,
                              n_layer=3, n_positions=80)


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


@pytest.mark.parametrize("which, batch, length", [
    ("tiny", 1, 1), ("tiny", 2, 37), ("tiny", 3, 64), ("odd", 1, 23), ("odd", 2, 80),
])
def test_logits_match_transformers(reference_path, tiny_checkpoint, odd_checkpoint, which, batch, length):
    path, hf_model = tiny_checkpoint if which == "tiny" else odd_checkpoint
    model = GPT.from_pretrained(path)
    ids = random_ids(batch, length, model.config.vocab_size, seed=length)
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (batch, length, model.config.vocab_size)
    assert ours.dtype == torch.float32
    assert max_rel_err(ours, _hf_logits(hf_model, ids)) <= FP32_REL_TOL


def test_last_only_is_the_last_row_of_the_full_logits(reference_path, odd_checkpoint):
    model = GPT.from_pretrained(odd_checkpoint[0])
    ids = random_ids(2, 19, model.config.vocab_size, seed=5)
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_cached_prefill_and_decode_match_transformers(reference_path, odd_checkpoint):
    """Prefill a prompt into the KV cache, then feed tokens one at a time: every step's logits equal the
    full-sequence logits of transformers at that position."""
    path, hf_model = odd_checkpoint
    model = GPT.from_pretrained(path)
    B, T_prompt, T = 2, 11, 20
    ids = random_ids(B, T, model.config.vocab_size, seed=9)
    expected = _hf_logits(hf_model, ids)
    model.setup_caches(max_batch=B, max_len=T)
    with torch.no_grad():
        prefill = model(ids[:, :T_prompt], input_pos=torch.arange(T_prompt))
        assert max_rel_err(prefill, expected[:, :T_prompt]) <= FP32_REL_TOL
        for t in range(T_prompt, T):
            seqlens = torch.full((B,), t + 1, dtype=torch.int32)
            step = model(ids[:, t:t + 1], input_pos=torch.tensor([t]), cache_seqlens=seqlens)
            assert max_rel_err(step[:, 0], expected[:, t]) <= FP32_REL_TOL, f"position {t}"


def test_sequence_longer_than_context_raises(reference_path, odd_checkpoint):
    model = GPT.from_pretrained(odd_checkpoint[0])
    ids = random_ids(1, 81, model.config.vocab_size)
    with pytest.raises(ValueError, match="sequence length 81 exceeds the context length 80"):
        model(ids)
    with pytest.raises(ValueError, match="max_len=81 exceeds the context length 80"):
        model.setup_caches(max_batch=1, max_len=81)


def test_input_pos_without_cache_raises(reference_path):
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(RuntimeError, match="call setup_caches"):
        model(random_ids(1, 3, 50), input_pos=torch.arange(3))


def test_own_init_is_seeded_and_not_degenerate():
    """GPT's own random init: reproducible under a seed, finite, and not all-equal."""
    cfg = GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    a = GPT(cfg)
    torch.manual_seed(0)
    b = GPT(cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert torch.isfinite(p).all(), name
    assert a.transformer.wte.weight.std() > 0.01


# --------------------------------------------------------------------------- through the Triton kernels
def test_logits_match_transformers_through_triton_kernels(interpreter_path, tiny_checkpoint):
    """One small case (n_embd 64, 2 layers, 4 heads, T 19) with every op run by its Triton kernel
    (under Triton's interpreter on CPU)."""
    path, hf_model = tiny_checkpoint
    model = GPT.from_pretrained(path)
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head) == (64, 2, 4) == (
        TINY["n_embd"], TINY["n_layer"], TINY["n_head"])
    ids = random_ids(1, 19, model.config.vocab_size, seed=19)
    with torch.no_grad():
        ours = model(ids)
    assert max_rel_err(ours, _hf_logits(hf_model, ids)) <= FP32_REL_TOL


# ---------------------------------------------------------------------------------- training forward
def _dropout_model(p=0.2):
    torch.manual_seed(3)
    return GPT(GPTConfig(vocab_size=40, n_positions=12, n_embd=32, n_layer=2, n_head=2, resid_pdrop=p, embd_pdrop=p))


@pytest.mark.parametrize("path", ["reference", "interpreter"])
def test_loss_equals_cross_entropy_of_the_logits(path, monkeypatch):
    """model(ids, targets=...) is F.cross_entropy of model(ids)'s logits (mean or sum, ignored targets
    left out), on both paths; with targets, input_pos / last_only are refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")
    model = _dropout_model(0.0).eval()
    ids = random_ids(2, 9, 40, seed=1)
    y = random_ids(2, 9, 40, seed=2)
    y[:, :2] = -100
    with torch.no_grad():
        logits = model(ids)
        for reduction in ("mean", "sum"):
            want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)
            got = model(ids, targets=y, reduction=reduction)
            assert max_rel_err(got, want) <= 1e-5, reduction
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=y, last_only=True)


@pytest.mark.parametrize("path", ["reference", "interpreter"])
def test_dropout_acts_in_training_only(path, monkeypatch):
    """resid_pdrop / embd_pdrop change training-mode outputs (seeded: the same seed, the same masks),
    and never eval-mode ones; on the interpreter the MLP's dropout is the Triton epilogue's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")
    dropped, plain = _dropout_model(0.2), _dropout_model(0.0)
    ids = random_ids(1, 7, 40, seed=4)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(ids), plain.eval()(ids))
        dropped.train()
        torch.manual_seed(9)
        a = dropped(ids)
        torch.manual_seed(9)
        b = dropped(ids)
        torch.manual_seed(10)
        c = dropped(ids)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, plain(ids))


def test_set_dropout_and_unsupported_attention_dropout():
    model = GPT(GPTConfig(vocab_size=40, n_positions=12, n_embd=32, n_layer=1, n_head=2, attn_pdrop=0.1))
    with pytest.warns(UserWarning, match="attn_pdrop=0.1 is not applied"):
        model.train()
    model.set_dropout(0.3, 0.05)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.3, 0.05, 0.0)
    assert model.transformer.drop.p == 0.05 and model.transformer.h[0].attn.resid_dropout.p == 0.3
    assert model.transformer.h[0].mlp.resid_pdrop == 0.3
    with pytest.raises(ValueError, match="resid_pdrop must be in"):
        GPTConfig(resid_pdrop=1.0)
