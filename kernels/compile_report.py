"""Compile every kernel configuration for real GPUs (sm_90, sm_80) on a machine without one.

``triton.compile`` needs no GPU when given a ``GPUTarget``; ``cuobjdump`` (shipped inside Triton's
NVIDIA backend) then reads the cubin: registers, stack/local memory (spills) and the SASS, where a
Hopper tensor-core kernel shows ``HGMMA`` and an Ampere one ``HMMA``.

Each op module exposes ``compile_specs() -> list[KernelSpec]`` covering every config it can launch.
This module must run *without* ``TRITON_INTERPRET=1`` (interpreted functions cannot be compiled), so
tests call it in a subprocess::

    python -m kernels.compile_report [--ops attention,layer_norm] [--arch 90,80] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

OP_MODULES = ("attention", "decode_attention", "paged_attention", "layer_norm", "gelu_mlp", "cross_entropy")


@dataclasses.dataclass
class KernelSpec:
    """One compilable configuration of one ``@triton.jit`` kernel."""

    name: str  # human-readable: kernel + config, e.g. "flash_fwd M128 N64 D64 fp16 causal"
    fn: Any  # the @triton.jit function (a JITFunction; never the autotuner)
    signature: dict  # arg name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False  # a tl.dot kernel: demand HGMMA on sm_90 and HMMA on sm_80
    expect_v4_loads: bool = False  # demand 128-bit global loads (ld.global.v4 in PTX)
    archs: tuple = (90, 80)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compile one spec for sm_<arch>; return its resource report."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)

    def field(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else -1

    ptx = compiled.asm["ptx"]
    return {
        "name": spec.name,
        "arch": f"sm_{arch}",
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "regs": field("REG"),
        "stack": field("STACK"),
        "local": field("LOCAL"),
        "shared": int(compiled.metadata.shared),
        "hgmma": "HGMMA" in sass,
        "hmma": "HMMA" in sass,
        "spill_instr": bool(re.search(r"\b(LDL|STL)\b", sass)),
        "ldg128": bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)) or "LDG.E.128" in sass,
        "expect_mma": spec.expect_mma,
        "expect_v4_loads": spec.expect_v4_loads,
    }


def problems(row: dict) -> list[str]:
    """What is wrong with one report row (empty when it is healthy)."""
    out = []
    if row["stack"] != 0 or row["local"] != 0 or row["spill_instr"]:
        out.append(f"spills (STACK {row['stack']}, LOCAL {row['local']})")
    if row["expect_mma"] and row["arch"] == "sm_90" and not row["hgmma"]:
        out.append("no HGMMA in sm_90 SASS")
    if row["expect_mma"] and row["arch"] == "sm_80" and not row["hmma"]:
        out.append("no HMMA in sm_80 SASS")
    if row["expect_v4_loads"] and not row["ldg128"]:
        out.append("no 128-bit global loads")
    return out


def collect_specs(ops=OP_MODULES) -> list[KernelSpec]:
    import importlib

    specs = []
    for op in ops:
        specs.extend(importlib.import_module(f"kernels.{op}").compile_specs())
    return specs


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel config':<58} {'arch':>6} {'warps':>5} {'stg':>3} {'regs':>4} {'smem KB':>7} {'spill':>5} {'mma':>5} {'v4':>3}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mma = "HGMMA" if r["hgmma"] else ("HMMA" if r["hmma"] else "-")
        spill = "yes" if (r["stack"] or r["local"] or r["spill_instr"]) else "no"
        lines.append(
            f"{r['name']:<58} {r['arch']:>6} {r['num_warps']:>5} {r['num_stages']:>3} {r['regs']:>4} "
            f"{r['shared'] / 1024:>7.1f} {spill:>5} {mma:>5} {'yes' if r['ldg128'] else '-':>3}"
        )
    return "\n".join(lines)


def run_report(ops=OP_MODULES, archs=(90, 80)) -> list[dict]:
    rows = []
    for spec in collect_specs(ops):
        for arch in archs:
            if arch in spec.archs:
                rows.append(compile_spec(spec, arch))
    return rows


def run_in_subprocess(ops, archs=(90, 80), timeout: float = 900) -> list[dict]:
    """Run the report in a fresh interpreter without TRITON_INTERPRET (for tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "report.json")
        cmd = [sys.executable, "-m", "kernels.compile_report", "--ops", ",".join(ops),
               "--arch", ",".join(str(a) for a in archs), "--json", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"compile report failed:\n{proc.stdout}\n{proc.stderr}")
        print(proc.stdout)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OP_MODULES))
    p.add_argument("--arch", default="90,80")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_report: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    ops = [o for o in a.ops.split(",") if o]
    rows = run_report(ops, tuple(int(x) for x in a.arch.split(",")))
    print(format_table(rows))
    bad = [(r["name"], r["arch"], pr) for r in rows if (pr := problems(r))]
    for name, arch, pr in bad:
        print(f"PROBLEM {name} {arch}: {'; '.join(pr)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
