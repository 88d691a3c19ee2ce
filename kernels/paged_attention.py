"""Attention over a paged KV cache (the engine's kernels): split-KV decode, varlen prefill, slot writes.

The cache is FlashAttention's / vLLM's paged layout: k_pages, v_pages (num_blocks, block_size, H, D),
and each sequence owns a row of an int32 block table. Position p of sequence b lives in block
``block_table[b, p // block_size]`` at offset ``p % block_size``. Blocks are handed out by the engine in
any order and shared between sequences (prefix caching), so nothing here assumes they are adjacent.

Gathering positions. Every tile of BLOCK_N positions first loads its BLOCK_N table entries (one int32
each, from L1 after the first touch), then one K row and one V row per position at
``block * stride_b + offset * stride_t + head * stride_h``. A position is the unit, not a block: any
block size works (16, the engine's default, but also 5 or 7), a sequence may end mid-block, and tiles
and blocks need not line up. The table entry is clamped into [0, num_blocks) and positions past a
sequence's length are masked (the entries beyond its last block are never read), so an unused table
entry or a stale cache slot (NaN, inf) cannot reach the arithmetic. BLOCK_SIZE is a compile-time
constant: ``p // block_size`` is then a shift for powers of two and a multiply-shift otherwise.

1. ``paged_decode_attention``: one query per sequence, split-KV as in kernels/decode_attention.py (same
   online softmax per row slot, same partial outputs + base-2 log-sum-exps, and its merge kernel). The
   split plan comes from the table's capacity max_blocks_per_seq * block_size, the batch and the SM
   count, never from the lengths: no host sync, static launches, capturable in a CUDA graph.

2. ``paged_prefill_attention``: packed queries of B sequences, q (total_q, H, D), sequence b owning
   rows cu_seqlens_q[b]:cu_seqlens_q[b+1], which sit at the last q_len_b of its cache_seqlens[b]
   positions (causal, bottom-right: query i sees keys j <= i + kv_len - q_len). One kernel serves a
   whole prompt, a chunk of one (keys of earlier chunks already in the cache) and a prefix-cache hit
   (the shared prefix's blocks read, not recomputed); q_len may be 1. FlashAttention-2's forward per
   query block: tl.dot for q k^T and p v with fp32 accumulation (IEEE for fp32 inputs, so results
   match fp32 PyTorch on a GPU), key blocks above the diagonal never visited, the ones below it run
   without masks.
   Grid: (query blocks of all sequences, heads), sized from static shapes only: sequence b has
   cdiv(q_len_b, BLOCK_M) query blocks, and sum_b cdiv(q_len_b, M) <= cdiv(total_q, M) + B - 1, so the
   launch takes that bound and the few programs past the real count return at once. Each program
   finds its sequence by a running sum over cu_seqlens_q (BLOCK_B entries per step, one step for
   batches up to 128): no host sync, no table for the caller to build, and the same grid for the same
   shapes (CUDA graphs). Within a sequence the last query blocks (the most keys) run first.

3. ``paged_kv_write``: one program per new token copies its H x D keys and values into its slot;
   a negative slot (a padding row of a CUDA-graph batch) or one past the cache writes nothing. The
   indexed copy (kernels.reference) needs the negative slots filtered out first, a host sync, so it
   cannot be captured; this kernel can, and writes k and v in one launch from any strides
   (views of a fused qkv projection).

Memory traffic: both attention kernels read each needed K and V position once per (query block, head)
and write only the output (plus, for split decode, num_splits * (D + 1) fp32 partials per (b, h));
the table adds 4 bytes per position read, against 2 * D * itemsize of K and V. Without the paged
kernels a caller would gather the pages into a dense (B, H, T, D) copy first: a full extra read and
write of the cache per layer and step.

Sources (ideas, not code): Kwon et al., "Efficient Memory Management for Large Language Model Serving
with PagedAttention" (vLLM, 2023) for the paged layout; Dao et al., "FlashAttention-2" (2023) for the
online softmax and the varlen (cu_seqlens) batching; "Flash-Decoding" (Dao, Haziza, Massa, Sizov, 2023)
for split-KV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._device import sm_count
from kernels.attention import head_dim_block
from kernels.compile_report import KernelSpec
from kernels.decode_attention import _MERGE_BLOCK_S, _block_config, _decode_merge_kernel, _split_plan

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------- shared pieces
@triton.jit
def _page_slots(TableRow, offs_n, n_ok, stride_tn, num_blocks, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """(block, offset in the block), int64, of positions offs_n, through the sequence's table row."""
    if MASKED:
        blk = tl.load(TableRow + (offs_n // BLOCK_SIZE) * stride_tn, mask=n_ok, other=0)
    else:
        blk = tl.load(TableRow + (offs_n // BLOCK_SIZE) * stride_tn)
    # A bad entry (the host never checks the table: that would sync) stays inside the cache.
    blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
    return blk, (offs_n % BLOCK_SIZE).to(tl.int64)


# ------------------------------------------------------------------------------------ 1. paged decode
@triton.jit
def _load_paged_kv(K, V, TableRow, offs_n, end, offs_d, mask_d, stride_tn, num_blocks,
                   stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                   BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr):
    n_ok = offs_n < end
    blk, off = _page_slots(TableRow, offs_n, n_ok, stride_tn, num_blocks, BLOCK_SIZE, True)
    k_ptrs = K + (blk * stride_kb + off * stride_kt)[:, None] + offs_d[None, :] * stride_kd
    v_ptrs = V + (blk * stride_vb + off * stride_vt)[:, None] + offs_d[None, :] * stride_vd
    if VEC > 1:
        # The launcher checked base pointers and strides: every run of VEC elements along D is
        # contiguous and 16-byte aligned, whatever block a row came from (128-bit loads).
        k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [1, VEC])
        v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [16, 16]), [1, VEC])
    # Masked lanes load 0 and get a -inf score: what sits past the length never reaches the math.
    mask = n_ok[:, None] & mask_d[None, :]
    return tl.load(k_ptrs, mask=mask, other=0.0), tl.load(v_ptrs, mask=mask, other=0.0)


@triton.jit
def _paged_decode_split_kernel(
    Q, K, V, BlockTable, SeqLens, O, MidO, MidLse,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_od,
    H, num_blocks, T_max, num_splits, split_len, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr, DIRECT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    # Lengths are not checked on the host (that would sync); the table's capacity bounds them here.
    seqlen = tl.minimum(tl.load(SeqLens + b), T_max)
    start = split * split_len
    end = tl.minimum(start + split_len, seqlen)

    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale  # log2(e) folded in: the softmax runs on exp2
    k_head = K + h * stride_kh
    v_head = V + h * stride_vh
    table_row = BlockTable + b * stride_tb
    mid = bh * num_splits + split

    # One online-softmax state per row slot of the tile, combined after the loop: no cross-warp
    # reduction (and no barrier) inside it (see kernels/decode_attention.py).
    m_i = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    offs_n = start + tl.arange(0, BLOCK_N)
    k, v = _load_paged_kv(k_head, v_head, table_row, offs_n, end, offs_d, mask_d, stride_tn, num_blocks,
                          stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd, BLOCK_SIZE, VEC)
    for _ in range(start, end, BLOCK_N):
        # The next tile is requested before this one is used, so each warp waits on all its loads at
        # once (Triton pipelines only loads that feed tl.dot); past the end they are masked off.
        k_next, v_next = _load_paged_kv(k_head, v_head, table_row, offs_n + BLOCK_N, end, offs_d, mask_d,
                                        stride_tn, num_blocks, stride_kb, stride_kt, stride_kd,
                                        stride_vb, stride_vt, stride_vd, BLOCK_SIZE, VEC)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(offs_n < end, s, -float("inf"))
        m_new = tl.maximum(m_i, s)
        # a slot that has seen only masked positions stays at -inf: subtract 0, not -inf (no NaN)
        m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
        k, v = k_next, v_next
        offs_n += BLOCK_N

    m = tl.max(m_i, 0)
    w = tl.exp2(m_i - tl.where(m == -float("inf"), 0.0, m))
    l = tl.sum(l_i * w, 0)
    # an empty split (start >= seqlen) has l = 0: it stores o_s = 0 and lse = -inf (zero weight)
    nonempty = l > 0.0
    out = tl.sum(acc * w[:, None], 0) / tl.where(nonempty, l, 1.0)
    if DIRECT:
        tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=mask_d)
    else:
        tl.store(MidO + mid * D_PAD + offs_d, out)
        tl.store(MidLse + mid, tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), -float("inf")))


