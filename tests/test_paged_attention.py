"""The paged-cache kernels (kernels/paged_attention.py) against a float64 reference.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small. Every call runs with torch.empty poisoned (NaN): the outputs and split partials must all be
written by the kernels. Caches are built the way the engine fills them: blocks handed out in shuffled
order, sequences ending mid-block, table entries past a sequence's last block holding garbage (huge,
negative), and every slot no sequence owns holding NaN or inf, which must never reach an output.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE

import kernels
from kernels import paged_attention, reference
from kernels.paged_attention import (PREFILL_FP32, PREFILL_FP32_SHORT, PREFILL_LONG, PREFILL_MID, PREFILL_SHORT,
                                     PREFILL_UNALIGNED, paged_decode_attention_fwd, paged_prefill_attention_fwd,
                                     prefill_config)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def kernels_on_poisoned_buffers(request, poisoned_empty):
    """Kernels run through Triton (the interpreter on a CPU), and torch.empty hands out NaN-filled buffers."""
    if KERNEL_DEVICE == "cpu":
        request.getfixturevalue("interpreter_path")


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=KERNEL_DEVICE)


class Cache:
    """A paged cache holding lens[b] positions of sequence b, the way the engine fills one.

    k, v: (num_blocks, block_size, H, D); table: int32 (B, max_blocks + extra_cols); ref_k, ref_v the
    same pages in float64 before poisoning (what the reference reads)."""

    def __init__(self, lens, H, D, block_size, dtype, seed=0, spare_blocks=3, extra_cols=2, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        need = [-(-n // block_size) for n in lens]
        num_blocks = sum(need) + spare_blocks
        shape = (num_blocks, block_size, H, D)
        k = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks out of order
        # past each sequence's last block: garbage the kernels must never follow
        table = torch.randint(-2**31, 2**31 - 1, (len(lens), max(need) + extra_cols), generator=g)
        owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        at = 0
        for b, (n, nb) in enumerate(zip(lens, need)):
            table[b, :nb] = torch.tensor(perm[at:at + nb])
            at += nb
            for p in range(n):
                owned[table[b, p // block_size], p % block_size] = True
        self.lens, self.block_size, self.owned = list(lens), block_size, owned
        self.table = table.to(torch.int32).to(KERNEL_DEVICE)
        self.seqlens = _i32(lens)
        self.ref_k, self.ref_v = k.double(), v.double()
        self.k, self.v = k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE)

    def poison(self, junk=float("nan")):
        """Every slot no sequence owns (past each length, spare blocks) set to junk."""
        free = (~self.owned).to(KERNEL_DEVICE)
        self.k[free] = junk
        self.v[free] = -junk
        return self


def _assert_close(out, ref, dtype, tol=None):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values in the output"
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(out.detach().cpu().double(), ref, atol=tol, rtol=tol)


# -------------------------------------------------------------------------------------------- decode
def _decode_ref(q, cache, scale):
    return reference.paged_decode_attention(q.cpu().double(), cache.ref_k, cache.ref_v, cache.table.cpu(),
                                            cache.seqlens.cpu(), softmax_scale=scale)


DECODE_CASES = [  # dtype, H, D, block_size, lens
    (torch.float32, 2, 64, 16, (1, 16, 17, 100)),
    (torch.float16, 3, 33, 7, (1, 7, 50)),
    (torch.bfloat16, 1, 128, 5, (5, 23, 61)),
    (torch.float32, 1, 1, 3, (2, 9)),  # D = 1
    (torch.float16, 2, 16, 1, (1, 11)),  # one position per block
    (torch.float16, 3, 17, 13, (13, 97, 3, 1, 29)),  # primes
]


@pytest.mark.parametrize("dtype,H,D,block_size,lens", DECODE_CASES)
def test_decode_matches_reference(dtype, H, D, block_size, lens):
    cache = Cache(lens, H, D, block_size, dtype, seed=D + block_size).poison()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), H, 1, D, generator=g).to(KERNEL_DEVICE, dtype)
    ref = _decode_ref(q, cache, D**-0.5)
    _assert_close(kernels.paged_decode_attention(q, cache.k, cache.v, cache.table, cache.seqlens), ref, dtype)
    capacity = cache.table.shape[1] * block_size
    for n in (1, min(capacity, 7)):  # one split, and many (empty ones among them)
        out = paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, cache.seqlens,
                                         softmax_scale=D**-0.5, num_splits=n)
        _assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("junk", [float("nan"), float("inf")])
def test_decode_junk_in_free_slots_never_leaks(dtype, junk):
    cache = Cache((1, 37, 90), 2, 32, 16, dtype, seed=2, spare_blocks=4, extra_cols=3)
    q = torch.randn(3, 2, 1, 32, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE, dtype)
    ref = _decode_ref(q, cache, 0.3)
    cache.poison(junk)
    for n in (1, 6):
        out = paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, cache.seqlens, softmax_scale=0.3,
                                         num_splits=n)
        _assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_large_logits_stay_finite(dtype):
    cache = Cache((300, 123), 2, 64, 16, dtype, seed=4, scale=100.0).poison()
    q = (torch.randn(2, 2, 1, 64, generator=torch.Generator().manual_seed(5)) * 100).to(KERNEL_DEVICE, dtype)
    ref = _decode_ref(q, cache, 64**-0.5)
    for n in (1, 5):
        out = paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, cache.seqlens, softmax_scale=64**-0.5,
                                         num_splits=n)
        _assert_close(out, ref, dtype)


def test_decode_single_position_returns_its_value():
    cache = Cache((1, 1), 3, 64, 16, torch.float16, seed=6).poison()
    q = torch.randn(2, 3, 1, 64, generator=torch.Generator().manual_seed(7)).to(KERNEL_DEVICE, torch.float16)
    out = paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, cache.seqlens, softmax_scale=0.125,
                                     num_splits=2)
    expected = torch.stack([cache.v[cache.table[b, 0].long(), 0] for b in range(2)])[:, :, None]  # (B, H, 1, D)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_strided_views(dtype):
    """Pages as halves of one (num_blocks, 2, bs, H, D) buffer (vector loads still valid), pages sliced
    out of a wider head dim (no vector loads), a table sliced out of a wider one, q from a fused qkv."""
    B, H, D, bs = 2, 3, 64, 8
    cache = Cache((20, 9), H, D, bs, dtype, seed=8, extra_cols=0)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, 1, 3, H, D, generator=g).to(KERNEL_DEVICE, dtype)[:, :, 0].transpose(1, 2)
    ref = _decode_ref(q, cache, D**-0.5)
    kv = torch.stack([cache.k, cache.v], 1)  # (num_blocks, 2, bs, H, D)
    wide = torch.randn(*cache.k.shape[:3], D + 3, generator=g).to(KERNEL_DEVICE, dtype)
    wide_v = wide.clone()
    wide[..., 1:1 + D], wide_v[..., 1:1 + D] = cache.k, cache.v
    table = torch.cat([cache.table, cache.table], 1)[:, :cache.table.shape[1]]  # row stride 2x the width
    vecs = {}
    for name, k, v in (("halves", kv[:, 0], kv[:, 1]), ("sliced", wide[..., 1:1 + D], wide_v[..., 1:1 + D])):
        assert not k.is_contiguous()
        vecs[name] = paged_attention._vec(k, v)
        for n in (1, 3):
            out = paged_decode_attention_fwd(q, k, v, table, cache.seqlens, softmax_scale=D**-0.5, num_splits=n)
            _assert_close(out, ref, dtype)
    assert vecs["halves"] > 1 and vecs["sliced"] == 1  # both load paths ran


def test_decode_lengths_past_the_table_stay_in_bounds():
    # The host never reads cache_seqlens (no sync): a length past the table's capacity is clamped.
    cache = Cache((40, 40), 2, 16, 8, torch.float32, seed=10, extra_cols=0)
    q = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(11)).to(KERNEL_DEVICE)
    ref = _decode_ref(q, cache, 0.25)
    out = paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, _i32((1000, 40)), softmax_scale=0.25,
                                     num_splits=3)
    _assert_close(out, ref, torch.float32)


# ------------------------------------------------------------------------------------------- prefill
def _packed_q(q_lens, H, D, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64) * scale).to(dtype).to(KERNEL_DEVICE)
    cu = _i32([0] + torch.tensor(q_lens).cumsum(0).tolist())
    return q, cu


def _prefill_ref(q, cu, cache, scale):
    return reference.paged_prefill_attention(q.cpu().double(), cache.ref_k, cache.ref_v, cache.table.cpu(),
                                             cu.cpu(), cache.seqlens.cpu(), softmax_scale=scale)


def _check_prefill(out, q, cu, cache, scale):
    """Against float64, within twice the error of PyTorch's own attention in q's dtype (or the dtype's
    floor, whichever is larger), as tests/test_attention.py does."""
    ref = _prefill_ref(q, cu, cache, scale)
    peer = reference.paged_prefill_attention(q.cpu(), cache.ref_k.to(q.dtype), cache.ref_v.to(q.dtype),
                                             cache.table.cpu(), cu.cpu(), cache.seqlens.cpu(), softmax_scale=scale)
    tol = max(2 * (peer.double() - ref).abs().max().item(), TOL[q.dtype])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite values in the output"
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= tol, f"max err {err:.3e} > tol {tol:.3e}"


# (q_len, kv_len) per sequence: a whole prompt (q_len == kv_len), a chunk after earlier chunks, a
# prefix-cache hit (only the tail computed), a single decode token, a one-token prompt
RAGGED = ((37, 37), (20, 85), (3, 40), (1, 66), (1, 1))
PREFILL_CASES = [  # dtype, H, D, block_size, (q_len, kv_len) per sequence
    (torch.float32, 2, 64, 16, RAGGED),
    (torch.float16, 2, 64, 7, RAGGED),
    (torch.float16, 3, 33, 5, ((29, 29), (1, 13), (17, 71))),
    (torch.float32, 1, 1, 3, ((5, 5), (2, 9))),  # D = 1
    (torch.float16, 1, 128, 16, ((130, 130), (64, 100))),  # several query blocks, longest first
]


@pytest.mark.parametrize("dtype,H,D,block_size,seqs", PREFILL_CASES)
def test_prefill_matches_reference(dtype, H, D, block_size, seqs):
    q_lens, kv_lens = zip(*seqs)
    cache = Cache(kv_lens, H, D, block_size, dtype, seed=D + block_size).poison()
    q, cu = _packed_q(q_lens, H, D, dtype, seed=D)
    out = kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table, cu, cache.seqlens)
    _check_prefill(out, q, cu, cache, D**-0.5)


@pytest.mark.parametrize("config,dtype", [(PREFILL_LONG, torch.float16), (PREFILL_MID, torch.float16),
                                          (PREFILL_SHORT, torch.float16), (PREFILL_UNALIGNED, torch.float16),
                                          (PREFILL_FP32, torch.float32), (PREFILL_FP32_SHORT, torch.float32)],
                         ids=["long", "mid", "short", "unaligned", "fp32", "fp32-short"])
def test_prefill_every_config(config, dtype):
    seqs = ((70, 70), (2, 150), (33, 47))  # causal diagonals inside and across blocks of every tile
    q_lens, kv_lens = zip(*seqs)
    cache = Cache(kv_lens, 2, 32, 16, dtype, seed=12).poison(float("inf"))
    q, cu = _packed_q(q_lens, 2, 32, dtype, seed=13)
    out = paged_prefill_attention_fwd(q, cache.k, cache.v, cache.table, cu, cache.seqlens, softmax_scale=0.2,
                                      config=config)
    _check_prefill(out, q, cu, cache, 0.2)


def test_prefill_many_short_sequences_and_empty_ones(monkeypatch):
    """The in-kernel search over several steps (BLOCK_B made 8 here, so 21 sequences take three), the
    grid's spare programs returning at once, and sequences with no queries this step (q_len 0)."""
    monkeypatch.setattr(paged_attention, "_BLOCK_B", 8)
    q_lens = [(b % 3) for b in range(21)]
    kv_lens = [q + (b % 5) + 1 for b, q in enumerate(q_lens)]
    cache = Cache(kv_lens, 1, 16, 4, torch.float32, seed=14, spare_blocks=1).poison()
    q, cu = _packed_q(q_lens, 1, 16, torch.float32, seed=15)
    out = paged_prefill_attention_fwd(q, cache.k, cache.v, cache.table, cu, cache.seqlens, softmax_scale=0.25,
                                      config=PREFILL_FP32_SHORT)
    _check_prefill(out, q, cu, cache, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_large_logits_stay_finite(dtype):
    """Scores ~1e3, far past exp's overflow (88) without the running max; not ~1e4, where one fp32
    rounding of a score moves a near-tie's weight past the fp32 tolerance whatever the kernel."""
    q_lens, kv_lens = (40, 1), (90, 60)
    cache = Cache(kv_lens, 2, 64, 16, dtype, seed=16, scale=30.0).poison()
    q, cu = _packed_q(q_lens, 2, 64, dtype, seed=17, scale=30.0)
    first_key = cache.ref_k[cache.table[0, 0].long(), 0]  # (H, D): position 0 of sequence 0
    assert (q[0].cpu().double() * first_key).sum(-1).abs().max() * 64**-0.5 > 500  # the scores are large
    out = kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table, cu, cache.seqlens)
    _check_prefill(out, q, cu, cache, 64**-0.5)


