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


@pytest.fixture
def triton_backward(interpreter_path, monkeypatch):
    """Records each call of the Triton backward launcher (True when it wrote into a fused buffer), and
    makes the reference op raise if the public op falls back to it."""
    calls = []
    real = attention.flash_attention_bwd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("grads") is not None)
        return real(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("kernels.flash_attention took the reference path")

    monkeypatch.setattr(attention, "flash_attention_bwd", spy)
    monkeypatch.setattr(reference, "flash_attention", no_reference)
    return calls


# A covering set, not a cross product: T in {1, 17, 19, 31, 53, 77, 97, 130, 257}, D from 1 to 128
# (padded 1, 7, 33, 48, 80, 96 among them), causal and not, Tq < Tk, fp32 and fp16.
CASES = [  # B, H, Tq, Tk, D, causal, dtype
    (1, 1, 1, 1, 16, True, torch.float32),
    (1, 2, 1, 77, 64, True, torch.float16),
    (2, 3, 17, 17, 32, False, torch.float16),
    (1, 2, 77, 77, 64, True, torch.float16),
    (1, 2, 77, 77, 64, True, torch.float32),
    (2, 1, 130, 130, 128, True, torch.float32),
    (1, 2, 130, 130, 128, False, torch.float16),
    (1, 1, 17, 130, 80, True, torch.float16),
    (2, 2, 31, 97, 96, True, torch.float32),
    (1, 2, 53, 53, 33, False, torch.float16),
    (1, 2, 19, 19, 7, True, torch.float32),
    (1, 1, 31, 31, 1, False, torch.float16),
    (1, 1, 257, 257, 48, True, torch.float16),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype", CASES)
def test_gradients_match_reference(triton_backward, B, H, Tq, Tk, D, causal, dtype):
    q, k, v, do = _inputs(B, H, Tq, Tk, D, dtype, seed=Tq * 1000 + Tk + D)
    grads = _leaf_grads(_ours(causal), q, k, v, do)
    assert triton_backward == [False]  # one Triton backward, into separate dq, dk, dv
    _check_grads(grads, q, k, v, do, causal, D**-0.5)


def test_long_sequence(triton_backward):
    """T = 1023 (partial last blocks, many causal block skips) with B*H = 1 to keep the interpreter fast."""
    q, k, v, do = _inputs(1, 1, 1023, 1023, 64, torch.float16, seed=1023)
    grads = _leaf_grads(_ours(True), q, k, v, do)
    assert triton_backward == [False]
    _check_grads(grads, q, k, v, do, True, 64**-0.5)


@pytest.mark.parametrize("dtype,causal", [(torch.float16, True), (torch.float32, False)])
def test_fused_qkv_gradient_lands_in_one_buffer(triton_backward, dtype, causal):
    """Views of one (B, T, 3, H, D) projection: autograd gets the projection's gradient from the kernels
    directly (no unbind/stack), and it equals the three gradients placed where the views are."""
    B, T, H, D = 2, 77, 3, 64
    flat, q, k, v = _fused(B, T, H, D, dtype, seed=7)
    assert attention._fused_qkv_base(q, k, v) is flat
    do = _rand((B, H, T, D), dtype, torch.Generator().manual_seed(8))
    o = kernels.flash_attention(q, k, v, causal=causal)
    assert type(o.grad_fn).__name__ == "_FlashAttentionFusedQKVBackward"
    o.backward(do)
    assert triton_backward == [True]
    grad = flat.grad.view(B, T, 3, H, D)
    _check_grads([grad[:, :, i].transpose(1, 2) for i in range(3)], q.detach(), k.detach(), v.detach(), do,
                 causal, D**-0.5)


def test_views_that_are_not_the_whole_projection_take_the_plain_function(triton_backward):
    """A base with more elements than the views (here also off the 16-byte grid), k and v swapped, or q a
    slice (Tq < Tk): the three-buffer form, whose gradients reach the parent through the views' backward."""
    flat, q, k, v = _fused(1, 53, 2, 32, torch.float16, seed=3, offset=3)
    assert attention._fused_qkv_base(q, k, v) is None
    assert attention._fused_qkv_base(q, v, k) is None
    _, q2, k2, v2 = _fused(1, 53, 2, 32, torch.float16, seed=3)
    assert attention._fused_qkv_base(q2[:, :, 1:], k2, v2) is None
    do = _rand((1, 2, 53, 32), torch.float16, torch.Generator().manual_seed(4))
    kernels.flash_attention(q, k, v).backward(do)
    assert triton_backward == [False]
    grad = flat.grad[3:].view(1, 53, 3, 2, 32)
    assert (flat.grad[:3] == 0).all() and not attention._aligned(q, k, v)
    _check_grads([grad[:, :, i].transpose(1, 2) for i in range(3)], q.detach(), k.detach(), v.detach(), do,
                 True, 32**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_feature_strided_and_noncontiguous_upstream(triton_backward, dtype):
    """q, k, v stored (B, H, D, T) and transposed (feature stride T), and a do that is a transposed view."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (_rand((2, 2, 48, T), dtype, g).transpose(-1, -2) for T in (17, 77, 77))
    do = _rand((2, 17, 2, 48), dtype, g).transpose(1, 2)
    assert q.stride(3) == 17 and not do.is_contiguous()
    grads = _leaf_grads(_ours(True), q, k, v, do)
    assert triton_backward == [False]
    _check_grads(grads, q, k, v, do, True, 48**-0.5)


def test_expanded_upstream_gradient(triton_backward):
    """o.sum() hands the backward a stride-0 do."""
    q, k, v, _ = _inputs(1, 2, 41, 41, 64, torch.float32, seed=41)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kernels.flash_attention(*leaves).sum().backward()
    assert triton_backward == [False]
    _check_grads([t.grad for t in leaves], q, k, v, torch.ones_like(q), True, 64**-0.5)


# Padded key rows of a partial last block score 0, so exp2(0 - lse) overflows for rows whose lse is far
# below zero; those rows of dk/dv are never stored (the interpreter's numpy still warns).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_large_logits(triton_backward, dtype, causal):
    """Scores around 1e4 (unscaled): P is nearly one-hot and every exponent must stay <= 0.

    In fp32, q and k are rounded to integers so every score is exact in any summation order: the
    interpreter's fp32 dots are numpy matmuls whose rounding depends on the block shape, and a 1-ulp
    difference between the forward's and the backward's copy of a score of 1e4 is 1e-3 absolute, which
    moves a recomputed P by 7e-4 where PyTorch's stored P is exact. What this test checks is that the
    saved statistics reproduce P at such logits without overflow or NaN."""
    q, k, v, do = _inputs(1, 2, 130, 130, 64, dtype, seed=11, scale=12.0)
    if dtype == torch.float32:
        q, k = q.round(), k.round()
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 5e3
    grads = _leaf_grads(_ours(causal, 1.0), q, k, v, do)
    assert triton_backward == [False]
    _check_grads(grads, q, k, v, do, causal, 1.0)


def test_only_the_inputs_that_need_it_get_a_gradient(triton_backward):
    """q frozen: dq is neither computed nor returned."""
    q, k, v, do = _inputs(1, 2, 33, 65, 32, torch.float32, seed=2)
    k, v = k.requires_grad_(), v.requires_grad_()
    kernels.flash_attention(q, k, v).backward(do)
    assert q.grad is None and triton_backward == [False]
    _check_grads([None, k.grad, v.grad], q, k.detach(), v.detach(), do, True, 32**-0.5)


def test_double_backward_is_refused(triton_backward):
    """The backward kernels are not differentiable themselves: a second derivative must fail loudly."""
    q, k, v, do = _inputs(1, 1, 9, 9, 16, torch.float32, seed=6)
    q, do = q.requires_grad_(), do.requires_grad_()
    (dq,) = torch.autograd.grad(kernels.flash_attention(q, k, v), q, do, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_autocast_casts_like_a_matmul(triton_backward):
    """fp32 leaves under fp16 autocast: the kernels run in fp16 (o is fp16), the gradients flow back to
    fp32 through the casts, and they are the fp16 op's gradients."""
    q, k, v, do = _inputs(1, 2, 33, 33, 32, torch.float32, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast(KERNEL_DEVICE, dtype=torch.float16):
        o = kernels.flash_attention(*leaves)
    assert o.dtype == torch.float16
    o.backward(do.half())
    assert triton_backward == [False] and all(t.grad.dtype == torch.float32 for t in leaves)
    _check_grads([t.grad.half() for t in leaves], q.half(), k.half(), v.half(), do.half(), True, 32**-0.5)


def _n_configs(kind):
    return max(len(attention._BWD_LISTS[name][kind]) for name in ("dkdv", "dq"))


BWD_CONFIG_CASES = (  # list, index, dtype, D (20 fp16 is staged; 33 fp32 runs unaligned)
    [("16", i, torch.float16, 64) for i in range(_n_configs("16"))]
    + [("16", 0, torch.float16, 128), ("16", 2, torch.float16, 80), ("16", 4, torch.float16, 20)]
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
                                                   BLOCK_D=attention.head_dim_block(D))
            if config not in survivors:
                pytest.skip("this GPU lacks the shared memory or registers for this config")
    o, lse = attention.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=D**-0.5, return_lse=True)
    grads = attention.flash_attention_bwd(do, q, k, v, o, lse, causal=causal, softmax_scale=D**-0.5,
                                          dkdv_config=dkdv_config, dq_config=dq_config)
    _check_grads(grads, q, k, v, do, causal, D**-0.5)


@pytest.mark.parametrize("fused", [False, True])
def test_unaligned_16bit_rows_are_staged(interpreter_path, monkeypatch, fused):
    """fp16 rows of 20 elements (40 bytes) or a base off the 16-byte grid: the kernels still run their
    aligned (vector-load) build, on row-padded copies, and the results land in the caller's tensors."""
    launched = []
    real = attention._launch_bwd

    def spy(kernel, args, meta, *rest):
        launched.append(meta["ALIGNED"])
        return real(kernel, args, meta, *rest)

    monkeypatch.setattr(attention, "_launch_bwd", spy)
    if fused:  # q, k, v and the gradient buffer all views of one (B, T, 3, H, 20) tensor
        _, q, k, v = _fused(1, 45, 2, 20, torch.float16, seed=20)
        q, k, v = q.detach(), k.detach(), v.detach()
        do = _rand((1, 2, 45, 20), torch.float16, torch.Generator().manual_seed(21))
        dqkv = torch.empty(1, 45, 3, 2, 20, dtype=torch.float16, device=q.device)
        grads = tuple(dqkv[:, :, i].transpose(1, 2) for i in range(3))
    else:  # offset by one element: every row misaligned
        g = torch.Generator().manual_seed(22)
        q, k, v, do = (_rand((1 + 2 * 45 * 64,), torch.float16, g)[1:].view(1, 2, 45, 64) for _ in range(4))
        grads = None
    assert not attention._aligned(q, k, v, do)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.2, return_lse=True)
    out = attention.flash_attention_bwd(do, q, k, v, o, lse, causal=True, softmax_scale=0.2, grads=grads)
    assert launched == [True, True]
    if fused:
        assert all(a is b for a, b in zip(out, grads))
    _check_grads(out, q, k, v, do, True, 0.2)


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


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128, 80])
def test_bf16_backward_on_gpu(D, causal):
    """bf16 dots are wrong in the interpreter (triton-lang/triton#11584), so bf16 is proven on a GPU:
    the fused-qkv path through the public op, then every config this GPU keeps."""
    B, T, H = 2, 257, 3
    flat, q, k, v = _fused(B, T, H, D, torch.bfloat16, seed=D)
    do = _rand((B, H, T, D), torch.bfloat16, torch.Generator().manual_seed(D + 1))
    kernels.flash_attention(q, k, v, causal=causal).backward(do)
    grad = flat.grad.view(B, T, 3, H, D)
    q, k, v = q.detach(), k.detach(), v.detach()
    _check_grads([grad[:, :, i].transpose(1, 2) for i in range(3)], q, k, v, do, causal, D**-0.5)
    o, lse = attention.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=D**-0.5, return_lse=True)
    named = {"T_Q": T, "T_K": T, "Q": q}
    dkdv = attention._bwd_prune("dkdv")(attention.DKDV_CONFIGS_16, named, BLOCK_D=attention.head_dim_block(D))
    dq = attention._bwd_prune("dq")(attention.DQ_CONFIGS_16, named, BLOCK_D=attention.head_dim_block(D))
    for i in range(max(len(dkdv), len(dq))):
        grads = attention.flash_attention_bwd(do, q, k, v, o, lse, causal=causal, softmax_scale=D**-0.5,
                                              dkdv_config=dkdv[i % len(dkdv)], dq_config=dq[i % len(dq)])
        _check_grads(grads, q, k, v, do, causal, D**-0.5)
