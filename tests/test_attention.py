"""flash_attention (prefill): the Triton kernel against a float64 reference.

Without a GPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small. Tolerances: the larger of twice the error of PyTorch's own attention in the same dtype
(against the same float64 reference) and a floor set by the dtype's precision.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE

import kernels
from kernels import attention, reference

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(KERNEL_DEVICE)


def _qkv(B, H, Tq, Tk, D, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (_rand((B, H, Tq, D), dtype, g, scale), _rand((B, H, Tk, D), dtype, g, scale),
            _rand((B, H, Tk, D), dtype, g))


def _fused_qkv(B, T, H, D, dtype, seed=0, offset=0):
    """q, k, v as the (B, H, T, D) views of a (B, T, 3, H, D) projection; offset misaligns the base."""
    g = torch.Generator().manual_seed(seed)
    flat = _rand((offset + B * T * 3 * H * D,), dtype, g)
    qkv = flat[offset:].view(B, T, 3, H, D)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _check(out, q, k, v, causal, scale):
    """out against float64; PyTorch in q's dtype on the same inputs sets the yardstick."""
    ref = reference.flash_attention(q.double(), k.double(), v.double(), causal=causal, softmax_scale=scale)
    peer = reference.flash_attention(q, k, v, causal=causal, softmax_scale=scale)
    tol = max(2 * (peer.double() - ref).abs().max().item(), FLOOR[q.dtype])
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max err {err:.3e} > tol {tol:.3e}"


