"""fastgpt.patch_transformers: a transformers GPT-2 run through fastgpt's ops gives transformers' results.

Every comparison is patched vs an unpatched deep copy of the same random-weight model (fp32):
logits on the reference path for several shapes and under the interpreter (the Triton kernels, counted
by spies on their launchers), greedy generate with and without left padding, seeded sampling, beam
search, gradients (training, gradient checkpointing, a PEFT LoRA run), the fallbacks, and unpatch.
A spy on the public ops shows the patched code ran on the reference path too (else parity proves nothing).
"""

import copy
import warnings

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2DoubleHeadsModel, GPT2LMHeadModel, GPT2Model

import fastgpt
import kernels
from fastgpt.integrations import transformers as integration
from helpers import make_hf_model, max_rel_err, random_ids
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

FP32_REL_TOL = 1e-4  # model-level, as tests/test_model.py: a dozen rounded ops chained per layer
FP32_GRAD_FLOOR = 1e-5  # gradients: <= 3x transformers' own fp32 error vs float64, or this
ODD = dict(vocab_size=211, n_embd=48, n_head=3, n_layer=3, n_positions=72)
SIZES = {
    "odd": ODD,
    "tiny": dict(vocab_size=101, n_embd=64, n_head=4, n_layer=2, n_positions=64, layer_norm_epsilon=1e-6),
    # what the patch honours beyond GPTConfig.from_hf: per-layer attention scale, a 3C MLP, an untied head
    "variants": dict(vocab_size=97, n_embd=40, n_head=5, n_layer=2, n_positions=40, n_inner=120,
                     scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False),
    "unscaled": dict(vocab_size=89, n_embd=32, n_head=2, n_layer=2, n_positions=32, scale_attn_weights=False),
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process fallback warnings afresh."""
    monkeypatch.setattr(integration, "_warned", set())


@pytest.fixture
def op_calls(monkeypatch):
    """Calls of each public op made by the patched model (counted, then run as usual)."""
    calls = {}
    for name in ("flash_attention", "decode_attention", "layer_norm", "gelu_mlp"):
        def counted(*args, _op=getattr(kernels, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.fixture
def launches(monkeypatch):
    """Triton launches per kernel (each spy calls the real launcher)."""
    counts = {}
    for mod, fn in ((kernels._attention, "flash_attention_fwd"), (kernels._decode_attention, "decode_attention_fwd"),
                    (kernels._layer_norm, "layer_norm_fwd"), (kernels._gelu_mlp, "gelu_mlp_fwd")):
        def launched(*args, _real=getattr(mod, fn), _name=fn, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(mod, fn, launched)
    return counts


def _pair(seed=1, **config):
    """(patched, unpatched) copies of one random-weight GPT2LMHeadModel."""
    hf = make_hf_model(seed=seed, **{**ODD, **config})
    return fastgpt.patch_transformers(copy.deepcopy(hf)), hf


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _generate(model, ids, n, mask=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    kw.setdefault("do_sample", False)
    with torch.no_grad():  # eos None: exactly n steps; pad_token_id silences HF's notice
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=0, **kw)


def _left_padded(vocab_size, seed=5):
    """A batch of 3 prompts of lengths 11, 6, 9, left-padded to 11 with a token the prompts also use."""
    ids = random_ids(3, 11, vocab_size, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 5), (2, 2)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------- refusals
def test_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="GPT2LMHeadModel or GPT2Model.*got Linear"):
        fastgpt.patch_transformers(torch.nn.Linear(2, 2))
    small = dict(vocab_size=50, n_embd=16, n_head=2, n_layer=1, n_positions=16)
    with pytest.raises(TypeError, match="got GPT2DoubleHeadsModel"):
        fastgpt.patch_transformers(GPT2DoubleHeadsModel(GPT2Config(**small)))
    for change, message in ((dict(add_cross_attention=True), "add_cross_attention"),
                            (dict(activation_function="relu"), "activation_function='relu'"),
                            (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn")):
        model = GPT2LMHeadModel(GPT2Config(**small, **change))
        with pytest.raises(ValueError, match=message):
            fastgpt.patch_transformers(model)
        assert not integration.is_patched(model)  # refused before anything was touched
        assert type(model.transformer.h[0]).__qualname__ == "GPT2Block"


def test_importing_fastgpt_does_not_import_transformers():
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "import sys, fastgpt; assert 'transformers' not in sys.modules"], check=True)


# --------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("size", sorted(SIZES))
def test_logits_match_on_the_reference_path(reference_path, op_calls, size):
    cfg = SIZES[size]
    patched, hf = _pair(seed=len(size), **cfg)
    ids = random_ids(2, 17, cfg["vocab_size"], seed=3)
    assert max_rel_err(_logits(patched, ids), _logits(hf, ids)) <= FP32_REL_TOL
    L = cfg["n_layer"]
    assert op_calls == {"flash_attention": L, "layer_norm": 2 * L + 1, "gelu_mlp": L}


def test_base_model_matches(reference_path, op_calls):
    hf = make_hf_model(seed=2, **ODD).transformer
    patched = fastgpt.patch_transformers(copy.deepcopy(hf))
    ids = random_ids(3, 10, ODD["vocab_size"], seed=4)
    with torch.no_grad():
        ours, theirs = patched(ids).last_hidden_state, hf(ids).last_hidden_state
    assert max_rel_err(ours, theirs) <= FP32_REL_TOL
    assert op_calls["flash_attention"] == ODD["n_layer"]


@pytest.mark.parametrize("size", ["odd", "variants"])
def test_logits_match_through_triton_kernels(interpreter_path, launches, size):
    cfg = SIZES[size]
    patched, hf = _pair(seed=3, **cfg)
    ids = random_ids(2, 13, cfg["vocab_size"], seed=6)
    assert max_rel_err(_logits(patched, ids), _logits(hf, ids)) <= FP32_REL_TOL
    L = cfg["n_layer"]
    assert launches == {"flash_attention_fwd": L, "layer_norm_fwd": 2 * L + 1, "gelu_mlp_fwd": L}


def test_mlp_gets_views_of_the_conv1d_weights(reference_path, monkeypatch):
    """HF's Conv1D stores (in, out); gelu_mlp is handed the (out, in) transposes as views, not copies."""
    patched, _ = _pair()
    seen = []
    real = kernels.gelu_mlp
    monkeypatch.setattr(kernels, "gelu_mlp", lambda x, fw, fb, pw, pb, **kw: seen.append((fw, pw)) or real(
        x, fw, fb, pw, pb, **kw))
    _logits(patched, random_ids(1, 5, ODD["vocab_size"]))
    mlp = patched.transformer.h[0].mlp
    fw, pw = seen[0]
    C, F = mlp.c_fc.weight.shape
    assert fw.shape == (F, C) and pw.shape == (C, F)
    assert fw.data_ptr() == mlp.c_fc.weight.data_ptr() and pw.data_ptr() == mlp.c_proj.weight.data_ptr()
    assert fw.stride() == (1, F) and pw.stride() == (1, C)


def test_left_padded_forward_matches(reference_path, op_calls):
    """A padding mask reaches the attention: it takes transformers' SDPA with the mask, never flash."""
    patched, hf = _pair(seed=4)
    ids, mask = _left_padded(ODD["vocab_size"])
    ours, theirs = _logits(patched, ids, attention_mask=mask), _logits(hf, ids, attention_mask=mask)
    real = mask.bool()
    assert max_rel_err(ours[real], theirs[real]) <= FP32_REL_TOL
    assert "flash_attention" not in op_calls and op_calls["gelu_mlp"] == ODD["n_layer"]


# ----------------------------------------------------------------------------------------- generation
def test_greedy_generate_matches(reference_path, op_calls):
    patched, hf = _pair(seed=5)
    ids = random_ids(2, 9, ODD["vocab_size"], seed=7)
    n = 12
    ours = _generate(patched, ids, n)
    assert len(set(ours[0, 9:].tolist())) >= 4  # a real, varied continuation
    assert ours.tolist() == _generate(hf, ids, n).tolist()
    L = ODD["n_layer"]  # prefill through flash, every later step through decode_attention over HF's cache
    assert op_calls["flash_attention"] == L and op_calls["decode_attention"] == L * (n - 1)


def test_greedy_generate_with_left_padding_matches(reference_path):
    patched, hf = _pair(seed=6)
    ids, mask = _left_padded(ODD["vocab_size"], seed=8)
    ours = _generate(patched, ids, 10, mask=mask)
    assert ours.tolist() == _generate(hf, ids, 10, mask=mask).tolist()
    # and each padded row is what that prompt alone, unpadded, generates
    for row, pad in ((1, 5), (2, 2)):
        alone = _generate(patched, ids[row:row + 1, pad:], 10)
        assert alone[0].tolist() == ours[row, pad:].tolist()


def test_sampling_with_a_seed_matches(reference_path):
    patched, hf = _pair(seed=7)
    ids = random_ids(2, 6, ODD["vocab_size"], seed=9)
    runs = []
    for model in (patched, hf):
        torch.manual_seed(1234)
        runs.append(_generate(model, ids, 10, do_sample=True, temperature=0.9, top_k=40, top_p=0.95))
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].tolist() != _generate(hf, ids, 10).tolist()  # it did sample


