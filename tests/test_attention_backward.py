"""flash_attention's backward: dq, dk, dv of the Triton kernels against a float64 reference.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small (one long sequence excepted). The rule is FlashAttention's: each gradient's max error against
the float64 reference is at most 3x the error of PyTorch's own autograd in the same dtype (SDPA on the
same inputs, against the same reference), with a floor from the dtype's precision, relative to the
gradient's size, for the cases where PyTorch happens to be exact (dv of a single key is dO itself).
Every test that goes through kernels.flash_attention also shows that the Triton backward ran.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE

import kernels
from kernels import attention, reference

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
_reference_attention = reference.flash_attention  # kept: the spy fixture makes the op's own use fail


def _block_d(D):
    return max(16, 1 << (D - 1).bit_length())


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(KERNEL_DEVICE)


def _inputs(B, H, Tq, Tk, D, dtype, seed=0, scale=1.0):
    """q, k (times `scale`), v and an upstream gradient do."""
    g = torch.Generator().manual_seed(seed)
    return (_rand((B, H, Tq, D), dtype, g, scale), _rand((B, H, Tk, D), dtype, g, scale),
            _rand((B, H, Tk, D), dtype, g), _rand((B, H, Tq, D), dtype, g))


def _fused(B, T, H, D, dtype, seed=0, offset=0):
    """A leaf (B, T, 3 * H * D) projection (after `offset` unused elements when offset > 0) and its
    (B, H, T, D) q, k, v views, as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    flat = _rand((offset + B * T * 3 * H * D,), dtype, g).requires_grad_()
    base = flat[offset:] if offset else flat
    q, k, v = (t.transpose(1, 2) for t in base.view(B, T, 3, H, D).unbind(2))
    return flat, q, k, v