def test_prefill_strided_q_from_fused_qkv():
    """q as a (total_q, H, D) view of a fused (total_q, 3, H, D) projection: the vector path still holds."""
    H, D = 2, 64
    seqs = ((9, 30), (16, 16))
    q_lens, kv_lens = zip(*seqs)
    cache = Cache(kv_lens, H, D, 16, torch.float16, seed=18).poison()
    qkv = torch.randn(sum(q_lens), 3, H, D, generator=torch.Generator().manual_seed(19)).to(KERNEL_DEVICE,
                                                                                            torch.float16)
    q = qkv[:, 0]
    cu = _i32([0, 9, 25])
    assert not q.is_contiguous() and paged_attention._vec(q, cache.k) > 1
    out = kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table, cu, cache.seqlens)
    _check_prefill(out, q, cu, cache, D**-0.5)


def test_prefill_decode_rows_agree_with_the_decode_kernel():
    """A batch of one-token sequences through the prefill kernel is the decode step."""
    cache = Cache((5, 33, 17), 2, 32, 7, torch.float32, seed=20).poison()
    q, cu = _packed_q((1, 1, 1), 2, 32, torch.float32, seed=21)
    pre = kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table, cu, cache.seqlens)
    dec = kernels.paged_decode_attention(q[:, :, None], cache.k, cache.v, cache.table, cache.seqlens)
    torch.testing.assert_close(pre, dec[:, :, 0], atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_prefill_config_follows_the_batch():
    assert prefill_config(torch.float16, 64, 8, 1.0, 9) == PREFILL_SHORT
    assert prefill_config(torch.float16, 64, 8, 40.0, 9) == PREFILL_MID
    assert prefill_config(torch.float16, 128, 8, 512.0, 9) == PREFILL_LONG
    assert prefill_config(torch.float16, 128, 8, 512.0, 8) == PREFILL_MID  # sm_80: 128 rows spill at D 128
    assert prefill_config(torch.bfloat16, 64, 8, 512.0, 8) == PREFILL_LONG
    assert prefill_config(torch.float16, 128, 1, 512.0, 9) == PREFILL_UNALIGNED
    assert prefill_config(torch.float32, 64, 4, 2.0, 9) == PREFILL_FP32_SHORT
    assert prefill_config(torch.float32, 64, 4, 200.0, 9) == PREFILL_FP32


def test_prefill_bf16_under_the_interpreter_says_so():
    if KERNEL_DEVICE != "cpu":
        pytest.skip("the interpreter only")
    cache = Cache((4,), 1, 16, 4, torch.bfloat16)
    q, cu = _packed_q((4,), 1, 16, torch.bfloat16, seed=0)
    with pytest.raises(NotImplementedError, match="bf16"):
        kernels.paged_prefill_attention(q, cache.k, cache.v, cache.table, cu, cache.seqlens)


# ----------------------------------------------------------------------------------------- kv write
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_kv_write_matches_the_indexed_copy(dtype, slot_dtype):
    """k, v as views of a fused (N, 3, H, D) projection into shuffled slots, a padding row among them."""
    N, H, D, bs, num_blocks = 7, 3, 40, 5, 4
    g = torch.Generator().manual_seed(22)
    qkv = torch.randn(N, 3, H, D, generator=g).to(KERNEL_DEVICE, dtype)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * bs, generator=g)[:N]
    slots[3] = -1
    slots = slots.to(KERNEL_DEVICE, slot_dtype)
    pages = torch.randn(2, num_blocks, bs, H, D, generator=g).to(KERNEL_DEVICE, dtype)
    ours_k, ours_v = pages[0].clone(), pages[1].clone()
    kernels.paged_kv_write(k, v, ours_k, ours_v, slots)
    ref_k, ref_v = pages[0].clone(), pages[1].clone()
    reference.paged_kv_write(k, v, ref_k, ref_v, slots)
    assert torch.equal(ours_k, ref_k) and torch.equal(ours_v, ref_v)
    assert not torch.equal(ours_k, pages[0])  # something was written