def test_beam_search_matches(reference_path):
    patched, hf = _pair(seed=8)
    ids = random_ids(2, 7, ODD["vocab_size"], seed=10)
    ours = _generate(patched, ids, 8, num_beams=3, num_return_sequences=2)
    assert ours.shape == (4, 15)
    assert ours.tolist() == _generate(hf, ids, 8, num_beams=3, num_return_sequences=2).tolist()


def test_generate_through_triton_kernels(interpreter_path, launches):
    patched, hf = _pair(seed=9)
    ids = random_ids(2, 7, ODD["vocab_size"], seed=11)
    assert _generate(patched, ids, 3).tolist() == _generate(hf, ids, 3).tolist()
    L = ODD["n_layer"]
    assert launches["flash_attention_fwd"] == L and launches["decode_attention_fwd"] == 2 * L


# ------------------------------------------------------------------------------------------- training
def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours: dict, theirs: dict, truth: dict) -> None:
    """Each gradient within 3x transformers' own fp32 error against float64 (or fp32 tolerance)."""
    assert ours.keys() == theirs.keys() == truth.keys()
    for name in truth:
        tol = max(3 * max_rel_err(theirs[name], truth[name]), FP32_GRAD_FLOOR)
        assert max_rel_err(ours[name], truth[name]) <= tol, name