# ----------------------------------------------------------------------------------- 2. paged prefill
@triton.jit
def _find_query_block(CuSeqlensQ, B, pid, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """(sequence, index of its first query block among all sequences' blocks) of grid row pid.

    Blocks are numbered sequence after sequence; sequence b's end is the running sum of
    cdiv(q_len, BLOCK_M) up to b. The sequence of pid is the number of sequences ending at or before
    it (B when pid is past the last block)."""
    offs = tl.arange(0, BLOCK_B)
    seq = tl.program_id(0) * 0  # int32 scalars carried through the loop
    first = seq
    done = seq  # query blocks of the sequences already scanned
    for s0 in range(0, B, BLOCK_B):
        ok = s0 + offs < B
        lo = tl.load(CuSeqlensQ + s0 + offs, mask=ok, other=0)
        hi = tl.load(CuSeqlensQ + s0 + offs + 1, mask=ok, other=0)
        n_blocks = tl.where(ok, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M), 0)
        before = ok & (done + tl.cumsum(n_blocks, 0) <= pid)
        seq += tl.sum(before.to(tl.int32), 0)
        first += tl.sum(tl.where(before, n_blocks, 0), 0)
        done += tl.sum(n_blocks, 0)
    return seq, first


@triton.jit
def _prefill_inner(acc, l_i, m_i, q, K, V, TableRow, offs_m, offs_n, offs_d, d_mask, lo, hi, diag, kv_len,
                   stride_tn, num_blocks, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd,
                   qk_scale, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, VEC: tl.constexpr,
                   MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        n_ok = pos < kv_len
        blk, off = _page_slots(TableRow, pos, n_ok, stride_tn, num_blocks, BLOCK_SIZE, MASKED)
        # K is read transposed, (D_PAD, BLOCK_N), so q @ k needs no in-register transpose
        k_ptrs = K + (blk * stride_kb + off * stride_kt)[None, :] + offs_d[:, None] * stride_kd
        v_ptrs = V + (blk * stride_vb + off * stride_vt)[:, None] + offs_d[None, :] * stride_vd
        if VEC > 1:
            k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [VEC, 1])
            v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [16, 16]), [1, VEC])
        if MASKED:
            k = tl.load(k_ptrs, mask=d_mask[:, None] & n_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        if q.dtype == tl.float32:
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        if MASKED:
            keep = n_ok[None, :] & (pos[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with every key so far masked keeps m = -inf; subtracting 0 keeps p = 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if q.dtype == tl.float32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_prefill_kernel(
    Q, K, V, BlockTable, CuSeqlensQ, SeqLens, O,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_tb, stride_tn,
    stride_ot, stride_oh, stride_od,
    B, num_blocks, T_max, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_B: tl.constexpr, VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq, first = _find_query_block(CuSeqlensQ, B, pid, BLOCK_M, BLOCK_B)
    if seq >= B:  # the grid is an upper bound on the query blocks: this program has none
        return
    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    kv_len = tl.minimum(tl.load(SeqLens + seq), T_max)
    start_m = tl.cdiv(q_len, BLOCK_M) - 1 - (pid - first)  # the last query blocks (most keys) first

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    o_ptrs = O + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    if VEC > 1:
        q_ptrs = tl.max_contiguous(tl.multiple_of(q_ptrs, [16, 16]), [1, VEC])
        o_ptrs = tl.max_contiguous(tl.multiple_of(o_ptrs, [16, 16]), [1, VEC])
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # Bottom-right causal: row i sees keys j <= i + diag. Key blocks ending at or before the first
    # row's last key need no mask (they also lie inside kv_len, since that row is a real query); nothing
    # past the last row's last key is visited. A bad q_len > kv_len (rows that see no key) gives 0.
    diag = kv_len - q_len
    hi = tl.maximum(tl.minimum(kv_len, (start_m + 1) * BLOCK_M + diag), 0)
    mask_lo = tl.minimum(tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N * BLOCK_N, hi)
    k_head = K + h * stride_kh
    v_head = V + h * stride_vh
    table_row = BlockTable + seq.to(tl.int64) * stride_tb
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_head, v_head, table_row, offs_m, offs_n, offs_d, d_mask,
                                   0, mask_lo, diag, kv_len, stride_tn, num_blocks,
                                   stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd, qk_scale,
                                   BLOCK_N, BLOCK_SIZE, VEC, False, EVEN_D)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_head, v_head, table_row, offs_m, offs_n, offs_d, d_mask,
                                   mask_lo, hi, diag, kv_len, stride_tn, num_blocks,
                                   stride_kb, stride_kt, stride_kd, stride_vb, stride_vt, stride_vd, qk_scale,
                                   BLOCK_N, BLOCK_SIZE, VEC, True, EVEN_D)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ------------------------------------------------------------------------------------ 3. slot writes
@triton.jit
def _paged_kv_write_kernel(
    K, V, KPages, VPages, Slots,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_pb, stride_pt, stride_ph, stride_pd,
    stride_wb, stride_wt, stride_wh, stride_wd,
    H, num_slots,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    VEC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D_PAD)
    slot = tl.load(Slots + n).to(tl.int64)
    # padding rows (slot < 0) and slots past the cache read and write nothing (no host check: no sync)
    # (folded into the head bound: the interpreter rejects a scalar bool & a tensor mask)
    h_end = tl.where((slot >= 0) & (slot < num_slots), H, 0)
    mask = (offs_h < h_end)[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h64 = offs_h.to(tl.int64)[:, None]
    k_ptrs = K + n * stride_kn + h64 * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + n * stride_vn + h64 * stride_vh + offs_d[None, :] * stride_vd
    kp_ptrs = KPages + blk * stride_pb + off * stride_pt + h64 * stride_ph + offs_d[None, :] * stride_pd
    vp_ptrs = VPages + blk * stride_wb + off * stride_wt + h64 * stride_wh + offs_d[None, :] * stride_wd
    if VEC > 1:
        k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [16, 16]), [1, VEC])
        v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [16, 16]), [1, VEC])
        kp_ptrs = tl.max_contiguous(tl.multiple_of(kp_ptrs, [16, 16]), [1, VEC])
        vp_ptrs = tl.max_contiguous(tl.multiple_of(vp_ptrs, [16, 16]), [1, VEC])
    tl.store(kp_ptrs, tl.load(k_ptrs, mask=mask), mask=mask)
    tl.store(vp_ptrs, tl.load(v_ptrs, mask=mask), mask=mask)


