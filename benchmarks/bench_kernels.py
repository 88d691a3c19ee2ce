"""The ``kernels`` suite of ``fastgpt bench``: each fused op against its peers, on this device.

On CUDA, each op's suite (benchmarks/bench_<op>.py, listed in KERNEL_OPS) times the Triton kernel against
its peers. On a CPU the Triton kernels do not run (only Triton's interpreter does, whose timings mean
nothing), so the public ops are timed on their CPU path, kernels.reference, at small shapes, against the
same peers, and labelled as such.
"""

from __future__ import annotations

import importlib
import os
import sys

# each op's suite benchmarks/bench_<op>.py (check() and run(), see benchmarks/common.py); a new op is a name here
KERNEL_OPS = ("attention", "decode_attention", "paged_attention", "layer_norm", "gelu_mlp", "cross_entropy")
CPU_LABEL = "CPU reference path (PyTorch), not Triton kernel results"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_suite(ctx) -> list[dict]:
    if ctx.device.type == "cuda":
        ctx.doc["kernel_label"] = f"Triton kernels on {ctx.doc.get('device_name', ctx.device)}"
        return run_kernel_suites(ctx.device, ctx.dtypes, ctx.quick, ctx.ceilings, ctx.notes, ctx.errors)
    ctx.doc["kernel_label"] = CPU_LABEL
    return cpu_reference_rows(ctx.dtypes, ctx.quick, ctx.smoke, ctx.ceilings, ctx.notes)


# ------------------------------------------------------------------------------------------------ CUDA
def run_kernel_suites(device, dtypes, quick: bool, ceilings: dict, notes: list[str], errors: list[str]) -> list[dict]:
    """Each op's suite run() on this device. A suite that is missing is a 'not available' note; one that
    fails is reported in errors and the others still run."""
    rows = []
    for op in KERNEL_OPS:
        module = f"benchmarks.bench_{op}"
        _log(f"kernels: {op}")
        try:
            suite = importlib.import_module(module)
        except ModuleNotFoundError as e:
            notes.append(f"{op}: not available (cannot import {e.name}; benchmarks/bench_{op}.py or its kernel "
                         "is not there)")
            _log(f"kernels: {op}: not available")
            continue
        try:
            got = suite.run(device, dtypes, quick, ceilings)
        except Exception as e:  # one broken suite must not hide the others' results
            msg = f"{op}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            errors.append(msg)
            _log(f"kernels: {msg}")
            continue
        rows += [{"kind": "kernel", "backend": "triton", **r} for r in got]
    return rows