@pytest.mark.parametrize("path", ["reference_path", "interpreter_path"])
def test_gradients_match(request, path):
    request.getfixturevalue(path)
    patched, hf = _pair(seed=10)
    for model in (patched, hf):
        model.train()
    ids = random_ids(2, 9, ODD["vocab_size"], seed=12)
    truth = _grads(copy.deepcopy(hf).double(), ids)
    _assert_grads_close(_grads(patched, ids), _grads(hf, ids), truth)


def test_gradient_checkpointing_still_works(reference_path, op_calls):
    patched, hf = _pair(seed=11)
    ids = random_ids(2, 9, ODD["vocab_size"], seed=13)
    for model in (patched, hf):
        model.train()
    expected = _grads(hf, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 renames it to activation_checkpointing
        patched.gradient_checkpointing_enable()
    op_calls.clear()
    got = _grads(patched, ids)
    L = ODD["n_layer"]
    assert op_calls["layer_norm"] == 2 * (2 * L) + 1  # every block's forward ran again in the backward
    for name in expected:
        assert max_rel_err(got[name], expected[name]) <= FP32_GRAD_FLOOR, name


def test_peft_lora_on_c_attn_trains_and_matches(reference_path):
    base = make_hf_model(seed=12, **ODD)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                             init_lora_weights=False)  # random A and B: the adapter changes the output from step 0
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = peft.get_peft_model(copy.deepcopy(base), config)
    ours.load_state_dict(theirs.state_dict())
    fastgpt.patch_transformers(ours)  # the PEFT wrapper itself: the patch finds the GPT-2 inside
    ids = random_ids(2, 9, ODD["vocab_size"], seed=14)
    assert max_rel_err(_logits(ours, ids), _logits(base, ids)) > 1e-2  # the adapter is applied
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0]  # it trained
    assert losses["ours"] == pytest.approx(losses["theirs"], rel=FP32_REL_TOL)
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            assert max_rel_err(trained[n].detach(), p.detach()) <= FP32_REL_TOL, n