# ------------------------------------------------------------------------------------------- launchers
_BLOCK_B = 128  # sequences per step of the in-kernel search: one step for batches up to 128
_KV_WRITE_ELEMENTS = 4096  # elements of k (and of v) per slot-write program: 16 a thread at 4 warps


def _vec(*ts: torch.Tensor) -> int:
    """Elements per 16-byte load when every D-run of every tensor starts 16-byte aligned, else 1."""
    vec = 16 // ts[0].element_size()
    for t in ts:
        if t.stride(-1) != 1 or t.shape[-1] % vec or t.data_ptr() % 16:
            return 1
        if any(s % vec for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):  # a size-1 dim never steps
            return 1
    return vec


def _capacity(k_pages, block_table) -> int:
    """Positions a table row can address: the bound the kernels clamp each length to."""
    t_max = block_table.shape[1] * k_pages.shape[1]
    if t_max > 2**30:
        raise ValueError(f"block_table addresses {t_max} positions per row; at most 2**30 are supported "
                         "(int32 positions)")
    return t_max


def _table(block_table: torch.Tensor) -> torch.Tensor:
    # a zero-width table (no blocks yet) still needs a valid pointer; its entries are never read
    return block_table if block_table.shape[1] else block_table.new_zeros((block_table.shape[0], 1))