def test_kv_write_many_head_blocks_and_slots_past_the_cache():
    """H * D past one program's tile (two programs along heads); a slot past the cache writes nothing
    (the kernel cannot raise without a sync: it keeps the write in bounds instead)."""
    N, H, D, bs, num_blocks = 3, 33, 128, 16, 2
    g = torch.Generator().manual_seed(23)
    k, v = (torch.randn(N, H, D, generator=g).to(KERNEL_DEVICE) for _ in range(2))
    k_pages, v_pages = (torch.randn(num_blocks, bs, H, D, generator=g).to(KERNEL_DEVICE) for _ in range(2))
    assert paged_attention._kv_write_block_h(H, 128) < H
    slots = _i32([31, num_blocks * bs, 2])
    before_k, before_v = k_pages.clone(), v_pages.clone()
    kernels.paged_kv_write(k, v, k_pages, v_pages, slots)
    before_k[1, 15], before_v[1, 15] = k[0], v[0]
    before_k[0, 2], before_v[0, 2] = k[2], v[2]
    assert torch.equal(k_pages, before_k) and torch.equal(v_pages, before_v)


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_naming_the_argument():
    cache = Cache((5, 9), 2, 16, 4, torch.float32)
    q = torch.randn(2, 2, 1, 16, device=KERNEL_DEVICE)
    k, v, table, lens = cache.k, cache.v, cache.table, cache.seqlens
    with pytest.raises(TypeError, match="block_table"):
        kernels.paged_decode_attention(q, k, v, table.long(), lens)
    with pytest.raises(ValueError, match="block_table"):
        kernels.paged_decode_attention(q, k, v, table[:1], lens)
    with pytest.raises(TypeError, match="cache_seqlens"):
        kernels.paged_decode_attention(q, k, v, table, lens.long())
    with pytest.raises(ValueError, match="cache_seqlens"):
        kernels.paged_decode_attention(q, k, v, table, _i32((5, 9, 1)))
    with pytest.raises(ValueError, match="v_pages"):
        kernels.paged_decode_attention(q, k, v[:, :2], table, lens)
    with pytest.raises(TypeError, match="k_pages"):
        kernels.paged_decode_attention(q, k.half(), v, table, lens)
    with pytest.raises(ValueError, match="q must hold one query"):
        kernels.paged_decode_attention(torch.cat([q, q], 2), k, v, table, lens)
    big = torch.randn(1, 1, 1, 130, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        kernels.paged_decode_attention(big, torch.randn(1, 4, 1, 130, device=KERNEL_DEVICE),
                                       torch.randn(1, 4, 1, 130, device=KERNEL_DEVICE), _i32([[0]]), _i32([1]))
    qp, cu = _packed_q((2, 3), 2, 16, torch.float32, seed=0)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        kernels.paged_prefill_attention(qp, k, v, table, cu.long(), lens)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        kernels.paged_prefill_attention(qp, k, v, table, cu[:1], lens)
    with pytest.raises(ValueError, match="block_table"):
        kernels.paged_prefill_attention(qp, k, v, table[:1], cu, lens)
    with pytest.raises(ValueError, match="k_pages"):
        kernels.paged_prefill_attention(qp[:, :1], k, v, table, cu, lens)
    with pytest.raises(TypeError, match="slot_mapping"):
        kernels.paged_kv_write(qp, qp, k, v, torch.zeros(5, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.paged_kv_write(qp, qp, k, v, _i32([0, 1]))
    with pytest.raises(ValueError, match="k_pages"):
        kernels.paged_kv_write(qp, qp, k[..., :8], v, _i32([0, 1, 2, 3, 4]))


def test_decode_split_count_ignores_the_lengths():
    """The plan reads only shapes: the same table and batch launch the same splits for any lengths, and
    splits past a short row's length are simply empty (no host sync to trim them)."""
    cache = Cache((3, 300), 2, 64, 16, torch.float32, seed=24, extra_cols=0)
    q = torch.randn(2, 2, 1, 64, generator=torch.Generator().manual_seed(25)).to(KERNEL_DEVICE)
    ref = _decode_ref(q, cache, 0.25)
    launches = []
    real = paged_attention._paged_decode_split_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    paged_attention._paged_decode_split_kernel = Spy()
    try:
        out = kernels.paged_decode_attention(q, cache.k, cache.v, cache.table, cache.seqlens, softmax_scale=0.25)
        kernels.paged_decode_attention(q, cache.k, cache.v, cache.table, _i32((1, 1)), softmax_scale=0.25)
    finally:
        paged_attention._paged_decode_split_kernel = real
    _assert_close(out, ref, torch.float32)
    assert launches[0] == launches[1] and launches[0][1] > 1


# ------------------------------------------------------------------------------------------ dispatch
@pytest.fixture
def launched(monkeypatch):
    """Names of the paged launchers that ran; each spy runs the real launcher."""
    called = []

    def spy(name):
        real = getattr(paged_attention, name)

        def launcher(*args, **kwargs):
            called.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(paged_attention, name, launcher)

    for name in ("paged_decode_attention_fwd", "paged_prefill_attention_fwd", "paged_kv_write_fwd"):
        spy(name)
    return called


def _call_paged_ops(requires_grad=False):
    cache = Cache((5, 9), 2, 16, 4, torch.float32, seed=26, extra_cols=0)
    g = torch.Generator().manual_seed(27)
    q = torch.randn(2, 2, 1, 16, generator=g).to(KERNEL_DEVICE).requires_grad_(requires_grad)
    dec = kernels.paged_decode_attention(q, cache.k, cache.v, cache.table, cache.seqlens)
    qp, cu = _packed_q((2, 3), 2, 16, torch.float32, seed=28)
    pre = kernels.paged_prefill_attention(qp.requires_grad_(requires_grad), cache.k, cache.v, cache.table, cu,
                                          cache.seqlens)
    k = torch.randn(2, 2, 16, generator=g).to(KERNEL_DEVICE).requires_grad_(requires_grad)
    kernels.paged_kv_write(k, k, cache.k, cache.v, _i32([3, -1]))
    return dec, pre, q, qp, cache


def test_the_interpreter_runs_the_kernels(launched):
    dec, pre, q, qp, cache = _call_paged_ops()
    assert launched == ["paged_decode_attention_fwd", "paged_prefill_attention_fwd", "paged_kv_write_fwd"]
    assert torch.isfinite(dec).all() and torch.isfinite(pre).all()


def test_the_reference_without_the_interpreter(launched, monkeypatch):
    if KERNEL_DEVICE != "cpu":
        pytest.skip("CPU dispatch only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _call_paged_ops()
    assert launched == []


def test_calls_autograd_records_take_the_reference(launched):
    _call_paged_ops(requires_grad=True)
    assert launched == []


# ------------------------------------------------------------------------------------------- compile
def test_compile_report_every_config():
    from kernels.compile_report import problems, run_in_subprocess

    rows = run_in_subprocess(["paged_attention"])
    assert {r["name"].split()[0] for r in rows} == {"paged_decode", "paged_prefill", "paged_kv_write"}
    bad = {(r["name"], r["arch"]): problems(r) for r in rows if problems(r)}
    assert not bad, bad
    assert all(r["ldg128"] for r in rows if "vec1" not in r["name"])
    # every 16-bit prefill tile runs on tensor cores: the 16-row ones through mma.sync, also on Hopper
    prefill16 = [r for r in rows if r["name"].startswith("paged_prefill") and "fp32" not in r["name"]]
    assert prefill16 and all(r["hgmma"] or r["hmma"] for r in prefill16)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_bf16_fp16(dtype):
    q_lens, kv_lens = zip(*(RAGGED + ((300, 1000), (128, 128))))
    for D in (64, 128):
        cache = Cache(kv_lens, 4, D, 16, dtype, seed=D).poison()
        q, cu = _packed_q(q_lens, 4, D, dtype, seed=D)
        for config in (None, PREFILL_LONG, PREFILL_MID, PREFILL_SHORT):
            out = paged_prefill_attention_fwd(q, cache.k, cache.v, cache.table, cu, cache.seqlens,
                                              softmax_scale=D**-0.5, config=config)
            _check_prefill(out, q, cu, cache, D**-0.5)


@pytest.mark.gpu
def test_gpu_no_sync_and_graph_replay():
    """Decode, prefill and the slot write: no host sync inside, and a captured graph replays with new
    lengths, a new table, new slots (padding included) and new keys."""
    dtype, H, D = torch.float16, 12, 64
    cache = Cache((4097, 1, 300), H, D, 16, dtype, seed=30, spare_blocks=8).poison()
    q = torch.randn(3, H, 1, D, device="cuda", dtype=dtype)
    qp, cu = _packed_q((5, 1, 300), H, D, dtype, seed=31)
    kn, vn = (torch.randn(3, H, D, device="cuda", dtype=dtype) for _ in range(2))
    slots = torch.tensor([7, -1, 40], device="cuda")

    def ops():  # the reads come first, then the write, as in one layer of an engine step
        return (kernels.paged_decode_attention(q, cache.k, cache.v, cache.table, cache.seqlens),
                kernels.paged_prefill_attention(qp, cache.k, cache.v, cache.table, cu, cache.seqlens),
                kernels.paged_kv_write(kn, vn, cache.k, cache.v, slots))

    ops()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the ops raises
    try:
        ops()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec, pre, _ = ops()
    cache.seqlens.copy_(_i32((17, 1, 300)))  # every new length within what its (new) row owns
    cache.table.copy_(cache.table.flip(0))
    kn.copy_(torch.randn_like(kn))
    vn.copy_(torch.randn_like(vn))
    slots.copy_(torch.tensor([100, -1, 3], device="cuda"))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    graph.replay()
    torch.cuda.synchronize()
    for pages, before, new in ((cache.k, before_k, kn), (cache.v, before_v, vn)):
        expect = before.clone()
        expect.view(-1, H, D)[100], expect.view(-1, H, D)[3] = new[0], new[2]
        torch.testing.assert_close(pages, expect, atol=0, rtol=0, equal_nan=True)
    # the reads saw the pages before the write; free slots (NaN) are zeroed for the reference
    owned = cache.owned.cuda()
    cache.ref_k = torch.where(owned[..., None, None], before_k, 0).cpu().double()
    cache.ref_v = torch.where(owned[..., None, None], before_v, 0).cpu().double()
    _assert_close(dec, _decode_ref(q, cache, D**-0.5), dtype)
    _check_prefill(pre, qp, cu, cache, D**-0.5)