# ------------------------------------------------------------------------------------------ fallbacks
def _fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, integration.FallbackWarning)]


def test_attention_dropout_while_training_falls_back_once(reference_path, op_calls):
    patched, hf = _pair(seed=13)
    ids = random_ids(2, 9, ODD["vocab_size"], seed=15)
    for model in (patched, hf):
        model.train()
        for m in model.modules():  # GPT-2's own dropout: embeddings, attention, both residual branches
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = []
        for model in (patched, patched, hf):
            torch.manual_seed(99)  # the same dropout masks: HF's SDPA, resid and MLP dropout in HF's order
            outs.append(_logits(model, ids))
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "attention dropout" in messages[0]
    assert max_rel_err(outs[0], outs[2]) <= FP32_REL_TOL
    assert "flash_attention" not in op_calls and op_calls["gelu_mlp"] == 2 * ODD["n_layer"]
    patched.eval()  # no dropout at inference: the kernels again
    _logits(patched, ids)
    assert op_calls["flash_attention"] == ODD["n_layer"]


def test_output_attentions_falls_back_once_to_eager(reference_path):
    patched, hf = _pair(seed=14)
    hf.set_attn_implementation("eager")  # the unpatched model that returns attention weights
    ids = random_ids(2, 8, ODD["vocab_size"], seed=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            ours = patched(ids, output_attentions=True)
            patched(ids, output_attentions=True)
            theirs = hf(ids, output_attentions=True)
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "output_attentions" in messages[0]
    assert len(ours.attentions) == len(theirs.attentions) == ODD["n_layer"]
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == b.shape == (2, ODD["n_head"], 8, 8)
        assert max_rel_err(a, b) <= FP32_REL_TOL
    assert max_rel_err(ours.logits, theirs.logits) <= FP32_REL_TOL


def test_lora_on_the_mlp_falls_back_once(reference_path):
    base = make_hf_model(seed=15, **ODD)
    config = peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = fastgpt.patch_transformers(copy.deepcopy(theirs))
    ids = random_ids(1, 6, ODD["vocab_size"], seed=17)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert max_rel_err(_logits(ours, ids), _logits(theirs, ids)) <= FP32_REL_TOL
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "c_fc" in messages[0]


def test_head_mask_is_refused(reference_path):
    patched, _ = _pair()
    with pytest.raises(ValueError, match="head_mask"):
        patched(random_ids(1, 4, ODD["vocab_size"]), head_mask=torch.ones(ODD["n_layer"], ODD["n_head"]))


# -------------------------------------------------------------------------------------------- unpatch
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unpatch_restores_the_exact_outputs(reference_path, attn_implementation):
    model = make_hf_model(seed=16, **ODD)
    model.set_attn_implementation(attn_implementation)
    ids = random_ids(2, 11, ODD["vocab_size"], seed=18)
    before = _logits(model, ids)
    generated = _generate(model, ids, 5)
    assert fastgpt.patch_transformers(model) is model
    assert fastgpt.patch_transformers(model) is model  # twice is a no-op
    assert integration.is_patched(model) and model.config._attn_implementation == "fastgpt"
    assert not torch.equal(_logits(model, ids), before)  # the kernels' rounding, not HF's: it was patched
    assert fastgpt.unpatch_transformers(model) is model
    assert not integration.is_patched(model) and model.config._attn_implementation == attn_implementation
    assert {type(m).__qualname__ for m in model.modules()} & {"FastGPT2Block", "FastGPT2MLP", "FastLayerNorm"} == set()
    assert torch.equal(_logits(model, ids), before)
    assert torch.equal(_generate(model, ids, 5), generated)


def test_class_level_patch_applies_to_models_built_later(reference_path, tmp_path):
    small = dict(vocab_size=50, n_embd=16, n_head=2, n_layer=2, n_positions=16)
    make_hf_model(seed=17, **small).save_pretrained(tmp_path)
    unpatched = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    fastgpt.patch_transformers()
    try:
        built = GPT2LMHeadModel(GPT2Config(**small))
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        base = GPT2Model(GPT2Config(**small))
    finally:
        fastgpt.unpatch_transformers()
    assert all(integration.is_patched(m) for m in (built, loaded, base))
    assert loaded.config._attn_implementation == "fastgpt"
    ids = random_ids(2, 7, small["vocab_size"], seed=19)
    assert max_rel_err(_logits(loaded, ids), _logits(unpatched, ids)) <= FP32_REL_TOL
    assert not integration.is_patched(GPT2LMHeadModel(GPT2Config(**small)))  # the hook is gone
    with pytest.warns(integration.FallbackWarning, match="left GPT2Model unpatched: add_cross_attention"):
        fastgpt.patch_transformers()
        try:  # a GPT-2 the patch refuses is still built, unpatched, with one warning
            refused = GPT2LMHeadModel(GPT2Config(**small, add_cross_attention=True))
        finally:
            fastgpt.unpatch_transformers()
    assert not integration.is_patched(refused)
    fastgpt.unpatch_transformers(loaded)
    assert torch.equal(_logits(loaded, ids), _logits(unpatched, ids))


# ---------------------------------------------------------------------------------------- torch.compile
def test_the_triton_gemms_read_the_conv1d_weights_in_place(interpreter_path, monkeypatch):
    """The kernels' GEMM takes each transposed Conv1D view as it is (its W_T layout): no copy of a weight."""
    patched, _ = _pair()
    operands = []
    real = kernels._gelu_mlp._operand

    def spy(t):
        out = real(t)
        operands.append((out[0].data_ptr(), out[1]))
        return out

    monkeypatch.setattr(kernels._gelu_mlp, "_operand", spy)
    _logits(patched, random_ids(1, 5, ODD["vocab_size"]))
    for block in patched.transformer.h:
        for conv in (block.mlp.c_fc, block.mlp.c_proj):
            assert (conv.weight.data_ptr(), True) in operands  # read in place, transposed


def test_a_patched_model_compiles_whole_and_matches(reference_path):
    """fullgraph=True (a break raises): Inductor's logits equal HF's own; a prefill with HF's DynamicCache
    and a decode step over it trace as one graph each; a training step (loss from the logits: HF's
    labels= loss breaks the graph in transformers' own code) gives HF's loss and gradients."""
    torch._dynamo.reset()
    patched, hf = _pair(**SIZES["tiny"])
    ids = random_ids(2, 9, SIZES["tiny"]["vocab_size"])
    with torch.no_grad():
        compiled = torch.compile(lambda ids: patched(ids).logits, fullgraph=True)
        assert max_rel_err(compiled(ids), _logits(hf, ids)) < FP32_REL_TOL
        torch._dynamo.reset()
        assert torch._dynamo.explain(lambda ids: patched(ids, use_cache=True))(ids).graph_break_count == 0
        cache = patched(ids, use_cache=True).past_key_values
        step = torch._dynamo.explain(lambda t: patched(t, past_key_values=cache, use_cache=True).logits)
        assert step(ids[:, -1:]).graph_break_count == 0
    torch._dynamo.reset()

    def loss_of(model):
        logits = model(ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    patched.train(), hf.train()
    loss = torch.compile(loss_of, backend="aot_eager", fullgraph=True)(patched)
    expected = loss_of(hf)
    torch.testing.assert_close(loss, expected, rtol=FP32_REL_TOL, atol=0)
    loss.backward(), expected.backward()
    for (name, p), q in zip(patched.named_parameters(), hf.parameters()):
        assert max_rel_err(p.grad, q.grad) < FP32_REL_TOL, name
    torch._dynamo.reset()
