"""Presenting benchmark results: the run's environment, text/markdown tables, JSON, and PNG plots.

Nothing here measures anything; it only formats the rows the suites return (see benchmarks/common.py for
the kernel row fields, benchmarks/bench_generate.py for the generation rows). Every file is written
atomically (fastgpt.load.atomic_write), so an interrupted run never leaves half a report behind.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys

import torch

from fastgpt.load import atomic_write, atomic_write_text

SCHEMA = "fastgpt-bench/1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ environment
def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU's marketing name, where Linux tells it
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine() or "cpu") + f" ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (for folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git_commit() -> str | None:
    """HEAD of the checkout this file lives in; None outside a git checkout (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def environment(device) -> dict:
    """The documented top-level fields of a results document, minus ceilings and rows."""
    device = torch.device(device)
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        # the version from the package metadata: importing triton here would be too early for callers
        # that still have to set TRITON_INTERPRET
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }


# --------------------------------------------------------------------------------------------- tables
def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "x":
        return f"{value:.2f}x"
    if spec == "%":
        return f"{value:.1f}%"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]], markdown: bool = False) -> str:
    """columns: (header, row key, format spec: '' str, '.3f', 'x' speedup, '%' percent)."""
    cells = [[_fmt(r.get(key), spec) for _, key, spec in columns] for r in rows]
    headers = [h for h, _, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    # text columns left-aligned, numbers right-aligned
    left = [spec == "" for _, _, spec in columns]

    def line(values):
        return "  ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(values, widths, left)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in cells])


KERNEL_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("ours ms", "ours_ms", ".4f"),
                  ("peer", "peer", ""), ("peer ms", "peer_ms", ".4f"), ("speedup", "speedup", "x"),
                  ("achieved", "achieved", ".2f"), ("unit", "unit", ""), ("% ceiling", "pct_ceiling", "%")]
GENERATE_COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("prompt", "prompt_len", "d"),
                    ("dtype", "dtype", ""), ("peer", "peer", ""),
                    ("prefill tok/s", "ours_prefill_tok_s", ".0f"), ("peer prefill tok/s", "peer_prefill_tok_s", ".0f"),
                    ("prefill speedup", "prefill_speedup", "x"),
                    ("decode tok/s", "ours_decode_tok_s", ".1f"), ("peer decode tok/s", "peer_decode_tok_s", ".1f"),
                    ("decode speedup", "decode_speedup", "x"),
                    ("ms/token", "ours_decode_ms", ".3f"), ("floor ms", "floor_ms", ".3f"),
                    ("% of floor", "pct_floor", "%")]
POSITION_COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("dtype", "dtype", ""),
                    ("context", "context", "d"), ("decode ms/token", "decode_ms", ".3f"),
                    ("floor ms", "floor_ms", ".3f"), ("vs shortest context", "vs_first", "x")]
PATCH_COLUMNS = [("model", "model", ""), ("phase", "phase", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                 ("path", "backend", ""), ("patched ms", "patched_ms", ".3f"), ("HF ms", "hf_ms", ".3f"),
                 ("speedup", "speedup", "x"), ("goal", "goal", "x"), ("patched tok/s", "patched_tok_s", ".0f"),
                 ("HF tok/s", "hf_tok_s", ".0f")]
TP_DECODE_COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("context", "context", "d"),
                     ("dtype", "dtype", ""), ("TP", "tp", "d"), ("decode ms/step", "decode_ms", ".3f"),
                     ("tok/s", "tok_s", ".1f"), ("vs TP=1", "vs_one", "x"),
                     ("collectives ms/step", "comm_ms", ".3f"), ("% of step", "comm_pct", "%")]
TP_ENGINE_COLUMNS = [("model", "model", ""), ("requests", "requests", "d"), ("prompt", "prompt_len", "d"),
                     ("new tokens", "max_tokens", "d"), ("dtype", "dtype", ""), ("TP", "tp", "d"),
                     ("generate ms", "generate_ms", ".1f"), ("output tok/s", "tok_s", ".1f"),
                     ("vs TP=1", "vs_one", "x"), ("same tokens as TP=1", "same_tokens", "")]
DP_TRAIN_COLUMNS = [("model", "model", ""), ("mode", "mode", ""), ("ranks", "ranks", "d"),
                    ("batch/rank", "batch_per_rank", "d"), ("block", "block", "d"), ("ms/step", "step_ms", ".1f"),
                    ("tok/s", "tok_s", ".0f"), ("vs 1 process", "vs_one", "x")]
ENGINE_COLUMNS = [("model", "model", ""), ("dtype", "dtype", ""), ("system", "system", ""),
                  ("concurrency", "concurrency", "d"), ("requests", "requests", "d"),
                  ("output tok/s", "output_tok_s", ".0f"), ("goal tok/s", "goal_tok_s", ".0f"),
                  ("step us", "step_us", ".1f"), ("goal us", "goal_us", ".0f")]