# ------------------------------------------------------------------------------------------------- CPU
def cpu_reference_rows(dtypes, quick: bool, smoke: bool, ceilings: dict, notes: list[str]) -> list[dict]:
    """The public ops on their CPU path (kernels.reference, plain PyTorch) against the peers the GPU suites
    use. The ops and the peers are mostly the same PyTorch calls here, so speedups near 1x are expected:
    these numbers show what the CPU path of the model costs, nothing about the Triton kernels."""
    import torch
    import torch.nn.functional as F

    import kernels
    from benchmarks.common import bench_ms, timing_row

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 would send CPU ops through Triton's interpreter")
    timing = dict(rep_ms=1.0, min_reps=1) if smoke else dict(rep_ms=50.0 if quick else 200.0)
    g = torch.Generator().manual_seed(0)
    rows = []

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    def paged(dense, bs=16):
        """dense (B, H, T, D) -> the same positions as pages (B * nb, bs, H, D) and a table (B, nb)."""
        B, H, T, D = dense.shape
        nb = -(-T // bs)
        pages = F.pad(dense, (0, 0, 0, nb * bs - T)).transpose(1, 2).reshape(B * nb, bs, H, D).contiguous()
        return pages, torch.arange(B * nb, dtype=torch.int32).view(B, nb)

    def add(op, shape, dtype, ours, peers, work, unit):
        ours_ms = bench_ms(ours, **timing)
        for peer_name, peer in peers:
            peer_ms = bench_ms(peer, **timing)
            rows.append({"kind": "kernel", "backend": "cpu-reference",
                         **timing_row(op, shape, dtype, ours_ms, peer_name, peer_ms, work, unit, ceilings)})

    if smoke:
        attn_shapes, decode_shapes, write_shapes = [(1, 2, 33, 64)], [(1, 2, 64, 64, 37)], [(8, 2, 64)]
        ln_shapes, mlp_shapes = [(37, 768)], [(9, 64)]
    elif quick:
        attn_shapes = [(1, 12, 128, 64), (1, 12, 512, 64)]
        decode_shapes = [(1, 12, 1024, 64, 256), (8, 12, 1024, 64, 1000)]
        write_shapes = [(64, 12, 64), (1024, 12, 64)]
        ln_shapes = [(512, 768), (2048, 1600)]
        mlp_shapes = [(64, 768), (512, 768)]
    else:
        attn_shapes = [(1, 12, 128, 64), (1, 12, 512, 64), (4, 12, 1024, 64), (1, 25, 1024, 64)]
        decode_shapes = [(1, 12, 1024, 64, 256), (8, 12, 1024, 64, 1000), (1, 25, 1024, 64, 1024)]
        write_shapes = [(64, 12, 64), (1024, 12, 64), (4096, 25, 64)]
        ln_shapes = [(512, 768), (2048, 1600), (8192, 1600)]
        mlp_shapes = [(64, 768), (512, 768), (128, 1600)]
    compile_mlp = not (quick or smoke)
    if not compile_mlp:
        notes.append("gelu_mlp vs torch.compile skipped on CPU with --quick/--smoke (compiling takes longer "
                     "than the whole run)")

    with torch.inference_mode():
        for dtype in dtypes:
            elt = torch.empty((), dtype=dtype).element_size()
            for B, H, T, D in attn_shapes:
                _log(f"kernels (CPU reference): attention {B}x{H}x{T}x{D} {dtype}")
                q, k, v = (randn(B, H, T, D, dtype=dtype) for _ in range(3))
                flops = 4 * B * H * D * T * (T + 1) / 2  # QK^T and PV over the causal half (diagonal included)
                add("attention", f"B={B} H={H} T={T} D={D}", dtype,
                    lambda: kernels.flash_attention(q, k, v, causal=True),
                    [("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))],
                    flops, "TFLOP/s")
                (kp, table), (vp, _) = paged(k), paged(v)
                qp = q.transpose(1, 2).reshape(B * T, H, D)  # packed, sequence after sequence
                cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
                lens = torch.full((B,), T, dtype=torch.int32)
                add("paged_prefill_attention", f"B={B} H={H} T={T} D={D} bs16", dtype,
                    lambda: kernels.paged_prefill_attention(qp, kp, vp, table, cu, lens),
                    [("flash_attention (dense)", lambda: kernels.flash_attention(q, k, v, causal=True))],
                    flops, "TFLOP/s")
            for B, H, Tmax, D, L in decode_shapes:
                _log(f"kernels (CPU reference): decode_attention {B}x{H} len {L}/{Tmax} {dtype}")
                q = randn(B, H, 1, D, dtype=dtype)
                kc, vc = randn(B, H, Tmax, D, dtype=dtype), randn(B, H, Tmax, D, dtype=dtype)
                lens = torch.full((B,), L, dtype=torch.int32)
                nbytes = (2 * B * H * L * D + 2 * B * H * D) * elt  # valid K and V, plus q in and o out
                add("decode_attention", f"B={B} H={H} len={L} Tmax={Tmax} D={D}", dtype,
                    lambda: kernels.decode_attention(q, kc, vc, lens),
                    [("torch SDPA, sliced cache",
                      lambda: F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L]))],
                    nbytes, "GB/s")
                (kp, table), (vp, _) = paged(kc), paged(vc)
                add("paged_decode_attention", f"B={B} H={H} len={L} Tmax={Tmax} D={D} bs16", dtype,
                    lambda: kernels.paged_decode_attention(q, kp, vp, table, lens),
                    [("decode_attention (dense cache)", lambda: kernels.decode_attention(q, kc, vc, lens))],
                    nbytes, "GB/s")
            for N, H, D in write_shapes:
                _log(f"kernels (CPU reference): paged_kv_write {N}x{H}x{D} {dtype}")
                qkv = randn(N, 3, H, D, dtype=dtype)
                kp, vp = randn(4 * N, 16, H, D, dtype=dtype), randn(4 * N, 16, H, D, dtype=dtype)
                slots = torch.randperm(64 * N, generator=g)[:N]

                def indexed(qkv=qkv, kp=kp, vp=vp, slots=slots, H=H, D=D):
                    kp.view(-1, H, D).index_copy_(0, slots, qkv[:, 1])
                    vp.view(-1, H, D).index_copy_(0, slots, qkv[:, 2])

                add("paged_kv_write", f"N={N} H={H} D={D} fused-qkv views", dtype,
                    lambda: kernels.paged_kv_write(qkv[:, 1], qkv[:, 2], kp, vp, slots),
                    [("index_copy_ (no padding)", indexed)], 4 * N * H * D * elt, "GB/s")
            for M, N in ln_shapes:
                _log(f"kernels (CPU reference): layer_norm {M}x{N} {dtype}")
                x, r = randn(M, N, dtype=dtype), randn(M, N, dtype=dtype)
                w, b = randn(N, dtype=dtype), randn(N, dtype=dtype)
                add("layer_norm", f"M={M} N={N} +residual", dtype,
                    lambda: kernels.layer_norm(x, w, b, residual=r),
                    [("F.layer_norm + add", lambda: F.layer_norm(x + r, (N,), w, b))],
                    4 * M * N * elt, "GB/s")  # read x and residual, write y and the sum h
            for M, C in mlp_shapes:
                _log(f"kernels (CPU reference): gelu_mlp {M}x{C} {dtype}")
                x, r = randn(M, C, dtype=dtype), randn(M, C, dtype=dtype)
                w1, b1 = randn(4 * C, C, dtype=dtype) * C**-0.5, randn(4 * C, dtype=dtype)
                w2, b2 = randn(C, 4 * C, dtype=dtype) * (4 * C) ** -0.5, randn(C, dtype=dtype)

                def eager(x, w1, b1, w2, b2, r):
                    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + r

                peers = [("eager PyTorch", lambda: eager(x, w1, b1, w2, b2, r))]
                if compile_mlp:
                    try:
                        compiled = torch.compile(eager)
                        compiled(x, w1, b1, w2, b2, r)  # compile outside the timing
                        peers.append(("torch.compile", lambda: compiled(x, w1, b1, w2, b2, r)))
                    except Exception as e:
                        notes.append(f"gelu_mlp: torch.compile unavailable here ({type(e).__name__})")
                add("gelu_mlp", f"M={M} C={C} F={4 * C} +residual", dtype,
                    lambda: kernels.gelu_mlp(x, w1, b1, w2, b2, residual=r), peers,
                    16 * M * C * C, "TFLOP/s")  # two GEMMs of 2*M*C*4C FLOPs
    from benchmarks import bench_cross_entropy

    _log("kernels (CPU reference): cross_entropy")
    rows += bench_cross_entropy.cpu_rows(dtypes, quick, smoke, ceilings)  # forward + backward, needs autograd
    return rows
