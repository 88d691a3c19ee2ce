"""The CPU decode paths: each gives the tokens and (within fp32 rounding) the logits of the plain path.

The plain path is a freshly loaded model in nn.Linear's (out, in) layout running kernels.reference; every
faster CPU path must agree with it: the weight layout of GPT.use_cpu_decode_layout, a decode step's
product split across threads (kernels.reference.linear: over the input features of an (in, out) weight,
over the output rows of an (out, in) one) and its fallback, F.linear, when there is one thread, no MKL or
a shape it does not take, and decode attention without its mask when no row is shorter than the longest.
Agreement means the same greedy tokens and logits within 1e-5 of their scale (the fp32 rounding of
another summation order). Speed is the benchmarks' business (benchmarks/bench_cpu_matvec.py,
python -m benchmarks.bench_generate --cpu-decode).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from fastgpt import GPT
from fastgpt.generate import generate
from helpers import make_hf_checkpoint, max_rel_err, random_ids
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from kernels import reference

FP32_REL_TOL = 1e-5
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Odd sizes: vocab 211, width 48, 3 heads, 3 layers, context 64."""
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("cpu_decode"), seed=11, vocab_size=211, n_embd=48,
                                 n_head=3, n_layer=3, n_positions=64)
    return path


def _decode_logits(model, ids, n):
    """(tokens (B, T + n), per-step logits (n, B, V)) of greedy decoding with the KV cache."""
    steps = []
    B, T = ids.shape
    with torch.inference_mode():
        model.setup_caches(max_batch=B, max_len=T + n)
        logits = model(ids, input_pos=torch.arange(T), last_only=True)[:, -1]
        out = [ids]
        for t in range(T, T + n):
            steps.append(logits)
            tok = logits.argmax(-1)
            out.append(tok[:, None])
            seqlens = torch.full((B,), t + 1, dtype=torch.int32)
            logits = model(tok[:, None], input_pos=torch.tensor([t]), cache_seqlens=seqlens)[:, -1]
    return torch.cat(out, 1), torch.stack(steps)


@pytest.fixture(params=["split-2", "split-3", "f.linear-1-thread", "f.linear-no-mkl"])
def matvec_path(request, monkeypatch, reference_path):
    """Each way a decode step's CPU linear can go: split over 2 or 3 threads (the block count divides the
    split dimension), or F.linear because there is one thread or no MKL in this torch."""
    threads = {"split-2": 2, "split-3": 3, "f.linear-1-thread": 1, "f.linear-no-mkl": 2}[request.param]
    torch.set_num_threads(threads)  # one_torch_thread restores it afterwards
    monkeypatch.setattr(reference, "_MKL", request.param != "f.linear-no-mkl")
    monkeypatch.setattr(reference, "SPLIT_MIN_WEIGHT", 0)  # the small test shapes split too
    return request.param


def _expected_plan(path, how, dim):
    """linear_plan's answer on this path for a split of kind `how` along a dimension of size dim."""
    splits = 1 if path.startswith("f.linear") else math.gcd(int(path[-1]), dim)
    return (how, splits) if splits > 1 else ("f.linear", 1)


# ------------------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (211, 48), (9, 6), (6, 1)])
def test_linear_matches_float64(matvec_path, rows, out_features, in_features):
    """Both storage orders, with and without bias, against float64: split-K for an (in, out) weight,
    split-rows for an (out, in) one, at every row count up to SPLIT_MAX_ROWS."""
    g = torch.Generator().manual_seed(out_features + in_features + rows)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, in_features, generator=g) * 10  # large magnitudes: errors relative to the scale
    want = x.double() @ w.double().t() + b.double()
    w_in_major = w.t().contiguous().t()  # (in, out) storage, as the CPU layout keeps most weights
    for weight in (w, w_in_major):
        for bias in (b, None):
            y = kernels.linear(x, weight, bias)
            assert y.shape == (rows, 1, out_features) and y.dtype == torch.float32
            ref = want if bias is not None else want - b.double()
            assert max_rel_err(y, ref) <= FP32_REL_TOL
    if in_features > 1:  # a (6, 1) weight is contiguous both ways; which split it takes is immaterial
        assert reference.linear_plan(x, w_in_major, b) == _expected_plan(matvec_path, "split-k", in_features)
        assert reference.linear_plan(x, w, b) == _expected_plan(matvec_path, "split-rows", out_features)