def paged_decode_attention_fwd(q, k_pages, v_pages, block_table, cache_seqlens, *, softmax_scale: float,
                               num_splits: int | None = None) -> torch.Tensor:
    """q (B,H,1,D); k/v_pages (num_blocks, block_size, H, D); block_table int32 (B, max_blocks);
    cache_seqlens int32 (B,) -> o (B,H,1,D). Any strides. Validated by kernels.paged_decode_attention.

    The split plan is decode_attention's, over the table's capacity T = max_blocks * block_size (the
    longest a row can be: the lengths themselves stay on the device). Tile sizes are decode_attention's
    too: a position's K row is the same D-run whichever block it sits in, so the same registers hold it.
    num_splits=None picks the split count; tests pass it to force one or several splits.
    """
    B, H, _, D = q.shape
    num_blocks, block_size = k_pages.shape[:2]
    t_max = _capacity(k_pages, block_table)
    d_pad = head_dim_block(D)
    vec = _vec(k_pages, v_pages)
    block_n, num_warps = _block_config(d_pad, vec)
    n_splits, split_len = _split_plan(B, H, max(t_max, 1), block_n, sm_count(q.device), num_splits)
    table = _table(block_table)
    seqlens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()

    o = torch.empty((B, H, 1, D), device=q.device, dtype=q.dtype)
    direct = n_splits == 1
    if direct:
        mid_o = mid_lse = o  # never touched: DIRECT compiles the partial stores out
    else:
        mid_o = torch.empty((B * H, n_splits, d_pad), device=q.device, dtype=torch.float32)
        mid_lse = torch.empty((B * H, n_splits), device=q.device, dtype=torch.float32)
    _paged_decode_split_kernel[(B * H, n_splits)](
        q, k_pages, v_pages, table, seqlens, o, mid_o, mid_lse,
        q.stride(0), q.stride(1), q.stride(3),
        *k_pages.stride(), *v_pages.stride(), table.stride(0), table.stride(1),
        o.stride(0), o.stride(1), o.stride(3),
        H, num_blocks, t_max, n_splits, split_len, float(softmax_scale) * LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_SIZE=block_size, VEC=vec, DIRECT=direct,
        num_warps=num_warps, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(B * H,)](
            mid_o, mid_lse, o, o.stride(0), o.stride(1), o.stride(3), H, n_splits,
            HEAD_DIM=D, D_PAD=d_pad, BLOCK_S=_MERGE_BLOCK_S, num_warps=4, num_stages=1,
        )
    return o


