"""The compile report itself: that it reads what triton.compile(..., GPUTarget) produced, and flags what
is wrong. Each op's test file runs the report over that op's configs."""

import json
import os
import subprocess
import sys
import textwrap

from kernels.compile_report import problems

_HEALTHY = {"name": "k", "arch": "sm_90", "num_warps": 4, "num_stages": 3, "regs": 128, "stack": 0, "local": 0,
            "shared": 1024, "hgmma": True, "hmma": False, "spill_instr": False, "ldg128": True,
            "expect_mma": True, "expect_v4_loads": True}


def test_problems_flags_spills_missing_tensor_cores_and_narrow_loads():
    assert problems(_HEALTHY) == []
    assert "spills" in problems({**_HEALTHY, "stack": 16})[0]
    assert "spills" in problems({**_HEALTHY, "spill_instr": True})[0]
    assert problems({**_HEALTHY, "hgmma": False}) == ["no HGMMA in sm_90 SASS"]
    assert problems({**_HEALTHY, "arch": "sm_80", "hgmma": False, "hmma": False}) == ["no HMMA in sm_80 SASS"]
    assert problems({**_HEALTHY, "ldg128": False}) == ["no 128-bit global loads"]
    assert problems({**_HEALTHY, "expect_mma": False, "hgmma": False, "expect_v4_loads": False, "ldg128": False}) == []


_SCRIPT = textwrap.dedent('''
    import json, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from kernels.compile_report import KernelSpec, compile_spec

    @triton.jit
    def tile_matmul(A, B, C, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.arange(0, BM).to(tl.int64)
        cols = tl.arange(0, BN)
        ks = tl.arange(0, K)
        a = tl.load(A + rows[:, None] * K + ks[None, :])
        b = tl.load(B + ks[:, None] * BN + cols[None, :])
        tl.store(C + rows[:, None] * BN + cols[None, :], tl.dot(a, b).to(tl.float16))

    sig = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "K": "constexpr", "BM": "constexpr", "BN": "constexpr"}
    consts = {"K": 64, "BM": 128, "BN": 64}
    direct = triton.compile(triton.compiler.ASTSource(fn=tile_matmul, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    spec = KernelSpec("tile_matmul", tile_matmul, sig, consts, num_warps=4, num_stages=3, expect_mma=True)
    print(json.dumps({"direct_shared": direct.metadata.shared, "rows": [compile_spec(spec, a) for a in (90, 80)]}))
''')


def test_report_reads_a_real_sm90_and_sm80_compile(tmp_path):
    script = tmp_path / "compile_tile_matmul.py"  # @triton.jit needs its source in a file
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sm90, sm80 = out["rows"]
    assert sm90["shared"] == out["direct_shared"] > 0
    assert sm90["hgmma"] and not sm90["hmma"]  # Hopper's wgmma
    assert sm80["hmma"] and not sm80["hgmma"]  # Ampere's mma.sync
    for row in (sm90, sm80):
        assert 0 < row["regs"] <= 255 and problems(row) == []