def test_linear_takes_f_linear_for_many_rows_autograd_and_other_dtypes(matvec_path):
    """Prefill-sized products, anything autograd must see, and non-fp32 dtypes (the float64 truth) never
    split; autograd through the plain path still gives the weight's gradient."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g).t().contiguous().t()
    x_many = torch.randn(reference.SPLIT_MAX_ROWS + 1, 48, generator=g)
    assert reference.linear_plan(x_many, w) == ("f.linear", 1)
    torch.testing.assert_close(kernels.linear(x_many, w), F.linear(x_many, w), rtol=0, atol=0)
    assert reference.linear_plan(x_many[:3].double(), w.double().t().contiguous().t()) == ("f.linear", 1)
    wt = torch.randn(48, 64, generator=g).requires_grad_()  # (in, out) storage, viewed as (out, in)
    x1 = torch.randn(1, 48, generator=g)
    assert reference.linear_plan(x1, wt.t()) == ("f.linear", 1)
    kernels.linear(x1, wt.t()).sum().backward()
    torch.testing.assert_close(wt.grad, x1.t().expand(48, 64))
    with torch.no_grad():  # the same weight without autograd may split
        assert reference.linear_plan(x1, wt.t()) == _expected_plan(matvec_path, "split-k", 48)


def test_linear_keeps_small_weights_on_f_linear(reference_path, monkeypatch):
    """A weight under SPLIT_MIN_WEIGHT is read faster than a parallel region opens: F.linear."""
    torch.set_num_threads(2)
    monkeypatch.setattr(reference, "_MKL", True)
    x = torch.randn(1, 768)
    assert reference.linear_plan(x, torch.randn(768, 2304).t()) == ("split-k", 2)  # gpt2's c_attn, (in, out)
    assert reference.linear_plan(torch.randn(1, 3072), torch.randn(768, 3072)) == ("split-rows", 2)  # mlp.c_proj
    assert reference.linear_plan(x[:, :96], torch.randn(64, 96).t()) == ("f.linear", 1)


def test_linear_under_autocast_is_f_linear(matvec_path):
    """Under CPU autocast the operands may differ in dtype (a bf16 activation, an fp32 weight) and the
    product is F.linear's, cast as autocast says: never split, whose partial sums autocast would round."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=g).t().contiguous().t()
    b = torch.randn(64, generator=g)
    x = torch.randn(1, 48, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference.linear_plan(x, w, b) == ("f.linear", 1)
        for xi in (x, x.bfloat16()):
            y = kernels.linear(xi, w, b)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y, F.linear(xi, w, b), rtol=0, atol=0)


