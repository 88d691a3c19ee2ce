"""The op contract's dispatch rules (kernels/__init__.py): which backend a call takes, observed by
replacing each Triton launcher with a spy."""

import pytest
import torch

import kernels


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton launchers called; each spy answers with the reference result."""
    called = []

    def spy(name, ref):
        def launcher(*args, **kwargs):
            called.append(name)
            kwargs.pop("num_splits", None)
            return ref(*args, **kwargs)
        return launcher

    monkeypatch.setattr(kernels._attention, "flash_attention", spy("attention", kernels.reference.flash_attention))
    monkeypatch.setattr(kernels._decode_attention, "decode_attention_fwd",
                        spy("decode_attention", kernels.reference.decode_attention))
    monkeypatch.setattr(kernels._layer_norm, "layer_norm_fwd", spy("layer_norm", kernels.reference.layer_norm))
    monkeypatch.setattr(kernels._gelu_mlp, "gelu_mlp_fwd", spy("gelu_mlp", kernels.reference.gelu_mlp))
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


def test_cpu_takes_the_reference_without_the_interpreter(reference_path, launches):
    _call_every_op()
    assert launches == []


def test_cpu_under_the_interpreter_takes_every_kernel(interpreter_path, launches):
    _call_every_op()
    assert launches == ["attention", "decode_attention", "layer_norm", "gelu_mlp"]


def test_calls_autograd_records_take_the_reference(interpreter_path, launches):
    _call_every_op(requires_grad=True)
    assert launches == ["attention"]  # it has a backward (tests/test_attention_backward.py)
    launches.clear()
    with torch.no_grad():  # the same tensors, nothing recorded: the kernels again
        _call_every_op(requires_grad=True)
    assert launches == ["attention", "decode_attention", "layer_norm", "gelu_mlp"]


def test_autocast_takes_the_reference(interpreter_path, launches):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _call_every_op()
    assert launches == ["attention"]  # it casts for autocast itself (tests/test_attention_backward.py)


def test_a_residual_of_another_dtype_takes_the_reference(interpreter_path, launches):
    _call_every_op(residual_dtype=torch.float16)
    assert launches == ["attention", "decode_attention"]