TRAIN_COLUMNS = [("model", "model", ""), ("batch", "batch", "d"), ("seq", "seq", "d"), ("dtype", "dtype", ""),
                 ("path", "path", ""), ("step ms", "step_ms", ".2f"), ("tokens/s", "tokens_per_s", ".0f"),
                 ("peak GB", "peak_gb", ".2f"), ("vs reference", "vs_reference", "x"),
                 ("vs transformers", "vs_transformers", "x"), ("memory vs reference", "mem_vs_reference", "x")]
MEMORY_COLUMNS = [("op", "op", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("ours MB", "ours_mb", ".0f"),
                  ("peer", "peer", ""), ("peer MB", "peer_mb", ".0f"), ("ours / peer", "ratio", ".3f"),
                  ("measured as", "method", "")]
GOAL_COLUMNS = [("goal", "goal", ""), ("measured", "measured", ".2f"), ("target", "target", ".2f"), ("ok", "ok", "")]
CHECK_COLUMNS = [("op", "op", ""), ("case", "case", ""), ("dtype", "dtype", ""), ("max err", "max_err", ".2e"),
                 ("tol", "tol", ".1e"), ("ok", "ok", "")]


def rows_of(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


def with_position_ratio(rows: list[dict]) -> list[dict]:
    """Adds vs_first: each context's ms/token over the shortest context's (flat decode cost reads ~1.00x)."""
    out, first = [], {}
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], r["dtype"], r["context"])):
        key = (r["model"], r["batch"], r["dtype"])
        first.setdefault(key, r["decode_ms"])
        out.append({**r, "vs_first": r["decode_ms"] / first[key] if first[key] else None})
    return out


def render(doc: dict, markdown: bool = False) -> str:
    """The whole results document as text (stdout) or markdown (results.md)."""
    rows = doc.get("rows", [])
    h = (lambda s: f"\n## {s}\n") if markdown else (lambda s: f"\n== {s} ==")
    out = []
    if markdown:
        out.append(f"# fastgpt benchmark: {doc['device_name']}\n")
    out.append(f"{doc['device_name']} ({doc['device']}); torch {doc['torch']}, triton {doc['triton']}, "
               f"transformers {doc.get('transformers')}; {doc['date']}; commit {doc.get('git_commit')}")
    ceil = doc.get("ceilings") or {}
    out.append("ceilings measured in this run: " + (", ".join(
        f"{k} = {v:.1f}" for k, v in ceil.items()) or "none"))
    checks = rows_of(rows, "check")
    if checks:
        out.append(h("Correctness: every kernel against its reference"))
        out.append(format_table(checks, CHECK_COLUMNS, markdown))
    parity = rows_of(rows, "parity")
    if parity:
        out.append(h("Model-level parity"))
        out.append(format_table(parity, [("model", "model", ""), ("device", "device", ""), ("dtype", "dtype", ""),
                                         ("against", "against", ""), ("max rel err", "max_err", ".2e"),
                                         ("tol", "tol", ".1e"), ("argmax agree", "argmax_agree", ".3f"),
                                         ("ok", "ok", "")], markdown))
    kern = rows_of(rows, "kernel")
    if kern or doc.get("kernel_label"):
        out.append(h("Kernels: " + doc.get("kernel_label", "")))
        if kern:
            out.append(format_table(kern, KERNEL_COLUMNS, markdown))
    memory = rows_of(rows, "memory")
    if memory:
        out.append(h("Peak memory"))
        out.append(format_table(memory, MEMORY_COLUMNS, markdown))
    gen = rows_of(rows, "generate")
    if gen:
        out.append(h("Generation: tokens/s against transformers on the same weights; decode against the "
                     "weight-streaming floor"))
        out.append(format_table(gen, GENERATE_COLUMNS, markdown))
    patch = rows_of(rows, "patch")
    if patch:
        out.append(h("transformers GPT-2 patched by fastgpt vs unpatched (SDPA), same weights"))
        out.append(format_table(patch, PATCH_COLUMNS, markdown))
    pos = rows_of(rows, "decode_position")
    if pos:
        out.append(h("Decode cost per token by context length (should stay flat)"))
        out.append(format_table(with_position_ratio(pos), POSITION_COLUMNS, markdown))
    tp = rows_of(rows, "tp_decode")
    if tp:
        out.append(h("Tensor-parallel decode: one step, and its collectives timed alone"))
        out.append(format_table(tp, TP_DECODE_COLUMNS, markdown))
    tp_engine = rows_of(rows, "tp_engine")
    if tp_engine:
        out.append(h("Tensor-parallel engine: greedy requests through Engine.generate, eager"))
        out.append(format_table(tp_engine, TP_ENGINE_COLUMNS, markdown))
    dp = rows_of(rows, "dp_train")
    if dp:
        out.append(h("Data-parallel training: tokens/s over all ranks"))
        out.append(format_table(dp, DP_TRAIN_COLUMNS, markdown))
    engine = rows_of(rows, "engine")
    if engine:
        out.append(h("Engine: continuous batching (benchmarks/bench_engine.py)"))
        out.append(format_table(engine, ENGINE_COLUMNS, markdown))
    train = rows_of(rows, "train")
    if train:
        out.append(h("Training step (forward + backward + AdamW): tokens/s and peak memory, same data"))
        out.append(format_table(train, TRAIN_COLUMNS, markdown))
    goal = rows_of(rows, "goal")
    if goal:
        out.append(h("Training goals"))
        out.append(format_table(goal, GOAL_COLUMNS, markdown))
    notes = doc.get("notes", [])
    if notes:
        out.append(h("Notes"))
        out += [("- " if markdown else "* ") + n for n in notes]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- files