def test_linear_validates_its_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.linear(x, torch.randn(4, 7))
    with pytest.raises(TypeError, match="weight has dtype"):
        kernels.linear(x, torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.linear(x, torch.randn(4, 8), torch.randn(5))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        kernels.linear(x, torch.randn(4, 8, 1))


# ------------------------------------------------------------------------------------ decode attention
def _attention_f64(q, k, v, lens, scale):
    """softmax(q k^T * scale) v over each row's first lens[b] keys, in float64, one row at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        s = (q[b].double() @ k[b, :, :n].double().transpose(-1, -2)) * scale
        out[b] = s.softmax(-1) @ v[b, :, :n].double()
    return out


@pytest.mark.parametrize("lens", [[37], [5, 5, 5], [1], [64, 64]], ids=["B1", "B3-equal", "one-key", "full-cache"])
def test_decode_attention_rows_all_full_skip_the_mask(lens):
    """Every row as long as the longest (batch 1 always): the reference builds no mask and still attends to
    exactly the first len keys, not the stale positions past them (filled with large values here)."""
    g = torch.Generator().manual_seed(len(lens) * 100 + lens[0])
    B, H, Tmax, D = len(lens), 3, 64, 16
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H, Tmax, D, generator=g), torch.randn(B, H, Tmax, D, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    n = max(lens)
    k[:, :, n:], v[:, :, n:] = 1e4, -1e4  # stale cache entries: any leak shows
    out = reference.decode_attention(q, k, v, seqlens, softmax_scale=D**-0.5)
    assert max_rel_err(out, _attention_f64(q, k, v, seqlens, D**-0.5)) <= FP32_REL_TOL


def test_decode_attention_ragged_rows_keep_the_mask():
    g = torch.Generator().manual_seed(3)
    B, H, Tmax, D = 3, 2, 40, 8
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H, Tmax, D, generator=g), torch.randn(B, H, Tmax, D, generator=g)
    seqlens = torch.tensor([17, 1, 40], dtype=torch.int32)
    k[0, :, 17:], k[1, :, 1:] = 1e4, 1e4
    out = reference.decode_attention(q, k, v, seqlens, softmax_scale=0.3)
    assert max_rel_err(out, _attention_f64(q, k, v, seqlens, 0.3)) <= FP32_REL_TOL


# ------------------------------------------------------------------------------------ packed weights
HAS_ONEDNN = torch.backends.mkldnn.is_available()


@pytest.fixture
def pack_small(monkeypatch, reference_path):
    """The small test shapes get packed copies too (they stay plain by default: see PACK_MIN_WEIGHT)."""
    monkeypatch.setattr(reference, "PACK_MIN_WEIGHT", 0)


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 513])
@pytest.mark.parametrize("out_features, in_features", [(2304, 768), (211, 48), (9, 6)])
def test_packed_linear_matches_float64(pack_small, rows, out_features, in_features):
    """A packed weight, either storage order, with and without bias, on 3-D and non-contiguous x, against
    float64: two rows and more take the packed copy, one row keeps its split (or F.linear)."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(out_features * 7 + rows)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, 2 * in_features, generator=g)[..., ::2] * 10  # strided, large magnitudes
    want = x.double() @ w.double().t() + b.double()
    for weight in (w.clone(), w.t().contiguous().t()):
        assert kernels.prepack_linear_weight(weight) == HAS_ONEDNN
        for bias in (b, None):
            assert (reference.linear_plan(x, weight, bias)[0] == "packed") == (HAS_ONEDNN and rows >= 2)
            y = kernels.linear(x, weight, bias)
            assert y.shape == (rows, 1, out_features) and y.dtype == torch.float32
            assert max_rel_err(y, want if bias is not None else want - b.double()) <= FP32_REL_TOL


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN")
def test_packed_copy_is_used_only_while_the_weight_is_unchanged(pack_small):
    """An in-place update or a new .data sends linear back to the plain weight (and the right answer);
    packing again brings the copy back. Autograd and autocast never take it; the MLP's products do."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(48, 64)
    x = torch.randn(5, 48, generator=g)
    with torch.no_grad():
        assert kernels.prepack_linear_weight(lin.weight)
        assert reference.linear_plan(x, lin.weight, lin.bias) == ("packed", 1)
        lin.weight.mul_(2.0)  # an optimizer step, say
        assert reference.linear_plan(x, lin.weight, lin.bias)[0] != "packed"
        torch.testing.assert_close(kernels.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        assert kernels.prepack_linear_weight(lin.weight)
        assert reference.linear_plan(x, lin.weight, lin.bias) == ("packed", 1)
        torch.testing.assert_close(kernels.linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.weight.data = torch.randn(64, 48, generator=g)
        assert reference.linear_plan(x, lin.weight, lin.bias)[0] != "packed"
        kernels.prepack_linear_weight(lin.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert reference.linear_plan(x, lin.weight, lin.bias)[0] != "packed"
    assert reference.linear_plan(x, lin.weight, lin.bias)[0] != "packed"  # the weight requires grad
    kernels.linear(x, lin.weight, lin.bias).sum().backward()
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(64, 48))
    fc, proj = torch.nn.Linear(48, 96), torch.nn.Linear(96, 48)
    with torch.no_grad():
        assert kernels.prepack_linear_weight(fc.weight) and kernels.prepack_linear_weight(proj.weight)
        y = kernels.gelu_mlp(x, fc.weight, fc.bias, proj.weight, proj.bias, residual=x)
        want = F.linear(F.gelu(F.linear(x.double(), fc.weight.double(), fc.bias.double()), approximate="tanh"),
                        proj.weight.double(), proj.bias.double()) + x.double()
    assert max_rel_err(y, want) <= FP32_REL_TOL


def test_prepack_refuses_what_it_cannot_pack(reference_path):
    """Other dtypes, small weights (PACK_MIN_WEIGHT) and non-tensors: nothing packed, or a clear error."""
    assert not kernels.prepack_linear_weight(torch.randn(768, 768, dtype=torch.float64))
    assert not kernels.prepack_linear_weight(torch.randn(768, 768, dtype=torch.bfloat16))
    assert not kernels.prepack_linear_weight(torch.randn(64, 48))  # under PACK_MIN_WEIGHT
    with torch.inference_mode():  # in-place updates of an inference tensor are not counted
        assert not kernels.prepack_linear_weight(torch.randn(768, 768))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        kernels.prepack_linear_weight(torch.randn(768))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        kernels.prepack_linear_weight([[1.0]])


# --------------------------------------------------------------------------------------- whole decode
@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_decode_layout_gives_the_plain_tokens_and_logits(matvec_path, checkpoint, batch, prepack, monkeypatch):
    monkeypatch.setattr(reference, "PACK_MIN_WEIGHT", 0)
    plain = GPT.from_pretrained(checkpoint, cpu_decode_layout=False)
    fast = GPT.from_pretrained(checkpoint)  # on CPU: use_cpu_decode_layout
    assert any(not p.is_contiguous() for p in fast.parameters())  # the layout did change storage
    if prepack:  # then a batch's products (prefill, and decode at 3 rows) read the packed copies
        assert fast.prepack_cpu_weights() == (4 * fast.config.n_layer + 1 if HAS_ONEDNN else 0)
    ids = random_ids(batch, 9, plain.config.vocab_size, seed=batch)
    want_tokens, want_logits = _decode_logits(plain, ids, NEW_TOKENS)
    got_tokens, got_logits = _decode_logits(fast, ids, NEW_TOKENS)
    assert torch.equal(got_tokens, want_tokens)
    assert got_logits.dtype == torch.float32
    assert max_rel_err(got_logits, want_logits) <= FP32_REL_TOL
    assert torch.equal(generate(fast, ids, NEW_TOKENS), want_tokens)
