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
CPU_DECODE_COLUMNS = [("model", "model", ""), ("dtype", "dtype", ""), ("threads", "threads", "d"),
                      ("pairs", "pairs", "d"), ("load avg", "load_avg_before", ".1f"), ("same tokens", "same_tokens", ""),
                      ("tok/s", "ours_tok_s", ".1f"), ("peer tok/s", "peer_tok_s", ".1f"), ("speedup", "speedup", "x"),
                      ("ms/step", "ours_step_ms", ".2f"), ("peer ms/step", "peer_step_ms", ".2f"),
                      ("decode speedup", "decode_speedup", "x"), ("floor ms", "floor_ms", ".2f"),
                      ("% of floor", "pct_floor", "%"), ("read floor ms", "read_floor_ms", ".2f"),
                      ("% of read floor", "pct_read_floor", "%")]
PATCH_COLUMNS = [("model", "model", ""), ("phase", "phase", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                 ("path", "backend", ""), ("patched ms", "patched_ms", ".3f"), ("HF ms", "hf_ms", ".3f"),
                 ("speedup", "speedup", "x"), ("goal", "goal", "x"), ("patched tok/s", "patched_tok_s", ".0f"),
                 ("HF tok/s", "hf_tok_s", ".0f")]
COMPILED_COLUMNS = [("model", "model", ""), ("phase", "phase", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                    ("eager ms", "eager_ms", ".3f"), ("compiled ms", "compiled_ms", ".3f"), ("speedup", "speedup", "x"),
                    ("compiled tok/s", "compiled_tok_s", ".0f"), ("compile s", "compile_s", ".1f")]
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


SERVE_COLUMNS = [("peer", "peer", ""), ("rate", "rate_label", ""), ("conc", "concurrency", "d"), ("ok", "completed", "d"),
                 ("failed", "failed", "d"), ("req/s", "request_throughput", ".2f"), ("out tok/s", "output_throughput", ".1f"),
                 ("TTFT p50", "median_ttft_ms", ".1f"), ("TTFT p99", "p99_ttft_ms", ".1f"),
                 ("TPOT p50", "median_tpot_ms", ".2f"), ("TPOT p99", "p99_tpot_ms", ".2f"),
                 ("ITL p50", "median_itl_ms", ".2f"), ("ITL p99", "p99_itl_ms", ".2f"), ("CPU s", "own_cpu_s", ".1f")]
PARITY_COLUMNS = [("model", "model", ""), ("device", "device", ""), ("dtype", "dtype", ""), ("against", "against", ""),
                  ("max rel err", "max_err", ".2e"), ("tol", "tol", ".1e"), ("argmax agree", "argmax_agree", ".3f"),
                  ("ok", "ok", "")]


def generic_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Every field but "kind", in first-seen order; floats to 4 significant digits."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "kind")
    return [(k, k, ".4g" if any(isinstance(r.get(k), float) for r in rows) else "") for k in keys]


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


# (kind, title, columns, rows -> rows to show or None), in the order the report shows them; a kind not
# listed is shown with every field (generic_columns)
SECTIONS = [
    ("check", "Correctness: every kernel against its reference", CHECK_COLUMNS, None),
    ("parity", "Model-level parity", PARITY_COLUMNS, None),
    ("kernel", "Kernels: ", KERNEL_COLUMNS, None),
    ("memory", "Peak memory", MEMORY_COLUMNS, None),
    ("generate", "Generation: tokens/s against transformers on the same weights; decode against the "
     "weight-streaming floor", GENERATE_COLUMNS, None),
    ("patch", "transformers GPT-2 patched by fastgpt vs unpatched (SDPA), same weights", PATCH_COLUMNS, None),
    ("serve", "Serving: fastgpt serve under load against its peers (times in ms)", SERVE_COLUMNS, None),
    ("compiled", "torch.compile(fullgraph=True) against eager, the same model and inputs", COMPILED_COLUMNS, None),
    ("decode_position", "Decode cost per token by context length (should stay flat)", POSITION_COLUMNS,
     with_position_ratio),
    ("cpu_decode", "CPU batch-1 decode: fastgpt against transformers (medians of interleaved pairs) and the "
     "weight-streaming floors", CPU_DECODE_COLUMNS, None),
    ("tp_decode", "Tensor-parallel decode: one step, and its collectives timed alone", TP_DECODE_COLUMNS, None),
    ("tp_engine", "Tensor-parallel engine: greedy requests through Engine.generate, eager", TP_ENGINE_COLUMNS, None),
    ("dp_train", "Data-parallel training: tokens/s over all ranks", DP_TRAIN_COLUMNS, None),
    ("engine", "Engine: continuous batching (benchmarks/bench_engine.py)", ENGINE_COLUMNS, None),
    ("train", "Training step (forward + backward + AdamW): tokens/s and peak memory, same data", TRAIN_COLUMNS,
     None),
    ("goal", "Training goals", GOAL_COLUMNS, None),
]
KNOWN_KINDS = tuple(kind for kind, *_ in SECTIONS)


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
    for kind, title, columns, prepare in SECTIONS:
        section = rows_of(rows, kind)
        if kind == "kernel" and doc.get("kernel_label"):  # the label says which backend, even with no rows
            title += doc["kernel_label"]
        elif not section:
            continue
        out.append(h(title))
        if section:
            out.append(format_table(prepare(section) if prepare else section, columns, markdown))
    for kind in dict.fromkeys(r.get("kind") for r in rows):
        if kind not in KNOWN_KINDS:  # a new suite's rows: every field, until it earns columns of its own
            out.append(h(str(kind)))
            out.append(format_table(rows_of(rows, kind), generic_columns(rows_of(rows, kind)), markdown))
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


def _stamp(doc: dict, rows: list[dict]) -> str:
    """What every plot states: the machine, the date, the dtypes of what it shows."""
    dtypes = ", ".join(dict.fromkeys(str(r["dtype"]) for r in rows if r.get("dtype"))) or "-"
    return f"{doc.get('device_name', '?')} | {str(doc.get('date', '?'))[:10]} | {dtypes}"


def draw_series(ax, series: dict, xlabel: str, ylabel: str, title: str, ref: float | None = None) -> str:
    """series: label -> [(x, y), ...]. Lines against x (log) when some series has several points; when each
    has one, a bar per series with its value written on it (a lone dot per series shows no trend and hides
    the number). Returns "lines", "bars" or "empty"."""
    series = {k: sorted(v) for k, v in series.items() if v}
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="--")
    if not series:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        return "empty"
    if all(len(v) == 1 for v in series.values()):
        labels = [f"{k}\n{xlabel} {v[0][0]:g}" for k, v in series.items()]
        values = [v[0][1] for v in series.values()]
        bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=20 if len(values) > 3 else 0)
        ax.set_ylabel(ylabel)
        return "bars"
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=label)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    return "lines"


