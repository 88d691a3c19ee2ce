"""torch.compile over the fastgpt model: whole graphs (no break) whose fastgpt ops are torch.library
operators, compiled output equal to eager, and every operator through torch.library.opcheck.

The graph is the same on the reference path and under the interpreter (the operators pick their backend
when they run), so both are traced here; Inductor compiles on the reference path (the interpreter would
only make the compiled model slower), and the interpreter's kernels are checked inside a compiled
training step with AOTAutograd's eager backend. Tiny model, each case compiled once (Inductor on a CPU
costs seconds a graph)."""

import pytest
import torch
from torch.library import opcheck

import kernels
from fastgpt import GPT, GPTConfig
from tests.helpers import random_ids

CONFIG = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)
B, T = 2, 7


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CONFIG, **overrides}))


def _cases(model):
    """name -> (function, args, grad enabled, the fastgpt operators its graph must hold)."""
    ids, targets = random_ids(B, T, CONFIG["vocab_size"], seed=1), random_ids(B, T, CONFIG["vocab_size"], seed=2)
    model.setup_caches(B, 16)
    lens = torch.full((B,), T + 1, dtype=torch.int32)
    common = {"layer_norm", "gelu_mlp"}
    return {
        "full": (lambda ids: model(ids), (ids,), False, common | {"flash_attention"}),
        "prefill": (lambda ids: model(ids, input_pos=torch.arange(ids.shape[1]), last_only=True), (ids,), False,
                    common | {"flash_attention"}),
        "decode": (lambda tok, pos, lens: model(tok, input_pos=pos, cache_seqlens=lens),
                   (ids[:, :1], torch.tensor([T]), lens), False, common | {"decode_attention"}),
        "train": (lambda ids, targets: model(ids, targets=targets), (ids, targets), True,
                  common | {"flash_attention", "linear_cross_entropy"}),
    }


def _fastgpt_ops(graph) -> set[str]:
    return {str(n.target).split(".")[1] for n in graph.graph.nodes if str(n.target).startswith("fastgpt.")}


@pytest.mark.parametrize("path", ["reference_path", "interpreter_path"])
@pytest.mark.parametrize("case", ["full", "prefill", "decode", "train"])
def test_explain_finds_one_graph_and_no_break(case, path, request):
    request.getfixturevalue(path)
    model = _model().train(case == "train")
    fn, args, grad, ops = _cases(model)[case]
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    assert _fastgpt_ops(explained.graphs[0]) == ops  # each op one node, nothing of it traced inside


def _compile(fn, backend="inductor"):
    return torch.compile(fn, backend=backend, fullgraph=True)  # fullgraph: a break would raise


def test_inductor_full_forward_and_generation_match_eager(reference_path):
    model = _model().eval()
    cases = _cases(model)
    with torch.no_grad():
        fn, args, _, _ = cases["full"]
        torch.testing.assert_close(_compile(fn)(*args), fn(*args))

        # prefill, then decode steps: one compile each, no recompile as positions and lengths advance
        ids = args[0]
        prefill, decode = _compile(cases["prefill"][0]), _compile(cases["decode"][0])
        model.setup_caches(B, 16)
        logits = prefill(ids)[:, -1]
        expected_model = _model().eval()  # the same weights, eager, its own caches
        expected_model.setup_caches(B, 16)
        expected = expected_model(ids, input_pos=torch.arange(T), last_only=True)[:, -1]
        torch.testing.assert_close(logits, expected)
        lens = torch.full((B,), T + 1, dtype=torch.int32)
        for step in range(3):
            tok = logits.argmax(-1, keepdim=True)
            pos = torch.tensor([T + step])
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                logits = decode(tok, pos, lens)[:, -1]
            expected = expected_model(tok, input_pos=pos, cache_seqlens=lens)[:, -1]
            torch.testing.assert_close(logits, expected)
            lens += 1


def _loss_and_grads(model, step, args):
    model.zero_grad(set_to_none=True)
    loss = step(*args)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("path,backend", [("reference_path", "inductor"), ("interpreter_path", "aot_eager")])
