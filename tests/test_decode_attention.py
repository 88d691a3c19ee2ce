"""Split-KV decode attention (kernels/decode_attention.py) against a float64 reference.

Without a GPU the Triton kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay small. Every call runs with torch.empty poisoned (NaN), so the output and every split's
partial output and log-sum-exp must be written by the kernels, empty splits included.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE

import kernels
from kernels import reference
from kernels.decode_attention import _CTAS_PER_SM, _split_plan, _vec, decode_attention_fwd

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def kernels_on_poisoned_buffers(request, poisoned_empty):
    """Kernels run through Triton (the interpreter on a CPU), and torch.empty hands out NaN-filled buffers."""
    if KERNEL_DEVICE == "cpu":
        request.getfixturevalue("interpreter_path")


def _cache(B, H, T, D, dtype, gen, scale=1.0):
    x = torch.randn(B, H, T, D, generator=gen, dtype=torch.float32) * scale
    return x.to(device=KERNEL_DEVICE, dtype=dtype)


def _inputs(B, H, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _cache(B, H, 1, D, dtype, g), _cache(B, H, T, D, dtype, g), _cache(B, H, T, D, dtype, g)


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=KERNEL_DEVICE)


def _ref(q, k, v, lens, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    d = lambda t: t.detach().cpu().double()  # noqa: E731
    return reference.decode_attention(d(q), d(k), d(v), lens.cpu(), softmax_scale=scale)


def _assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values in the output"
    tol = TOL[dtype]
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 32, 64, 128, 40, 33])
def test_ragged_lengths_match_reference(dtype, D):
    B, H, T = 3, 2, 97
    q, k, v = _inputs(B, H, T, D, dtype, seed=D)
    lens = _lens(1, 37, T)
    out = kernels.decode_attention(q, k, v, lens)
    _assert_close(out, _ref(q, k, v, lens), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_split_counts_agree_long_cache(dtype):
    B, H, T, D = 3, 2, 2048, 16
    q, k, v = _inputs(B, H, T, D, dtype, seed=1)
    lens = _lens(1, 37, T)
    ref = _ref(q, k, v, lens)
    outs = {}
    for n in (1, 3, 37, None):  # 37: the merge walks its splits in several blocks
        outs[n] = decode_attention_fwd(q, k, v, lens, softmax_scale=D**-0.5, num_splits=n)
        _assert_close(outs[n], ref, dtype)
    for n in (3, 37, None):
        torch.testing.assert_close(outs[n], outs[1], atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 5, 13])
def test_many_empty_splits(num_splits):
    # T=13 with 13 splits gives one position per split: the 1-long row has 12 empty splits.
    B, H, T, D = 4, 3, 13, 32
    q, k, v = _inputs(B, H, T, D, torch.float32, seed=num_splits)
    lens = _lens(1, 2, 7, 13)
    out = decode_attention_fwd(q, k, v, lens, softmax_scale=0.3, num_splits=num_splits)
    _assert_close(out, _ref(q, k, v, lens, scale=0.3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_of_length_one_return_their_value(dtype):
    B, H, T, D = 2, 3, 41, 64
    q, k, v = _inputs(B, H, T, D, dtype, seed=2)
    out = decode_attention_fwd(q, k, v, _lens(1, 1), softmax_scale=D**-0.5, num_splits=4)
    torch.testing.assert_close(out, v[:, :, :1], atol=0, rtol=0)


def test_softmax_scale_is_used():
    B, H, T, D = 2, 2, 50, 32
    q, k, v = _inputs(B, H, T, D, torch.float32, seed=3)
    lens = _lens(50, 19)
    out = kernels.decode_attention(q, k, v, lens, softmax_scale=1.7)
    _assert_close(out, _ref(q, k, v, lens, scale=1.7), torch.float32)


# ------------------------------------------------------------------------------------------- layouts
def _strided_layouts(B, H, T, D, dtype, gen):
    """(name, k, v) non-contiguous caches holding random values."""
    def bthd():  # a (B, Tmax, H, D) cache seen as (B, H, Tmax, D)
        return torch.randn(B, T, H, D, generator=gen).to(KERNEL_DEVICE, dtype).transpose(1, 2)

    def sliced(off):  # heads, positions and head dim sliced out of a bigger buffer
        big = torch.randn(B, H + 1, T + 7, D + 8, generator=gen).to(KERNEL_DEVICE, dtype)
        return big[:, 1:, 2:2 + T, off:off + D]

    def d_strided():  # every other element along D
        return torch.randn(B, H, T, 2 * D, generator=gen).to(KERNEL_DEVICE, dtype)[..., ::2]

    return [
        ("bthd", bthd(), bthd()),
        ("sliced_aligned", sliced(0), sliced(0)),
        ("sliced_unaligned", sliced(3), sliced(1)),
        ("d_strided", d_strided(), d_strided()),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_non_contiguous_caches(dtype):
    B, H, T, D = 2, 3, 61, 64
    g = torch.Generator().manual_seed(4)
    # q as a view into a fused (B, 1, 3, H, D) qkv projection
    q = torch.randn(B, 1, 3, H, D, generator=g).to(KERNEL_DEVICE, dtype)[:, :, 0].transpose(1, 2)
    lens = _lens(61, 30)
    vecs = {}
    for name, k, v in _strided_layouts(B, H, T, D, dtype, g):
        assert not k.is_contiguous()
        vecs[name] = min(_vec(k), _vec(v))
        for n in (1, 3):
            out = decode_attention_fwd(q, k, v, lens, softmax_scale=D**-0.5, num_splits=n)
            _assert_close(out, _ref(q, k, v, lens), dtype)
    # both load paths ran: 16-byte vectors where the layout allows them, scalars where it does not
    assert vecs["bthd"] > 1 and vecs["sliced_aligned"] > 1
    assert vecs["sliced_unaligned"] == 1 and vecs["d_strided"] == 1


# ------------------------------------------------------------------------------------- hostile input
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_stay_finite(dtype):
    B, H, T, D = 2, 2, 300, 64
    q, k, v = _inputs(B, H, T, D, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    q = (torch.randn(B, H, 1, D, generator=g) * 100).to(KERNEL_DEVICE, dtype)
    k = (torch.randn(B, H, T, D, generator=g) * 100).to(KERNEL_DEVICE, dtype)
    lens = _lens(300, 123)
    ref = _ref(q, k, v, lens)
    d = lambda t: t.cpu().double()  # noqa: E731
    logits = (d(q) @ d(k).transpose(-1, -2)).abs().max() * D**-0.5
    assert logits > 5e3, logits  # the scores really are large
    for n in (1, 4):
        out = decode_attention_fwd(q, k, v, lens, softmax_scale=D**-0.5, num_splits=n)
        _assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 6e4])
def test_garbage_past_length_is_ignored(dtype, junk):
    B, H, T, D = 3, 2, 200, 32
    q, k, v = _inputs(B, H, T, D, dtype, seed=7)
    lens = _lens(1, 37, 150)
    ref = _ref(q, k, v, lens)
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:] = junk
        v[b, :, n:] = -junk
    for n in (1, 3, 8):
        out = decode_attention_fwd(q, k, v, lens, softmax_scale=D**-0.5, num_splits=n)
        _assert_close(out, ref, dtype)


def test_lengths_past_tmax_stay_in_bounds():
    # The host never reads cache_seqlens (no sync); the kernel clamps a length above Tmax.
    B, H, T, D = 2, 2, 40, 16
    q, k, v = _inputs(B, H, T, D, torch.float32, seed=8)
    out = decode_attention_fwd(q, k, v, _lens(1000, 40), softmax_scale=D**-0.5, num_splits=3)
    _assert_close(out, _ref(q, k, v, _lens(40, 40)), torch.float32)


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_through_public_api():
    q, k, v = _inputs(2, 2, 16, 32, torch.float16)
    lens = _lens(3, 16)
    with pytest.raises(ValueError, match="q must hold one query"):
        kernels.decode_attention(torch.cat([q, q], 2), k, v, lens)
    with pytest.raises(TypeError, match="cache_seqlens"):
        kernels.decode_attention(q, k, v, lens.long())
    with pytest.raises(ValueError, match="cache_seqlens"):
        kernels.decode_attention(q, k, v, _lens(3, 16, 4))
    with pytest.raises(TypeError, match="v_cache"):
        kernels.decode_attention(q, k, v.float(), lens)
    with pytest.raises(ValueError, match="k_cache"):
        kernels.decode_attention(q, k[:, :1], v, lens)
    big = torch.randn(1, 1, 1, 130, dtype=torch.float16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        kernels.decode_attention(big, big, big, _lens(1))


def test_public_op_survives_the_kernel_import():
    """kernels.decode_attention stays the public function once the kernel module of the same name is loaded.

    Python binds a submodule on its package when it is first imported; kernels/__init__.py imports the
    kernel modules before defining the ops so that the function wins (a regression guard).
    """
    q, k, v = _inputs(1, 2, 5, 16, torch.float32)
    kernels.decode_attention(q, k, v, _lens(5))
    assert callable(kernels.decode_attention), "kernels.decode_attention is now the module kernels/decode_attention.py"


def test_bad_num_splits_raises():
    q, k, v = _inputs(1, 1, 8, 16, torch.float32)
    for n in (0, 9):
        with pytest.raises(ValueError, match="num_splits"):
            decode_attention_fwd(q, k, v, _lens(8), softmax_scale=0.25, num_splits=n)


# ------------------------------------------------------------------------------------------ planning
@pytest.mark.parametrize("B,H,T", [(1, 12, 131072), (1, 12, 1024), (8, 16, 32768), (64, 16, 8192),
                                   (64, 12, 1024), (1, 1, 100), (3, 2, 2048), (1, 16, 1 << 30)])
def test_split_plan_covers_cache_and_fills_gpu(B, H, T):
    sms, block_n = 132, 32
    n, split_len = _split_plan(B, H, T, block_n, sms, None)
    assert 1 <= n <= 256 and split_len % block_n == 0
    assert (n - 1) * split_len < T <= n * split_len  # every split starts inside the cache
    assert n == 1 or split_len >= 128  # short splits are not worth the merge
    # the programs fill at least ~one wave of resident programs, unless the cache is too short to split
    assert B * H * n >= 0.9 * sms * _CTAS_PER_SM or n >= min(256, -(-T // 128)) - 1
    assert _split_plan(B, H, T, block_n, sms, None) == (n, split_len)  # static: same shapes, same plan


# ------------------------------------------------------------------------------------------- compile
def test_compile_report_every_config():
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["decode_attention"])
    assert rows
    bad = {(r["name"], r["arch"]): problems(r) for r in rows if problems(r)}
    assert not bad, bad
    assert all(r["ldg128"] for r in rows if "vec1" not in r["name"] and "merge" not in r["name"])


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_cache_no_sync_and_graph(dtype):
    B, H, T, D = 2, 12, 33000, 128
    q, k, v = _inputs(B, H, T, D, dtype, seed=9)
    lens = _lens(T, 4097)
    ref = _ref(q, k, v, lens)
    kernels.decode_attention(q, k, v, lens)  # compile first
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the op raises
    try:
        out = kernels.decode_attention(q, k, v, lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close(out, ref, dtype)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.decode_attention(q, k, v, lens)
    lens.copy_(_lens(17, 2))  # new lengths, same graph
    graph.replay()
    _assert_close(captured, _ref(q, k, v, lens), dtype)
