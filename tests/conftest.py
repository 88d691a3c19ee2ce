"""Test set-up: without a GPU, every Triton kernel runs under Triton's interpreter.

TRITON_INTERPRET must be set before Triton is imported (``@triton.jit`` reads it when a kernel is
defined). The public ops in ``kernels`` read it at call time, so a test that wants the plain PyTorch
reference path sets it to "0" with the ``reference_path`` fixture.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice; keep its default

# Where kernel tests run their Triton kernels: the GPU when there is one, else the interpreter on CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def reference_path(monkeypatch):
    """CPU ops go to kernels.reference for the duration of the test."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def interpreter_path(monkeypatch):
    """CPU ops go through the Triton kernels (interpreted) for the duration of the test."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels were defined without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every floating buffer torch.empty hands out (outputs, split partials, workspaces) starts as NaN, so
    a kernel that leaves an element unwritten shows it."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