# Prefill tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), picked from static shapes, not autotuned:
# the grid of a ragged batch changes with every step, and one heuristic keeps each launch predictable.
PREFILL_LONG = (128, 64, 8, 2)  # mean query length >= 128: the usual Hopper tile of a long prompt
PREFILL_MID = (64, 64, 8, 2)  # chunks of tens of tokens, and D=128 on sm_80 (4 warps spill there)
PREFILL_SHORT = (16, 64, 4, 2)  # batches of a few queries per sequence (decode rows, short chunks)
# 16-bit rows that cannot load as 128-bit vectors (odd D, views): every element carries its own address,
# and N32 (attention.py's unaligned tile) spills at D 128 under Triton 3.6; N16 does not, under 3.6 or 3.9
PREFILL_UNALIGNED = (64, 16, 8, 2)
PREFILL_FP32 = (32, 16, 8, 2)  # IEEE fp32 dots run on the FMA units: small tiles (as attention.py)
PREFILL_FP32_SHORT = (16, 16, 8, 2)  # 4 warps spill at D 128 (sm_80 on Triton 3.9, both archs on 3.6)


def prefill_config(dtype: torch.dtype, d_pad: int, vec: int, mean_q_len: float, arch_major: int) -> tuple:
    """The tile for a batch whose sequences bring mean_q_len queries each (total_q / B, host-known).

    A query block wider than most sequences' queries computes padding rows: short batches take
    BLOCK_M 16. 128-row tiles need an fp32 accumulator of 128 * D_PAD / (32 * 8) registers a thread:
    fine on Hopper (wgmma keeps it apart), spilling on Ampere past D_PAD 64."""
    if dtype == torch.float32:
        return PREFILL_FP32_SHORT if mean_q_len <= 16 else PREFILL_FP32
    if vec == 1:
        return PREFILL_UNALIGNED
    if mean_q_len <= 16:
        return PREFILL_SHORT
    if mean_q_len >= 128 and (arch_major >= 9 or d_pad <= 64):
        return PREFILL_LONG
    return PREFILL_MID


