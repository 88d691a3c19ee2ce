"""The op contract's dispatch rules (kernels/__init__.py): which backend a call takes, observed by
replacing each Triton entry point with a spy."""

import pytest
import torch

import kernels

# in the order _call_every_op calls them: every op, and those with backward kernels
EVERY_OP = ["attention", "decode_attention", "layer_norm", "gelu_mlp", "linear_cross_entropy"]
TRAINABLE = ["attention", "layer_norm", "gelu_mlp", "linear_cross_entropy"]


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton entry points called; each spy answers with the reference result."""
    called = []

    def spy(name, ref):
        def launcher(*args, **kwargs):
            if kwargs.get("backend", "triton") == "triton":  # linear_cross_entropy's CPU path is not Triton
                called.append(name)
            for k in ("num_splits", "out_dtype", "compute_dtype", "backend", "chunk_size"):
                kwargs.pop(k, None)
            return ref(*args, **kwargs)
        return launcher

    monkeypatch.setattr(kernels._attention, "flash_attention", spy("attention", kernels.reference.flash_attention))
    monkeypatch.setattr(kernels._decode_attention, "decode_attention_fwd",
                        spy("decode_attention", kernels.reference.decode_attention))
    monkeypatch.setattr(kernels._layer_norm, "fused_layer_norm", spy("layer_norm", kernels.reference.layer_norm))
    monkeypatch.setattr(kernels._gelu_mlp, "fused_gelu_mlp", spy("gelu_mlp", kernels.reference.gelu_mlp))
    monkeypatch.setattr(kernels._cross_entropy, "fused_linear_cross_entropy",
                        spy("linear_cross_entropy", kernels.reference.linear_cross_entropy))
    return called


def _call_every_op(requires_grad=False, residual_dtype=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 16, generator=g, requires_grad=requires_grad)
    kernels.flash_attention(q, q, q)
    lens = torch.tensor([5], dtype=torch.int32)
    kernels.decode_attention(q[:, :, -1:], q, q, lens)
    x = torch.randn(3, 8, generator=g, requires_grad=requires_grad)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    res = None if residual_dtype is None else torch.randn(3, 8, generator=g).to(residual_dtype)
    kernels.layer_norm(x, w, b, residual=res)
    fc_w, fc_b = torch.randn(32, 8, generator=g), torch.randn(32, generator=g)
    pr_w, pr_b = torch.randn(8, 32, generator=g), torch.randn(8, generator=g)
    kernels.gelu_mlp(x, fc_w, fc_b, pr_w, pr_b, residual=res)
    kernels.linear_cross_entropy(x, torch.randn(11, 8, generator=g), torch.tensor([1, 10, -100]))


def test_cpu_takes_the_reference_without_the_interpreter(reference_path, launches):
    _call_every_op()
    assert launches == []


def test_cpu_under_the_interpreter_takes_every_kernel(interpreter_path, launches):
    _call_every_op()
    assert launches == EVERY_OP


def test_calls_autograd_records_take_the_kernels_that_have_a_backward(interpreter_path, launches):
    _call_every_op(requires_grad=True)
    assert launches == TRAINABLE  # decode attention has no backward: the reference records it
    launches.clear()
    with torch.no_grad():  # the same tensors, nothing recorded: every kernel
        _call_every_op(requires_grad=True)
    assert launches == EVERY_OP


def test_autocast_takes_the_kernels_that_cast_for_themselves(interpreter_path, launches):
    with torch.autocast("cpu", dtype=torch.float16):
        _call_every_op()
    assert launches == TRAINABLE


def test_a_residual_of_another_dtype_takes_the_kernels(interpreter_path, launches):
    _call_every_op(residual_dtype=torch.float16)
    assert launches == EVERY_OP


def test_reference_ops_takes_the_reference_everywhere(interpreter_path, launches):
    with kernels.reference_ops():
        _call_every_op()
        _call_every_op(requires_grad=True)
    assert launches == []
    _call_every_op()  # the block ended: the kernels again
    assert launches == EVERY_OP


def test_cross_entropy_on_a_cpu_takes_its_chunked_pytorch_path(reference_path, monkeypatch):
    """Not the materialised reference: on a CPU the logits are chunked too."""
    def materialised(*args, **kwargs):
        raise AssertionError("the materialised reference ran")

    monkeypatch.setattr(kernels.reference, "linear_cross_entropy", materialised)
    x, w = torch.randn(5, 8), torch.randn(11, 8)
    t = torch.tensor([1, 2, 3, -100, 10])
    loss = kernels.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x @ w.T, t))