def test_compiled_training_step_matches_eager(path, backend, request, monkeypatch):
    """Loss and every gradient. On the reference path the compiled backward is the library's reference
    backward (kernels/reference.py) against PyTorch's autograd in eager; under the interpreter it is the
    Triton backward kernels behind register_autograd, against the eager autograd.Functions."""
    request.getfixturevalue(path)
    launches = []
    real = kernels._layer_norm.layer_norm_bwd

    def counting(*a, **k):
        launches.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kernels._layer_norm, "layer_norm_bwd", counting)
    model = _model().train()
    fn, args, _, _ = _cases(model)["train"]
    expected_loss, expected = _loss_and_grads(model, fn, args)
    launches.clear()
    loss, grads = _loss_and_grads(model, _compile(fn, backend), args)
    torch.testing.assert_close(loss, expected_loss)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert bool(launches) == (path == "interpreter_path")  # the Triton backward ran only there


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    ops = torch.ops.fastgpt
    q, k, v = r(1, 2, 5, 16, grad=True), r(1, 2, 7, 16, grad=True), r(1, 2, 7, 16, grad=True)
    x, w, b, res = r(3, 8, grad=True), r(8, grad=True), r(8, grad=True), r(3, 8, grad=True)
    w1, b1, w2, b2 = r(32, 8, grad=True), r(32, grad=True), r(8, 32, grad=True), r(8, grad=True)
    qd, kc, vc = r(2, 2, 1, 16), r(2, 2, 9, 16), r(2, 2, 9, 16)
    kp, vp = r(6, 4, 2, 16), r(6, 4, 2, 16)  # 6 blocks of 4 slots
    table = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 12], dtype=torch.int32)
    return {
        "flash_attention": (ops.flash_attention, (q, k, v, True, 0.25, True, False)),
        "layer_norm": (ops.layer_norm, (x, w, b, None, 1e-5, None, True, False)),
        "layer_norm-inference": (ops.layer_norm, (x.detach(), w.detach(), b.detach(), None, 1e-5, None, False,
                                                  False)),
        "layer_norm+residual": (ops.layer_norm, (x, w, b, res, 1e-5, None, True, False)),
        "gelu_mlp+residual": (ops.gelu_mlp, (x, w1, b1, w2, b2, res, 0.0, torch.float32, True, False)),
        "gelu_mlp+dropout": (ops.gelu_mlp, (x, w1, b1, w2, b2, None, 0.25, torch.float32, True, False)),
        "linear_cross_entropy": (ops.linear_cross_entropy, (x, r(11, 8, grad=True), torch.tensor([1, 10, -100]),
                                                            -100, "mean", torch.float32, None, True, True, False)),
        "decode_attention": (ops.decode_attention, (qd, kc, vc, torch.tensor([3, 9], dtype=torch.int32), 0.25, False)),
        "paged_decode_attention": (ops.paged_decode_attention, (qd, kp, vp, table, lens, 0.25, False)),
        "paged_prefill_attention": (ops.paged_prefill_attention,
                                    (r(5, 2, 16), kp, vp, table, torch.tensor([0, 2, 5], dtype=torch.int32), lens,
                                     0.25, False)),
        "paged_kv_write": (ops.paged_kv_write, (r(3, 2, 16), r(3, 2, 16), kp.clone(), vp.clone(),
                                                torch.tensor([0, 7, -1]), False)),
    }


OPCHECK_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("path", ["reference_path", "interpreter_path"])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, path, request):
    """Schema (mutation and aliasing as declared), fake vs real metadata, the autograd registration, and
    AOTAutograd's forward and backward against eager, with dynamic shapes."""
    request.getfixturevalue(path)
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


def test_every_public_op_has_an_operator():
    # linear has no kernel of its own: compiled, it is F.linear (test below); prepack_linear_weight
    # computes nothing a graph would hold (it keeps a CPU copy of a weight, outside any step)
    for name in kernels.__all__:
        if name not in ("reference", "reference_ops", "uses_triton", "linear", "prepack_linear_weight"):
            assert hasattr(torch.ops.fastgpt, name), name


def test_linear_compiles_to_aten_linear():
    """Compiled, kernels.linear is F.linear, one graph, equal to eager (a decode-sized product, whose
    eager CPU path splits across threads) with the weight stored either way."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 256, generator=g)
    w = torch.randn(1024, 256, generator=g)
    b = torch.randn(1024, generator=g)
    for weight in (w, w.t().contiguous().t()):
        torch._dynamo.reset()
        explain = torch._dynamo.explain(kernels.linear)(x, weight, b)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        compiled = torch.compile(kernels.linear, fullgraph=True)(x, weight, b)
        torch.testing.assert_close(compiled, kernels.linear(x, weight, b), rtol=1e-5, atol=1e-5)
