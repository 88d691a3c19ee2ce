"""The paged-cache kernels (kernels/paged_attention.py) on CUDA: right in every dtype, and how fast.

    check(device, dtypes)                -> rows op, case, dtype, max_err, tol, ok   (against float64)
    run(device, dtypes, quick, ceilings) -> timing rows, one per (op, shape, peer)
    pytest benchmarks/bench_paged_attention.py --benchmark-enable   # pytest-benchmark; skips without CUDA

Every comparison is on the same data: one dense cache (B, H, T, D) of random values, and the same
positions cut into blocks of 16 and scattered over the pages in shuffled order (the engine's layout).

* paged_decode_attention: GB/s of the K and V positions read, sum(len) * H * D * 2 * itemsize, against
  the dense split-KV kernel kernels.decode_attention on the dense cache (what paging costs: the table
  walk, rows gathered from scattered blocks) and F.scaled_dot_product_attention on the dense cache
  sliced to the length. Small shapes are timed as CUDA-graph replays over several input sets (larger
  than L2 together), as in bench_decode_attention.py. Shapes: GPT-2's heads (H 12, D 64) and D 128
  (H 16), B 1 .. 256, contexts 1k .. 16k; the engine's case is B 256 at ~1k.
* paged_prefill_attention: TFLOP/s of the causal work, 4 * H * D * (query, visible key) pairs, against
  kernels.flash_attention on the same queries and keys as (B, H, T, D) views of a fused qkv, the
  prefill path of the dense model: whole prompts (B equal prompts of T, which flash_attention can take)
  and chunks (the last q_len queries of each T-long sequence, keys of earlier chunks in the cache),
  plus SDPA for the whole prompts.
* paged_kv_write: GB/s of k and v read and written, 4 * N * H * D * itemsize, against the indexed copy
  (index_copy_ into the flattened pages) on slots without padding: the copy's best case, since with
  padding slots it must filter them on the host first. The op uses the kernel on CUDA (see
  kernels.paged_attention.paged_kv_write_fwd); a speedup below 1 here says the copy would be faster.

Calls go through the launchers in kernels.paged_attention (what the public ops dispatch to on CUDA after
validation) and decode_attention_fwd / flash_attention_fwd for the dense peers.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from benchmarks.common import L2_BYTES, bench_ms, require_cuda, time_per_call, timing_row

OPS = ("paged_decode_attention", "paged_prefill_attention", "paged_kv_write")
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
BLOCK_SIZE = 16  # the engine's default
_MAX_BYTES = 16 << 30  # per cache copy, K and V together

DECODE_ALL = [(B, T, D, H) for D, H in ((64, 12), (128, 16)) for B in (1, 8, 64, 256) for T in (1024, 4096, 16384)]
DECODE_QUICK = [(1, 16384, 128, 16), (8, 4096, 64, 12), (64, 1024, 64, 12), (256, 1024, 64, 12)]
# (B, q_len, kv_len, D, H): whole prompts have q_len == kv_len
PREFILL_ALL = [(8, T, T, 64, 12) for T in (256, 512, 1024)] + [(4, 4096, 4096, 128, 16), (1, 16384, 16384, 128, 16)] \
    + [(8, 512, 4096, 64, 12), (4, 512, 8192, 128, 16), (64, 16, 1024, 64, 12)]
PREFILL_QUICK = [(8, 1024, 1024, 64, 12), (4, 4096, 4096, 128, 16), (8, 512, 4096, 64, 12), (64, 16, 1024, 64, 12)]
KV_WRITE_ALL = [(N, 12, 64) for N in (1, 64, 256, 4096, 16384)] + [(16384, 16, 128)]
KV_WRITE_QUICK = [(256, 12, 64), (16384, 12, 64)]


def _paged():
    return importlib.import_module("kernels.paged_attention")


def _dense():
    return importlib.import_module("kernels.decode_attention"), importlib.import_module("kernels.attention")


def _randn(shape, gen, dtype, device, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, device=device)).to(dtype)


def _scatter_blocks(dense, gen, block_size=BLOCK_SIZE):
    """dense (B, H, T, D), T a multiple of block_size -> (pages (B*T/bs, bs, H, D), table int32 (B, T/bs)):
    the same positions, block j of row b stored at a shuffled page."""
    B, H, T, D = dense.shape
    nb = T // block_size
    blocks = dense.permute(0, 2, 1, 3).reshape(B * nb, block_size, H, D)
    perm = torch.randperm(B * nb, generator=gen, device=dense.device)
    pages = torch.empty_like(blocks)
    pages[perm] = blocks
    return pages, perm.view(B, nb).to(torch.int32)


class _Cache:
    """Random pages holding lens[b] positions per sequence in shuffled blocks; the table's entries past
    each sequence's last block are garbage and, with poison, every slot nobody owns is NaN."""

    def __init__(self, lens, H, D, block_size, dtype, device, seed, scale=1.0, extra_cols=2):
        gen = torch.Generator(device=device).manual_seed(seed)
        need = [-(-n // block_size) for n in lens]
        num_blocks = sum(need) + 4
        self.k = _randn((num_blocks, block_size, H, D), gen, dtype, device, scale)
        self.v = _randn((num_blocks, block_size, H, D), gen, dtype, device)
        perm = torch.randperm(num_blocks, generator=gen, device=device)
        table = torch.randint(-2**31, 2**31 - 1, (len(lens), max(need) + extra_cols), generator=gen, device=device)
        self.owned = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        at = 0
        for b, (n, nb) in enumerate(zip(lens, need)):
            table[b, :nb] = perm[at:at + nb]
            at += nb
            flat = self.owned[table[b, :nb]].view(-1)
            flat[:n] = True
            self.owned[table[b, :nb]] = flat.view(nb, block_size)
        self.table = table.to(torch.int32)
        self.seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.ref_k, self.ref_v = self.k.double(), self.v.double()

    def poison(self):
        self.k[~self.owned] = float("nan")
        self.v[~self.owned] = float("nan")
        return self


def _err(out, ref) -> float:
    return float(((out.double() - ref).abs() / (1 + ref.abs())).max())  # NaN stays NaN: not ok


def _row(op, case, dtype, err, tol) -> dict:
    return {"op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "max_err": err, "tol": tol,
            "ok": bool(err <= tol)}


# ------------------------------------------------------------------------------------------- check
def check(device, dtypes) -> list[dict]:
    """Every dtype against the float64 reference: ragged lengths ending mid-block, shuffled blocks, odd
    block sizes and head dims, one and many splits, garbage table entries and NaN in every free slot,
    each prefill tile; the slot write exactly (padding slots, fused-qkv views). Large logits: ~1e3,
    far past where exp overflows without the running max (88), but not ~1e4, where one fp32 rounding
    of a logit (ulp 1e-3) already moves a near-tie's weight past fp32's 1e-5 tolerance in any kernel."""
    from kernels import reference

    device = require_cuda(device, "bench_paged_attention")
    pa = _paged()
    rows = []
    decode_cases = [  # name, H, D, block_size, lens, num_splits, q/k scale
        ("ragged 1/37/4100 bs16 auto splits", 12, 64, 16, (1, 37, 4100), None, 1.0),
        ("ragged 1/37/4100 bs16 one split", 12, 64, 16, (1, 37, 4100), 1, 1.0),
        ("bs7 D128 7 splits", 16, 128, 7, (2100, 1, 1000), 7, 1.0),
        ("bs5 odd D=80", 4, 80, 5, (1500, 3), None, 1.0),
        ("bs16 odd D=33", 4, 33, 16, (77, 1500), None, 1.0),
        ("large logits (~1e3)", 12, 64, 16, (4096, 100), None, 30.0),
        ("engine: B=256 ragged <=1024", 12, 64, 16, tuple((i * 397) % 1024 + 1 for i in range(256)), None, 1.0),
    ]
    prefill_cases = [  # name, H, D, block_size, (q_len, kv_len) per sequence, config
        ("ragged prompts/chunks/hits/decode rows", 12, 64, 16,
         ((300, 300), (64, 1000), (1, 777), (5, 5), (128, 129)), None),
        ("D128 bs7 chunks", 16, 128, 7, ((512, 2048), (700, 700), (3, 1500)), None),
        ("odd D=33 bs5 (unaligned tile)", 4, 33, 5, ((200, 260), (77, 77)), None),
        ("large logits (~1e3)", 12, 64, 16, ((256, 300), (1, 50)), "large"),
    ]
    tiles = {"long": pa.PREFILL_LONG, "mid": pa.PREFILL_MID, "short": pa.PREFILL_SHORT}
    for dtype in dtypes:
        tol = TOL[dtype]
        for name, H, D, bs, lens, splits, scale in decode_cases:
            cache = _Cache(lens, H, D, bs, dtype, device, seed=D + bs, scale=scale)
            q = _randn((len(lens), H, 1, D), torch.Generator(device=device).manual_seed(1), dtype, device, scale)
            ref = reference.paged_decode_attention(q.double(), cache.ref_k, cache.ref_v, cache.table, cache.seqlens,
                                                   softmax_scale=D**-0.5)
            cache.poison()
            out = pa.paged_decode_attention_fwd(q, cache.k, cache.v, cache.table, cache.seqlens,
                                                softmax_scale=D**-0.5, num_splits=splits)
            rows.append(_row("paged_decode_attention", name + ", NaN in free slots", dtype, _err(out, ref), tol))

        cases = list(prefill_cases)
        if dtype != torch.float32:
            cases += [(f"tile {t}", 12, 64, 16, ((300, 300), (64, 1000), (1, 777), (17, 40)), t) for t in tiles]
        for name, H, D, bs, seqs, config in cases:
            q_lens, kv_lens = zip(*seqs)
            scale = 30.0 if config == "large" else 1.0
            cache = _Cache(kv_lens, H, D, bs, dtype, device, seed=D + bs, scale=scale)
            gen = torch.Generator(device=device).manual_seed(2)
            q = _randn((sum(q_lens), H, D), gen, dtype, device, scale)
            cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            args = (cache.table, cu, cache.seqlens)
            ref = reference.paged_prefill_attention(q.double(), cache.ref_k, cache.ref_v, *args, softmax_scale=D**-0.5)
            peer = reference.paged_prefill_attention(q, cache.k, cache.v, *args, softmax_scale=D**-0.5)
            # as bench_attention.py: twice PyTorch's own error in this dtype, or the dtype's floor
            ptol = max(2 * float((peer.double() - ref).abs().max()), tol)
            cache.poison()
            out = pa.paged_prefill_attention_fwd(q, cache.k, cache.v, *args, softmax_scale=D**-0.5,
                                                 config=tiles.get(config))
            err = float((out.double() - ref).abs().max())
            rows.append(_row("paged_prefill_attention", name + ", NaN in free slots", dtype, err, ptol))

        for N, H, D, bs in ((300, 12, 64, 16), (37, 25, 33, 7)):
            gen = torch.Generator(device=device).manual_seed(3)
            qkv = _randn((N, 3, H, D), gen, dtype, device)
            num_blocks = -(-2 * N // bs)
            slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:N]
            slots[::5] = -1  # padding rows of a CUDA-graph batch
            pages = _randn((2, num_blocks, bs, H, D), gen, dtype, device)
            ours, ref = pages.clone(), pages.clone()
            pa.paged_kv_write_fwd(qkv[:, 1], qkv[:, 2], ours[0], ours[1], slots)
            reference.paged_kv_write(qkv[:, 1], qkv[:, 2], ref[0], ref[1], slots)
            err = float((ours.double() - ref.double()).abs().max())
            rows.append(_row("paged_kv_write", f"N={N} H={H} D={D} bs{bs}, fused-qkv views, padding", dtype, err, 0.0))
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------- run
def _decode_rows(device, dtype, shapes, timing, ceilings) -> list[dict]:
    pa = _paged()
    dense_decode = _dense()[0].decode_attention_fwd
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    for B, T, D, H in shapes:
        if 2 * B * H * T * D * elt > _MAX_BYTES:
            continue
        nbytes = 2 * B * H * T * D * elt
        copies = max(1, min(8, -(-2 * L2_BYTES // nbytes)))
        gen = torch.Generator(device=device).manual_seed(B * T + D)
        sets = []
        for _ in range(copies):
            q = _randn((B, H, 1, D), gen, dtype, device)
            k, v = _randn((B, H, T, D), gen, dtype, device), _randn((B, H, T, D), gen, dtype, device)
            kp, table = _scatter_blocks(k, gen)
            vp = torch.empty_like(kp)
            vp[table.view(-1).long()] = v.permute(0, 2, 1, 3).reshape(kp.shape)  # the same shuffle as k
            sets.append((q, k, v, kp, vp, table))
        lens = torch.full((B,), T, dtype=torch.int32, device=device)
        scale = D**-0.5
        ours = [lambda s=s: pa.paged_decode_attention_fwd(s[0], s[3], s[4], s[5], lens, softmax_scale=scale)
                for s in sets]
        peers = [
            ("decode_attention (dense cache)",
             [lambda s=s: dense_decode(s[0], s[1], s[2], lens, softmax_scale=scale) for s in sets]),
            ("F.sdpa (dense cache)", [lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], scale=scale)
                                      for s in sets]),
        ]
        ours_ms, how = time_per_call(ours, timing)
        for peer, calls in peers:
            peer_ms, peer_how = time_per_call(calls, timing)
            row = timing_row("paged_decode_attention", f"B={B} H={H} len={T} D={D} bs{BLOCK_SIZE}", dtype, ours_ms,
                             peer, peer_ms, nbytes, "GB/s", ceilings)
            row["timing"] = how if how == peer_how else f"ours {how}, peer {peer_how}"
            rows.append(row)
        del sets, ours, peers
        torch.cuda.empty_cache()
    return rows


def _prefill_rows(device, dtype, shapes, timing, ceilings) -> list[dict]:
    pa = _paged()
    flash_fwd = _dense()[1].flash_attention_fwd
    rows = []
    for B, q_len, kv_len, D, H in shapes:
        gen = torch.Generator(device=device).manual_seed(B * kv_len + D)
        qkv = _randn((B, kv_len, 3, H, D), gen, dtype, device)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views, as the dense model passes them
        q = q[:, :, kv_len - q_len:]
        kp, table = _scatter_blocks(k, gen)
        vp = torch.empty_like(kp)
        vp[table.view(-1).long()] = v.permute(0, 2, 1, 3).reshape(kp.shape)
        qp = q.permute(0, 2, 1, 3).reshape(B * q_len, H, D)  # packed, sequence after sequence
        cu = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=device)
        lens = torch.full((B,), kv_len, dtype=torch.int32, device=device)
        scale = D**-0.5
        pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2  # (query, visible key) per sequence
        work = 4 * B * H * D * pairs
        whole = q_len == kv_len
        shape = f"B={B} H={H} q_len={q_len} kv_len={kv_len} D={D} bs{BLOCK_SIZE}" + ("" if whole else " chunk")
        ours_ms = bench_ms(lambda: pa.paged_prefill_attention_fwd(qp, kp, vp, table, cu, lens, softmax_scale=scale),
                           **timing)
        peers = [("flash_attention (dense)", lambda: flash_fwd(q, k, v, causal=True, softmax_scale=scale))]
        if whole:
            peers.append(("torch SDPA (dense)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                        scale=scale)))
        for peer, fn in peers:
            fn()  # autotune / warm up outside the timing
            rows.append(timing_row("paged_prefill_attention", shape, dtype, ours_ms, peer, bench_ms(fn, **timing),
                                   work, "TFLOP/s", ceilings))
        del qkv, q, k, v, kp, vp, qp
        torch.cuda.empty_cache()
    return rows


def _kv_write_rows(device, dtype, shapes, timing, ceilings) -> list[dict]:
    pa = _paged()
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    for N, H, D in shapes:
        nbytes = 4 * N * H * D * elt
        copies = max(1, min(16, -(-2 * L2_BYTES // nbytes)))
        gen = torch.Generator(device=device).manual_seed(N + D)
        num_blocks = -(-4 * N // BLOCK_SIZE)  # the cache 4x the tokens written, slots shuffled over it
        kp = _randn((num_blocks, BLOCK_SIZE, H, D), gen, dtype, device)
        vp = torch.empty_like(kp).copy_(kp)
        sets = [(_randn((N, 3, H, D), gen, dtype, device),
                 torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device=device)[:N]) for _ in range(copies)]
        ours = [lambda s=s: pa.paged_kv_write_fwd(s[0][:, 1], s[0][:, 2], kp, vp, s[1]) for s in sets]

        def indexed(qkv, slots):
            kp.view(-1, H, D).index_copy_(0, slots, qkv[:, 1])
            vp.view(-1, H, D).index_copy_(0, slots, qkv[:, 2])

        peer = [lambda s=s: indexed(*s) for s in sets]
        ours_ms, how = time_per_call(ours, timing)
        peer_ms, peer_how = time_per_call(peer, timing)
        row = timing_row("paged_kv_write", f"N={N} H={H} D={D} fused-qkv views", dtype, ours_ms,
                         "index_copy_ (no padding)", peer_ms, nbytes, "GB/s", ceilings)
        row["timing"] = how if how == peer_how else f"ours {how}, peer {peer_how}"
        rows.append(row)
        del sets, ours, peer, kp, vp
        torch.cuda.empty_cache()
    return rows


def run(device, dtypes, quick: bool, ceilings) -> list[dict]:
    device = require_cuda(device, "bench_paged_attention")
    timing = dict(warmup_ms=10, rep_ms=30) if quick else dict(warmup_ms=25, rep_ms=100)
    rows = []
    for dtype in dtypes:
        rows += _decode_rows(device, dtype, DECODE_QUICK if quick else DECODE_ALL, timing, ceilings)
        if dtype != torch.float32:  # fp32 prefill is the parity path (IEEE dots on FMA units), not a speed target
            rows += _prefill_rows(device, dtype, PREFILL_QUICK if quick else PREFILL_ALL, timing, ceilings)
        rows += _kv_write_rows(device, dtype, KV_WRITE_QUICK if quick else KV_WRITE_ALL, timing, ceilings)
    return rows


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # run() and check() need no pytest
    pytest = None

if pytest is not None:
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("B,T,D,H", DECODE_QUICK)
    def test_paged_decode_attention(benchmark, B, T, D, H, dtype):
        pa = _paged()
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = _randn((B, H, 1, D), gen, dtype, "cuda")
        kp, table = _scatter_blocks(_randn((B, H, T, D), gen, dtype, "cuda"), gen)
        vp = _randn(tuple(kp.shape), gen, dtype, "cuda")
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")

        def call():
            pa.paged_decode_attention_fwd(q, kp, vp, table, lens, softmax_scale=D**-0.5)
            torch.cuda.synchronize()

        benchmark(call)

    @cuda_only
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
    def test_check_all_rows_ok(dtype):
        bad = [r for r in check("cuda", [dtype]) if not r["ok"]]
        assert not bad, bad