def _arch_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9


def paged_prefill_attention_fwd(q, k_pages, v_pages, block_table, cu_seqlens_q, cache_seqlens, *,
                                softmax_scale: float, config: tuple | None = None) -> torch.Tensor:
    """q (total_q, H, D) packed; k/v_pages (num_blocks, block_size, H, D); block_table int32 (B, max_blocks);
    cu_seqlens_q int32 (B + 1,); cache_seqlens int32 (B,) -> o (total_q, H, D). Any strides. Validated
    by kernels.paged_prefill_attention; config forces a tile (tests walk them all)."""
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise NotImplementedError("bf16 paged_prefill_attention needs a GPU: Triton's interpreter computes "
                                  "bf16 tl.dot wrongly (triton-lang/triton#11584); use fp16 or fp32 on CPU")
    total_q, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    num_blocks, block_size = k_pages.shape[:2]
    t_max = _capacity(k_pages, block_table)
    d_pad = head_dim_block(D)
    o = torch.empty((total_q, H, D), device=q.device, dtype=q.dtype)
    vec = _vec(q, o, k_pages, v_pages)
    if config is None:
        config = prefill_config(q.dtype, d_pad, vec, total_q / B, _arch_major(q.device))
    block_m, block_n, num_warps, num_stages = config
    # sum_b cdiv(q_len_b, M) <= cdiv(total_q, M) + B - 1: a static bound, the extra programs return
    n_programs = triton.cdiv(total_q, block_m) + B - 1
    if H > 65535:
        raise ValueError(f"H={H} heads; a grid allows 65535")
    table = _table(block_table)
    cu = cu_seqlens_q if cu_seqlens_q.is_contiguous() else cu_seqlens_q.contiguous()
    seqlens = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()
    _paged_prefill_kernel[(n_programs, H)](
        q, k_pages, v_pages, table, cu, seqlens, o,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), table.stride(0), table.stride(1), *o.stride(),
        B, num_blocks, t_max, float(softmax_scale) * LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size, BLOCK_B=_BLOCK_B,
        VEC=vec, num_warps=num_warps, num_stages=num_stages,
    )
    return o