def plot(doc: dict, out_dir: str) -> list[str]:
    """One PNG per kernel op (speedup over each peer, and % of the ceiling, against problem size), one for
    generation (decode speedup over each peer, and % of the weight-streaming floor, against batch), one for
    the engine (output tokens/s of each system against concurrency) and one for the CPU batch-1 decode (ms
    per step of each engine beside the floors). Each states the machine, the date and the dtypes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = doc.get("rows", [])
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name, title, fig_rows):
        fig.suptitle(f"{title}\n{_stamp(doc, fig_rows)}", fontsize=10)
        path = os.path.join(out_dir, name)
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    kern = rows_of(rows, "kernel")
    for op in dict.fromkeys(r["op"] for r in kern):
        op_rows = sorted((r for r in kern if r["op"] == op), key=_work)
        unit = op_rows[0]["unit"]
        size = "FLOPs/call" if unit == "TFLOP/s" else "bytes/call"
        speed, ceiling = {}, {}
        for r in op_rows:
            if r["speedup"]:
                speed.setdefault(f"{r['dtype']} vs {r['peer']}", []).append((_work(r), r["speedup"]))
            if r["pct_ceiling"] is not None:
                ceiling.setdefault(r["dtype"], {})[r["shape"]] = (_work(r), r["pct_ceiling"])
        fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
        draw_series(ax_s, speed, size, "speedup (peer ms / ours ms)", f"{op}: speedup", ref=1.0)
        draw_series(ax_c, {k: list(v.values()) for k, v in ceiling.items()}, size,
                    f"% of measured ceiling ({unit})", f"{op}: % of ceiling")
        if not ceiling:
            ax_c.texts[-1].set_text(f"no {unit} ceiling measured on this device")
        save(fig, f"{slug(op)}.png", op, op_rows)

    gen = rows_of(rows, "generate")
    if gen:
        speed, floor = {}, {}
        for r in gen:
            if r.get("decode_speedup"):
                speed.setdefault(f"{r['model']} vs {r['peer']}", []).append((r["batch"], r["decode_speedup"]))
            if r.get("pct_floor") is not None:
                floor.setdefault(r["model"], {})[r["batch"]] = (r["batch"], r["pct_floor"])
        fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
        draw_series(ax_s, speed, "batch", "decode speedup (peer ms / ours ms)", "decode: speedup over transformers",
                    ref=1.0)
        draw_series(ax_f, {k: list(v.values()) for k, v in floor.items()}, "batch",
                    "% of floor (floor ms / ms per step)", "decode: % of the weight-streaming floor", ref=100.0)
        save(fig, "generate.png", "generate", gen)

    engine = rows_of(rows, "engine")
    if engine:
        series = {}
        for r in engine:
            series.setdefault(r["system"], []).append((r["concurrency"], r["output_tok_s"]))
        fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
        draw_series(ax, series, "concurrency", "output tokens/s", "engine: output tokens/s by concurrency")
        save(fig, "engine.png", f"engine ({engine[0]['model']}, {engine[0]['requests']} requests)", engine)

    cpu = rows_of(rows, "cpu_decode")
    if cpu:
        fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
        bars = {"fastgpt": "ours_step_ms", "transformers": "peer_step_ms",
                "floor (copy bandwidth)": "floor_ms", "floor (read bandwidth)": "read_floor_ms"}
        width = 0.8 / len(cpu)
        for i, r in enumerate(cpu):
            values = [r.get(k) or 0.0 for k in bars.values()]
            b = ax.bar([j + i * width for j in range(len(bars))], values, width,
                       label=f"{r['model']}, {r['threads']} threads, load {r['load_avg_before']:.1f}")
            ax.bar_label(b, fmt="%.1f", fontsize=8)
        ax.set_xticks([j + (len(cpu) - 1) * width / 2 for j in range(len(bars))], list(bars), fontsize=8)
        ax.set(ylabel="ms per decode step (lower is better)", title="batch-1 decode step and its floors")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        save(fig, "cpu-decode.png", "CPU decode", cpu)
    return written