def _leaf_grads(fn, q, k, v, do):
    """dq, dk, dv of fn on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves).backward(do)
    return tuple(t.grad for t in leaves)


def _check_grads(grads, q, k, v, do, causal, scale):
    """grads = (dq, dk, dv) against float64 (None: not checked); PyTorch's autograd in q's dtype sets
    the yardstick."""
    def torch_attention(a, b, c):
        return _reference_attention(a, b, c, causal=causal, softmax_scale=scale)

    ref = _leaf_grads(torch_attention, q.double(), k.double(), v.double(), do.double())
    peer = _leaf_grads(torch_attention, q, k, v, do)
    for name, ours, p, r, x in zip(("dq", "dk", "dv"), grads, peer, ref, (q, k, v)):
        if ours is None:
            continue
        assert ours.shape == x.shape and ours.dtype == x.dtype, name
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - r).abs().max().item()
        tol = max(3 * (p.double() - r).abs().max().item(), FLOOR[q.dtype] * max(1.0, r.abs().max().item()))
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e}"


def _ours(causal, scale=None):
    return lambda a, b, c: kernels.flash_attention(a, b, c, causal=causal, softmax_scale=scale)


def _n_configs(kind):
    return max(len(attention._BWD_LISTS[name][kind]) for name in ("dkdv", "dq"))


BWD_CONFIG_CASES = (  # list, index, dtype, D (20 fp16 / 33 fp32: rows are not whole 16-byte units)
    [("16", i, torch.float16, 64) for i in range(_n_configs("16"))]
    + [("16", 0, torch.float16, 128), ("16", 2, torch.float16, 80)]
    + [("unaligned", i, torch.float16, 20) for i in range(_n_configs("unaligned"))]
    + [("32", i, torch.float32, D) for i in range(_n_configs("32")) for D in (48, 33)]
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,index,dtype,D", BWD_CONFIG_CASES)
def test_every_backward_config(interpreter_path, kind, index, dtype, D, causal):
    """Each dK/dV and dQ config the launcher can launch (index i forces the i-th of both lists, wrapping
    the shorter), on a shape with several partial query and key blocks and Tq < Tk, so the skipped
    blocks, the masked diagonal strip, the unmasked blocks and the tails all run (fp32's tiles are
    16-32 rows, so a shorter shape does that there)."""
    dkdv_list, dq_list = attention._BWD_LISTS["dkdv"][kind], attention._BWD_LISTS["dq"][kind]
    dkdv_config, dq_config = dkdv_list[index % len(dkdv_list)], dq_list[index % len(dq_list)]
    Tq, Tk = (37, 70) if kind == "32" else (130, 257)
    q, k, v, do = _inputs(2, 1, Tq, Tk, D, dtype, seed=index)
    assert attention._aligned(q, k, v, do) == (D % (16 // q.element_size()) == 0)
    if q.is_cuda:
        for name, config in (("dkdv", dkdv_config), ("dq", dq_config)):
            survivors = attention._bwd_prune(name)(attention._BWD_LISTS[name][kind], {"T_Q": Tq, "T_K": Tk, "Q": q},
                                                   BLOCK_D=_block_d(D))
            if config not in survivors:
                pytest.skip("this GPU lacks the shared memory or registers for this config")
    o, lse = attention.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=D**-0.5, return_lse=True)
    grads = attention.flash_attention_bwd(do, q, k, v, o, lse, causal=causal, softmax_scale=D**-0.5,
                                          dkdv_config=dkdv_config, dq_config=dq_config)
    _check_grads(grads, q, k, v, do, causal, D**-0.5)


def test_backward_config_must_fit_the_tensors(interpreter_path):
    q, k, v, do = _inputs(1, 1, 17, 17, 64, torch.float32)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.1, return_lse=True)
    with pytest.raises(ValueError, match="dkdv config"):
        attention.flash_attention_bwd(do, q, k, v, o, lse, causal=True, softmax_scale=0.1,
                                      dkdv_config=attention.DKDV_CONFIGS_16[0])


def test_every_gradient_element_is_written(interpreter_path, monkeypatch):
    """Poison every buffer the launchers allocate: a skipped key block, query block or head stays NaN."""
    q, k, v, do = _inputs(2, 2, 70, 150, 80, torch.float16, seed=9)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=80**-0.5, return_lse=True)
    empty = torch.empty
    monkeypatch.setattr(attention.torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    grads = attention.flash_attention_bwd(do, q, k, v, o, lse, causal=True, softmax_scale=80**-0.5)
    assert not any(g.isnan().any() for g in grads)
    _check_grads(grads, q, k, v, do, True, 80**-0.5)


def test_bwd_prune_follows_the_table():
    """On the sm_90 rule (also the interpreter's), D=128 keeps only the configs whose row admits it, every
    survivor fits in shared memory, and a short sequence keeps no 128-row held block."""
    q = torch.empty(1, 1, 16, 128, dtype=torch.float16)
    for name in ("dkdv", "dq"):
        configs = attention._BWD_LISTS[name]["16"]
        prune = attention._bwd_prune(name)
        big = prune(configs, {"T_Q": 4096, "T_K": 4096, "Q": q}, BLOCK_D=128)
        assert big and all(attention._BWD_REACH[id(c)][9] >= 128 for c in big)
        assert len(big) < len(configs)  # some rows stop at D=64
        assert all(attention._bwd_smem_estimate(name, c, 128, 2) <= 227 * 1024 for c in big)
        held = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        small = prune(configs, {"T_Q": 16, "T_K": 16, "Q": q}, BLOCK_D=64)
        assert small and all(c.kwargs[held] <= 64 for c in small)


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's limitation")
def test_bf16_backward_under_the_interpreter_says_so(interpreter_path):
    q, k, v, do = _inputs(1, 1, 17, 17, 64, torch.float16)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.1, return_lse=True)
    with pytest.raises(NotImplementedError, match="bf16"):
        attention.flash_attention_bwd(do.bfloat16(), q.bfloat16(), k.bfloat16(), v.bfloat16(), o.bfloat16(), lse,
                                      causal=True, softmax_scale=0.1)