def _kv_write_block_h(H: int, d_pad: int) -> int:
    return min(triton.next_power_of_2(H), max(1, _KV_WRITE_ELEMENTS // d_pad))


def paged_kv_write_fwd(k, v, k_pages, v_pages, slot_mapping) -> None:
    """k, v (N, H, D) any strides into slots slot_mapping (N,) int32/int64 of k/v_pages (num_blocks,
    block_size, H, D), in place. Validated by kernels.paged_kv_write.

    Why a kernel and not the indexed copy: the copy must drop the negative (padding) slots first, a
    boolean index whose size the host must read (a sync, which a CUDA graph cannot hold), then run two
    gathers and two scatters; this is one launch, padding rows cost one 8-byte load, and it reads k and
    v through their own strides. benchmarks/bench_paged_attention.py times it against index_copy_ on
    slots without padding (the copy's best case) so the choice stays measured.
    """
    N, H, D = k.shape
    if N == 0:
        return
    num_blocks, block_size = k_pages.shape[:2]
    d_pad = head_dim_block(D)
    block_h = _kv_write_block_h(H, d_pad)
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    if N > 2**31 - 1 or triton.cdiv(H, block_h) > 65535:
        raise ValueError(f"{N} tokens x {H} heads is past the launch grid")
    _paged_kv_write_kernel[(N, triton.cdiv(H, block_h))](
        k, v, k_pages, v_pages, slots,
        *k.stride(), *v.stride(), *k_pages.stride(), *v_pages.stride(),
        H, num_blocks * block_size,
        HEAD_DIM=D, D_PAD=d_pad, BLOCK_H=block_h, BLOCK_SIZE=block_size, VEC=_vec(k, v, k_pages, v_pages),
        num_warps=4, num_stages=1,
    )


# ---------------------------------------------------------------------------------------- compile specs
_STRIDES = {
    "decode": ("stride_qb", "stride_qh", "stride_qd", "stride_kb", "stride_kt", "stride_kh", "stride_kd",
               "stride_vb", "stride_vt", "stride_vh", "stride_vd", "stride_tb", "stride_tn",
               "stride_ob", "stride_oh", "stride_od"),
    "prefill": ("stride_qt", "stride_qh", "stride_qd", "stride_kb", "stride_kt", "stride_kh", "stride_kd",
                "stride_vb", "stride_vt", "stride_vh", "stride_vd", "stride_tb", "stride_tn",
                "stride_ot", "stride_oh", "stride_od"),
    "write": ("stride_kn", "stride_kh", "stride_kd", "stride_vn", "stride_vh", "stride_vd",
              "stride_pb", "stride_pt", "stride_ph", "stride_pd", "stride_wb", "stride_wt", "stride_wh",
              "stride_wd"),
}
# The JIT turns unit strides into constants; contiguous feature dims and table rows always have them.
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_tn", "stride_pd", "stride_wd")


def _signature(kind: str, pointers: dict, scalars: dict, constexprs: dict) -> tuple[dict, dict]:
    sig = dict(pointers)
    for n in _STRIDES[kind]:
        sig[n] = "i32"
    sig.update(scalars)
    consts = dict(constexprs)
    for n in _STRIDES[kind]:
        if n in _UNIT_STRIDES:
            sig[n] = "constexpr"
            consts[n] = 1
    sig.update({k: "constexpr" for k in constexprs})
    return sig, consts


def compile_specs() -> list[KernelSpec]:
    """Every launch config of the three kernels. Block size 16 (the engine's) everywhere, plus an odd
    one (7) per kernel: the table walk differs (a multiply-shift instead of a shift), nothing else."""
    specs = []

    def decode_spec(dt, D, vec, direct=False, block_size=16):
        d_pad = head_dim_block(D)
        block_n, warps = _block_config(d_pad, vec)
        mid = f"*{dt}" if direct else "*fp32"  # with one split the launcher passes o as the unused partials
        sig, consts = _signature(
            "decode",
            {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "BlockTable": "*i32", "SeqLens": "*i32", "O": f"*{dt}",
             "MidO": mid, "MidLse": mid},
            {"H": "i32", "num_blocks": "i32", "T_max": "i32", "num_splits": "i32", "split_len": "i32",
             "qk_scale": "fp32"},
            {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_N": block_n, "BLOCK_SIZE": block_size, "VEC": vec,
             "DIRECT": direct})
        mode = "direct" if direct else "split"
        return KernelSpec(name=f"paged_decode N{block_n} D{D} bs{block_size} {dt} vec{vec} {mode}",
                          fn=_paged_decode_split_kernel, signature=sig, constexprs=consts, num_warps=warps,
                          num_stages=2, expect_v4_loads=vec > 1)

    # decode: each D_PAD with vector loads, the scalar path at its smallest and largest D_PAD, fp32 with
    # one split (the direct store), bf16 with the odd block size
    specs += [decode_spec("fp16", d_pad, 8) for d_pad in (16, 32, 64, 128)]
    specs += [decode_spec("fp16", 5, 1), decode_spec("fp16", 97, 1), decode_spec("fp32", 128, 4, direct=True),
              decode_spec("bf16", 128, 8, block_size=7)]

    def prefill_spec(cfg, dt, D, vec, block_size=16, archs=(90, 80)):
        block_m, block_n, warps, stages = cfg
        sig, consts = _signature(
            "prefill",
            {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "BlockTable": "*i32", "CuSeqlensQ": "*i32",
             "SeqLens": "*i32", "O": f"*{dt}"},
            {"B": "i32", "num_blocks": "i32", "T_max": "i32", "qk_scale": "fp32"},
            {"HEAD_DIM": D, "D_PAD": head_dim_block(D), "BLOCK_M": block_m, "BLOCK_N": block_n,
             "BLOCK_SIZE": block_size, "BLOCK_B": _BLOCK_B, "VEC": vec})
        # wgmma needs 64 rows per warpgroup: the 16-row tiles use mma.sync (HMMA) on Hopper too,
        # which the prefill test checks itself
        hgmma = dt != "fp32" and block_m >= 64
        return KernelSpec(name=f"paged_prefill M{block_m} N{block_n} D{D} bs{block_size} {dt} vec{vec}",
                          fn=_paged_prefill_kernel, signature=sig, constexprs=consts, num_warps=warps,
                          num_stages=stages, expect_mma=hgmma, expect_v4_loads=vec > 1, archs=archs)

    hopper = (90,)  # prefill_config keeps the 128-row tile off sm_80 past D_PAD 64
    specs += [  # every tile at its heaviest head dim, both 16-bit dtypes and the odd block size between them
        prefill_spec(PREFILL_LONG, "fp16", 128, 8, archs=hopper), prefill_spec(PREFILL_LONG, "bf16", 64, 8, 7),
        prefill_spec(PREFILL_MID, "fp16", 128, 8), prefill_spec(PREFILL_SHORT, "bf16", 128, 8),
        prefill_spec(PREFILL_UNALIGNED, "fp16", 128, 1),
        prefill_spec(PREFILL_FP32, "fp32", 128, 4), prefill_spec(PREFILL_FP32_SHORT, "fp32", 128, 4),
    ]

    def write_spec(dt, H, D, vec, slot_dtype="i64", block_size=16):
        d_pad = head_dim_block(D)
        block_h = _kv_write_block_h(H, d_pad)
        sig, consts = _signature(
            "write",
            {"K": f"*{dt}", "V": f"*{dt}", "KPages": f"*{dt}", "VPages": f"*{dt}", "Slots": f"*{slot_dtype}"},
            {"H": "i32", "num_slots": "i32"},
            {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_H": block_h, "BLOCK_SIZE": block_size, "VEC": vec})
        return KernelSpec(name=f"paged_kv_write H{block_h} D{D} bs{block_size} {dt} vec{vec} {slot_dtype}",
                          fn=_paged_kv_write_kernel, signature=sig, constexprs=consts, num_warps=4,
                          num_stages=1, expect_v4_loads=vec > 1)

    specs += [write_spec("fp16", 12, 64, 8), write_spec("bf16", 25, 33, 1, slot_dtype="i32", block_size=7)]
    return specs