def write_json(path: str, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def write_markdown(path: str, doc: dict) -> None:
    atomic_write_text(path, render(doc, markdown=True))


def _work(row: dict) -> float:
    """FLOPs or bytes of one call, recovered from achieved rate x time (the x axis of a plot: size)."""
    scale = 1e12 if row["unit"] == "TFLOP/s" else 1e9
    return row["achieved"] * scale * row["ours_ms"] * 1e-3


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot(rows: list[dict], out_dir: str, title_suffix: str = "") -> list[str]:
    """One PNG per kernel op (speedup over each peer, and % of the ceiling, against problem size), and one
    for generation (decode speedup over each peer, and % of the weight-streaming floor, against batch)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    kern = rows_of(rows, "kernel")
    for op in dict.fromkeys(r["op"] for r in kern):
        op_rows = sorted((r for r in kern if r["op"] == op), key=_work)
        fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(12, 4.2))
        for dtype in dict.fromkeys(r["dtype"] for r in op_rows):
            for peer in dict.fromkeys(r["peer"] for r in op_rows if r["dtype"] == dtype):
                series = [r for r in op_rows if r["dtype"] == dtype and r["peer"] == peer and r["speedup"]]
                if series:
                    ax_s.plot([_work(r) for r in series], [r["speedup"] for r in series], "o-",
                              label=f"{dtype} vs {peer}")
            series = list({r["shape"]: r for r in op_rows if r["dtype"] == dtype
                           and r["pct_ceiling"] is not None}.values())
            if series:
                ax_c.plot([_work(r) for r in series], [r["pct_ceiling"] for r in series], "o-", label=dtype)
        unit = op_rows[0]["unit"]
        size = "FLOPs per call" if unit == "TFLOP/s" else "bytes moved per call"
        ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax_s.set(xscale="log", xlabel=size, ylabel="speedup (peer ms / ours ms)", title=f"{op}: speedup")
        ax_c.set(xscale="log", xlabel=size, ylabel=f"% of measured ceiling ({unit})", title=f"{op}: % of ceiling")
        if not ax_c.lines:
            ax_c.text(0.5, 0.5, f"no {unit} ceiling measured on this device", ha="center", va="center",
                      transform=ax_c.transAxes)
        for ax in (ax_s, ax_c):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{op}{title_suffix}")
        path = os.path.join(out_dir, f"{slug(op)}.png")
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    gen = rows_of(rows, "generate")
    if gen:
        fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(12, 4.2))
        for model in dict.fromkeys(r["model"] for r in gen):
            for peer in dict.fromkeys(r["peer"] for r in gen if r["model"] == model):
                series = sorted((r for r in gen if r["model"] == model and r["peer"] == peer
                                 and r.get("decode_speedup")), key=lambda r: r["batch"])
                if series:
                    ax_s.plot([r["batch"] for r in series], [r["decode_speedup"] for r in series], "o-",
                              label=f"{model} vs {peer}")
            series = sorted({r["batch"]: r for r in gen if r["model"] == model}.values(), key=lambda r: r["batch"])
            ax_f.plot([r["batch"] for r in series], [r["pct_floor"] for r in series], "o-", label=model)
        ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax_s.set(xscale="log", xlabel="batch", ylabel="decode speedup (peer ms / ours ms)",
                 title="decode: speedup over transformers")
        ax_f.set(xscale="log", xlabel="batch", ylabel="% of weight-streaming floor (floor ms / ms per step)",
                 title="decode: % of the weight-streaming floor")
        for ax in (ax_s, ax_f):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"generate{title_suffix}")
        path = os.path.join(out_dir, "generate.png")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