def _lse_ref(q, k, causal, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        i = torch.arange(Tq, device=s.device)[:, None]
        j = torch.arange(Tk, device=s.device)[None, :]
        s = s.masked_fill(j > i + (Tk - Tq), float("-inf"))
    return torch.logsumexp(s, dim=-1)


# A covering set, not a cross product: T in {1, 17, 77, 130, 257}, D in {16, 32, 64, 128} plus padded
# 80 and 96, B*H up to 6, causal and not, Tq < Tk, fp32 and fp16.
CASES = [  # B, H, Tq, Tk, D, causal, dtype
    (1, 1, 1, 1, 16, True, torch.float32),
    (2, 3, 17, 17, 32, False, torch.float16),
    (1, 2, 77, 77, 64, True, torch.float16),
    (2, 1, 77, 77, 16, False, torch.float32),
    (1, 2, 130, 130, 128, True, torch.float32),
    (1, 2, 130, 130, 128, False, torch.float16),
    (1, 3, 257, 257, 64, True, torch.float16),
    (2, 1, 257, 257, 32, False, torch.float32),
    (2, 2, 17, 130, 64, True, torch.float16),
    (1, 2, 17, 130, 80, True, torch.float32),
    (3, 2, 130, 257, 96, False, torch.float16),
    (1, 1, 1, 77, 64, True, torch.float16),
    (2, 3, 1, 130, 128, False, torch.float32),
]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype", CASES)
def test_matches_reference(interpreter_path, B, H, Tq, Tk, D, causal, dtype):
    q, k, v = _qkv(B, H, Tq, Tk, D, dtype, seed=Tq * 1000 + Tk + D)
    _check(kernels.flash_attention(q, k, v, causal=causal), q, k, v, causal, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_qkv_views_take_the_vector_path(interpreter_path, dtype, causal):
    q, k, v = _fused_qkv(2, 77, 3, 64, dtype)
    assert not q.is_contiguous() and q.stride(2) == 3 * 3 * 64
    o = torch.empty(q.shape, dtype=dtype, device=q.device)
    assert attention._aligned(q, k, v, o)  # strided views are read in place, as 128-bit rows
    _check(kernels.flash_attention(q, k, v, causal=causal, softmax_scale=0.3), q, k, v, causal, 0.3)


@pytest.mark.parametrize("offset,D,dtype", [(1, 64, torch.float16), (0, 20, torch.float16),
                                            (1, 33, torch.float32)])
def test_unaligned_views(interpreter_path, offset, D, dtype):
    """A base off the 16-byte grid or rows that are not whole 16-byte units take the scalar-load path."""
    q, k, v = _fused_qkv(1, 130, 2, D, dtype, seed=D, offset=offset)
    o = torch.empty(q.shape, dtype=dtype, device=q.device)
    assert not attention._aligned(q, k, v, o)
    _check(kernels.flash_attention(q, k, v, causal=True), q, k, v, True, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_feature_strided_views(interpreter_path, dtype):
    """q, k, v stored (B, H, D, T) and transposed: the feature stride is T, not 1."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (_rand((2, 2, 48, T), dtype, g).transpose(-1, -2) for T in (17, 77, 77))
    assert q.stride(3) == 17
    _check(kernels.flash_attention(q, k, v, causal=True), q, k, v, True, 48**-0.5)


CONFIG_CASES = (  # list, index, dtype, D (20 fp16 / 33 fp32: rows are not whole 16-byte units)
    [("CONFIGS_16", i, torch.float16, 64) for i in range(len(attention.CONFIGS_16))]
    + [("CONFIGS_16", 0, torch.float16, 128), ("CONFIGS_16", 3, torch.float16, 80)]
    + [("CONFIGS_UNALIGNED", i, torch.float16, 20) for i in range(len(attention.CONFIGS_UNALIGNED))]
    + [("CONFIGS_32", i, torch.float32, D) for i in range(len(attention.CONFIGS_32)) for D in (48, 33)]
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,index,dtype,D", CONFIG_CASES)
def test_every_config(interpreter_path, name, index, dtype, D, causal):
    """Each config the launcher can launch, forced, on a shape with partial query and key blocks and
    Tq < Tk, so the unmasked loop, the diagonal blocks and the key tail all run."""
    configs = getattr(attention, name)
    config = configs[index]
    Tq, Tk = 130, 257
    q, k, v = _qkv(2, 1, Tq, Tk, D, dtype, seed=index)
    assert attention._aligned(q, k, v, q) == (D % (16 // q.element_size()) == 0)
    if q.is_cuda and config not in attention._prune(configs, {"T_Q": Tq, "Q": q}, BLOCK_D=attention.head_dim_block(D)):
        pytest.skip("this GPU lacks the shared memory or registers for this config")
    out, lse = attention.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=D**-0.5, return_lse=True,
                                             config=config)
    _check(out, q, k, v, causal, D**-0.5)
    assert (lse.double() - _lse_ref(q, k, causal, D**-0.5)).abs().max().item() <= 1e-4


def test_config_must_fit_the_tensors(interpreter_path):
    q, k, v = _qkv(1, 1, 17, 17, 64, torch.float32)
    with pytest.raises(ValueError, match="config"):
        attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.1, config=attention.CONFIGS_16[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_lse(interpreter_path, dtype):
    q, k, v = _qkv(2, 3, 77, 130, 96, dtype, seed=5)
    out, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.1, return_lse=True)
    _check(out, q, k, v, True, 0.1)
    assert lse.shape == (2, 3, 77) and lse.dtype == torch.float32
    assert (lse.double() - _lse_ref(q, k, True, 0.1)).abs().max().item() <= 1e-4


def test_every_output_element_is_written(interpreter_path, monkeypatch):
    """Poison every buffer the launcher allocates: a skipped row, head or padded-D column stays NaN."""
    empty = torch.empty
    monkeypatch.setattr(attention.torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    q, k, v = _qkv(2, 3, 130, 257, 80, torch.float16, seed=7)
    out, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=80**-0.5, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    _check(out, q, k, v, True, 80**-0.5)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # the interpreter's numpy log2(0)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_that_see_no_key_give_zero_not_nan(interpreter_path, dtype):
    """Bottom-right alignment with Tq <= Tk gives every row a key; the kernel still guards m = -inf.
    Only the launcher (no Tq <= Tk check) can make such rows: Tq=20, Tk=8 leaves rows 0..11 keyless."""
    q, k, v = _qkv(1, 2, 20, 8, 32, dtype, seed=3)
    out, lse = attention.flash_attention_fwd(q, k, v, causal=True, softmax_scale=0.2, return_lse=True)
    assert (out[:, :, :12] == 0).all() and (lse[:, :, :12] == float("-inf")).all()
    _check(out[:, :, 12:].contiguous(), q[:, :, 12:], k, v, True, 0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_large_logits_stay_finite(interpreter_path, dtype, causal):
    """Scores around 1e4 (unscaled): the running max keeps every exponent <= 0."""
    q, k, v = _qkv(1, 2, 130, 130, 64, dtype, seed=11, scale=12.0)
    scores = q.double() @ k.double().transpose(-1, -2)
    assert scores.abs().max() > 5e3
    out = kernels.flash_attention(q, k, v, causal=causal, softmax_scale=1.0)
    _check(out, q, k, v, causal, 1.0)


def test_bad_inputs_raise_clear_errors(interpreter_path):
    q, k, v = _qkv(1, 2, 17, 17, 64, torch.float32)
    with pytest.raises(ValueError, match="Tq=17"):
        kernels.flash_attention(q, k[:, :, :9], v[:, :, :9])
    with pytest.raises(ValueError, match="head dim"):
        big = torch.zeros(1, 2, 17, 130, device=q.device)
        kernels.flash_attention(big, big, big)
    with pytest.raises(TypeError, match="v has dtype"):
        kernels.flash_attention(q, k, v.half())
    with pytest.raises(TypeError, match="q has dtype"):
        kernels.flash_attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(ValueError, match="q must be 4-D"):
        kernels.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        kernels.flash_attention(q, k[:, :1], v)


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's limitation")
def test_bf16_under_the_interpreter_says_so(interpreter_path):
    q, k, v = _qkv(1, 1, 17, 17, 64, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bf16"):
        kernels.flash_attention(q, k, v)


def test_prune_keeps_configs_that_fit():
    q = torch.empty(1, 1, 16, 128, dtype=torch.float16)
    small = attention._prune(attention.CONFIGS_16, {"T_Q": 16, "Q": q}, BLOCK_D=128)
    assert small and all(c.kwargs["BLOCK_M"] == 64 for c in small)
    big = attention._prune(attention.CONFIGS_16, {"T_Q": 4096, "Q": q}, BLOCK_D=128)
    assert (128, 4) not in [(c.kwargs["BLOCK_M"], c.num_warps) for c in big]  # 128 accumulator regs a thread
    for c in big:
        assert attention._smem_estimate(c, 128, 2) <= 227 * 1024
    assert attention._prune(attention.CONFIGS_32, {"T_Q": 1, "Q": q.float()}, BLOCK_D=16)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128, 80])
def test_bf16_on_gpu(D, causal):
    """bf16 dots are wrong in the interpreter (triton-lang/triton#11584), so bf16 is proven on a GPU."""
    q, k, v = _fused_qkv(2, 257, 3, D, torch.bfloat16, seed=D)
    _check(kernels.flash_attention(q, k, v, causal=causal), q, k, v, causal, D**-0.5)
    for config in attention._prune(attention.CONFIGS_16, {"T_Q": 257, "Q": q}, BLOCK_D=attention.head_dim_block(D)):
        out = attention.flash_attention_fwd(q, k, v, causal=causal, softmax_scale=D**-0.5, config=config)
        _check(out, q, k, v, causal, D**-0.5)


@pytest.mark.slow
def test_compile_report_every_config():
    """Every spec compiles for sm_90 and sm_80: no spills, HGMMA / HMMA, 128-bit loads when aligned."""
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["attention"])
    assert len(rows) == sum(len(s.archs) for s in attention.compile_specs())
    bad = {f"{r['name']} {r['arch']}": problems(r) for r in rows if problems(r)}
    assert not bad, bad
