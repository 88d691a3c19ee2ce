"""The benchmark suite's plumbing on CPU: what `fastgpt bench` and benchmarks/gpu_check.py produce and how
they report failures. Speeds are not tested (they belong to the benchmarks themselves); every run here
uses --smoke, the tiniest sizes."""

import datetime
import json
import os
import re
import sys
import types

import pytest
import torch

from benchmarks import bench_generate, bench_kernels, report
from benchmarks import cli as bench_cli
from benchmarks.common import timing_row
from fastgpt.cli import main
from fastgpt.config import GPTConfig
from fastgpt.model import GPT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAGED_OPS = {"paged_decode_attention", "paged_prefill_attention", "paged_kv_write"}
TIMING_FIELDS = {"op", "shape", "dtype", "ours_ms", "peer", "peer_ms", "speedup", "achieved", "unit", "pct_ceiling"}


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"


def _assert_environment_fields(doc):
    assert isinstance(doc["device_name"], str) and doc["device_name"]
    assert doc["torch"] == torch.__version__
    assert re.fullmatch(r"\d+\.\d+.*", doc["triton"])
    datetime.datetime.fromisoformat(doc["date"])  # raises if not a date
    assert doc["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", doc["git_commit"])
    assert doc["ceilings"]["copy_gbs"] > 0


def test_bench_smoke_run_writes_json_and_plots(tmp_path, capsys):
    json_path, plot_dir = tmp_path / "results.json", tmp_path / "plots"
    interpret_before = os.environ.get("TRITON_INTERPRET")
    rc = main(["bench", "all", "--smoke", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert os.environ.get("TRITON_INTERPRET") == interpret_before  # restored for the rest of the session

    assert "CPU reference path (PyTorch), not Triton kernel results" in out
    assert "decode tok/s" in out and "context" in out
    assert "[bench]" in err and "[bench generate]" in err  # progress on stderr, not mixed into the table

    doc = json.loads(json_path.read_text())
    _assert_environment_fields(doc)
    assert "matmul_tflops" not in doc["ceilings"]  # CPU: copy bandwidth only
    kernel_rows = [r for r in doc["rows"] if r["kind"] == "kernel"]
    # one row op per public op: the paged_attention suite times three
    assert {r["op"] for r in kernel_rows} == set(bench_kernels.KERNEL_OPS) - {"paged_attention"} | PAGED_OPS
    for r in kernel_rows:
        assert TIMING_FIELDS <= set(r)
        assert r["backend"] == "cpu-reference"
        assert r["ours_ms"] > 0 and r["peer_ms"] > 0 and r["achieved"] > 0
        assert r["speedup"] == pytest.approx(r["peer_ms"] / r["ours_ms"])
        assert (r["pct_ceiling"] is None) == (r["unit"] == "TFLOP/s")  # no matmul ceiling on a CPU
    gen = [r for r in doc["rows"] if r["kind"] == "generate"]
    assert gen and all(r["model"] == "tiny" and r["batch"] == 1 for r in gen)
    for r in gen:
        assert r["ours_prefill_tok_s"] == pytest.approx(r["batch"] * r["prompt_len"] / (r["ours_prefill_ms"] * 1e-3))
        assert r["floor_ms"] > 0
    positions = [r for r in doc["rows"] if r["kind"] == "decode_position"]
    assert sorted(r["context"] for r in positions) == [16, 256]
    assert all(r["decode_ms"] > 0 for r in positions)
    (cpu,) = [r for r in doc["rows"] if r["kind"] == "cpu_decode"]  # the CPU batch-1 comparison, merged in
    assert cpu["same_tokens"] is True and cpu["peer"] == "transformers" and cpu["pairs"] == 1
    assert cpu["ours_step_ms"] > 0 and cpu["floor_ms"] > 0 and cpu["read_floor_ms"] > 0
    assert cpu["pct_floor"] == pytest.approx(100 * cpu["floor_ms"] / cpu["ours_step_ms"])
    assert "CPU batch-1 decode" in out

    pngs = sorted(os.listdir(plot_dir))
    assert pngs == sorted(["attention.png", "decode-attention.png", "layer-norm.png", "gelu-mlp.png", "generate.png",
                           "paged-decode-attention.png", "paged-prefill-attention.png", "paged-kv-write.png",
                           "cross-entropy.png", "cpu-decode.png"])
    for name in pngs:
        _assert_png(plot_dir / name)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic writes left no temp files


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    from benchmarks import gpu_check

    rc = gpu_check.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    doc = json.loads((tmp_path / "results.json").read_text())
    _assert_environment_fields(doc)
    parity = [r for r in doc["rows"] if r["kind"] == "parity"]
    assert len(parity) == 2 and all(r["ok"] and r["max_err"] < r["tol"] for r in parity)  # fastgpt's GPT, patched HF
    assert {"kernel", "generate", "decode_position", "patch", "train"} <= {r["kind"] for r in doc["rows"]}
    assert "Model-level parity" in (tmp_path / "results.md").read_text()
    _assert_png(tmp_path / "generate.png")
    assert "all checks passed" in out


def _fake_suite(name, **functions):
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    return module


def test_gpu_check_reports_each_failing_op_and_keeps_going(monkeypatch):
    from benchmarks import gpu_check

    def good_check(device, dtypes):
        return [{"op": "attention", "case": "T=67", "dtype": d, "max_err": 1e-6, "tol": 1e-5, "ok": True}
                for d in dtypes]

    def check_raising_on_bf16(device, dtypes):
        if torch.bfloat16 in dtypes:
            raise RuntimeError("kernel launch failed\nsecond line")
        return [{"op": "decode_attention", "case": "len=37", "dtype": d, "max_err": 1e-4, "tol": 1e-3, "ok": True}
                for d in dtypes]

    def wrong_check(device, dtypes):
        return [{"op": "gelu_mlp", "case": "M=9", "dtype": d, "max_err": 0.5, "tol": 1e-3, "ok": False}
                for d in dtypes]

    monkeypatch.setitem(sys.modules, "benchmarks.bench_attention", _fake_suite("a", check=good_check))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_decode_attention",
                        _fake_suite("d", check=check_raising_on_bf16))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_layer_norm", None)  # import fails: the suite is missing
    monkeypatch.setitem(sys.modules, "benchmarks.bench_gelu_mlp", _fake_suite("g", check=wrong_check))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_cross_entropy",
                        _fake_suite("c", check=lambda device, dtypes: [{**r, "op": "cross_entropy"}
                                                                     for r in good_check(device, dtypes)]))
    rows = gpu_check.run_checks("cuda", [torch.bfloat16, torch.float16])

    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    assert [r["ok"] for r in by_op["attention"]] == [True, True]
    # the bf16 failure is reported, and fp16 of the same op is still checked
    assert [(r["dtype"], r["ok"]) for r in by_op["decode_attention"]] == [("bfloat16", False), ("float16", True)]
    assert "kernel launch failed" in by_op["decode_attention"][0]["error"]
    assert len(by_op["layer_norm"]) == 1 and not by_op["layer_norm"][0]["ok"]
    assert [r["ok"] for r in by_op["gelu_mlp"]] == [False, False]


def test_bench_kernel_suites_missing_or_failing_are_reported(monkeypatch):
    def good_run(device, dtypes, quick, ceilings):
        return [timing_row("attention", "B=1 H=2 T=33 D=64", d, 0.5, "torch SDPA", 1.0, 1e9, "TFLOP/s", ceilings)
                for d in dtypes]

    def failing_run(device, dtypes, quick, ceilings):
        raise ValueError("out of shared memory")

    monkeypatch.setitem(sys.modules, "benchmarks.bench_attention", _fake_suite("a", run=good_run))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_decode_attention", None)
    monkeypatch.setitem(sys.modules, "benchmarks.bench_layer_norm", _fake_suite("l", run=failing_run))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_gelu_mlp", None)
    monkeypatch.setitem(sys.modules, "benchmarks.bench_paged_attention", None)
    monkeypatch.setitem(sys.modules, "benchmarks.bench_cross_entropy", None)
    notes, errors = [], []
    ceilings = {"copy_gbs": 1000.0, "matmul_tflops": 500.0}
    rows = bench_kernels.run_kernel_suites("cuda", [torch.bfloat16], True, ceilings, notes, errors)

    assert len(rows) == 1 and rows[0]["kind"] == "kernel" and rows[0]["backend"] == "triton"
    assert rows[0]["speedup"] == pytest.approx(2.0) and rows[0]["pct_ceiling"] == pytest.approx(100 * 2 / 500)
    assert sum("not available" in n for n in notes) == 4
    assert all(any(op in n for n in notes) for op in ("decode_attention", "gelu_mlp", "paged_attention", "cross_entropy"))
    assert errors == ["layer_norm: FAILED: ValueError: out of shared memory"]


def test_bench_serve_and_patch_suites_run_through_the_cli(tmp_path, capsys):
    """`fastgpt bench serve` starts a real server process and measures it against the offline engine on
    the same requests; `bench patch` times a patched HF GPT-2 against an unpatched one (parity first)."""
    json_path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--smoke", "--device", "cpu", "--json", str(json_path)]) == 0
    doc = json.loads(json_path.read_text())
    rows = {r["peer"]: r for r in doc["rows"] if r["kind"] == "serve"}
    assert set(rows) == {"fastgpt serve", "fastgpt offline"}
    for r in rows.values():
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_throughput"] > 0
        assert 4 * 2 <= r["total_output"] <= 4 * 6  # every request made exactly its drawn output length
    assert rows["fastgpt serve"]["total_output"] == rows["fastgpt offline"]["total_output"]
    assert any(n.startswith("serve: fastgpt serve / offline engine output tok/s") for n in doc["notes"])
    assert "Serving: fastgpt serve under load" in capsys.readouterr().out

    json_path = tmp_path / "patch.json"
    assert main(["bench", "patch", "--smoke", "--device", "cpu", "--json", str(json_path)]) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [r["ok"] for r in rows if r["kind"] == "parity"] == [True]
    assert {r["phase"] for r in rows if r["kind"] == "patch"} == {"prefill", "decode", "train"}


def test_bench_train_smoke_runs_every_path_on_the_same_weights_and_data(tmp_path, capsys):
    json_path = tmp_path / "train.json"
    assert main(["bench", "train", "--smoke", "--device", "cpu", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "Training step (forward + backward + AdamW)" in out
    rows = {r["path"]: r for r in json.loads(json_path.read_text())["rows"] if r["kind"] == "train"}
    assert set(rows) == {"fused", "reference", "transformers"}
    for r in rows.values():
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / (r["step_ms"] * 1e-3))
    # the same initial weights and windows: the first step's losses agree (transformers scores T - 1 targets)
    assert rows["fused"]["first_loss"] == pytest.approx(rows["reference"]["first_loss"], rel=1e-5)
    assert rows["transformers"]["first_loss"] == pytest.approx(rows["reference"]["first_loss"], rel=0.05)
    assert rows["reference"]["vs_reference"] == pytest.approx(1.0)


def test_train_goals_are_judged_from_the_gpt2_rows():
    from benchmarks import bench_train

    def row(path, tok, peak):
        return {"kind": "train", "model": "gpt2", "batch": 8, "seq": 1024, "dtype": "bf16 autocast", "path": path,
                "tokens_per_s": tok, "peak_gb": peak}

    rows = bench_train._with_ratios([row("fused", 300.0, 5.0), row("reference", 180.0, 10.0),
                                     row("transformers", 250.0, 11.0)])
    got = {g["goal"].split(": ", 1)[1]: (g["measured"], g["ok"]) for g in bench_train.goals(rows)}
    assert got["tokens/s >= 1.5x the reference path"] == (pytest.approx(300 / 180), True)
    assert got["tokens/s >= 1.3x transformers (SDPA)"] == (pytest.approx(1.2), False)
    assert got["peak memory <= 60% of the reference path"] == (pytest.approx(0.5), True)
    assert bench_train.goals([r for r in rows if r["path"] != "fused"]) == []


def test_cross_entropy_cpu_memory_is_measured_per_process():
    """The plumbing of the CPU peak-memory benchmark, at a small size (the claim itself is the benchmark's
    N = 8192, V = 50257, C = 768 run)."""
    from benchmarks import bench_cross_entropy

    result = bench_cross_entropy.cpu_memory(N=2048, V=20000, C=64)
    for variant in ("fused", "materialised"):
        assert result[variant]["growth_mb"] > 0 and result[variant]["peak_rss_mb"] > result[variant]["rss_before_mb"]
    assert result["ratio"] < 1, result  # the materialised (2048, 20000) fp32 logits alone are 160 MB


def test_transformers_peer_holds_the_same_weights(reference_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=997, n_positions=128)).eval()
    hf = bench_generate.transformers_peer(model)
    ids = torch.randint(0, 997, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_weight_bytes_per_step_counts_every_weight_but_the_position_table():
    V, P, C, L = 997, 128, 64, 3
    model = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=C, vocab_size=V, n_positions=P)).half()
    # per block: c_attn 3C^2 + 3C, c_proj C^2 + C, c_fc 4C^2 + 4C, mlp c_proj 4C^2 + C, two LayerNorms 4C
    per_block = 12 * C * C + 13 * C
    expected = 2 * (V * C + L * per_block + 2 * C)  # fp16; wte (= the tied head) once, final LayerNorm
    assert bench_generate.weight_bytes_per_step(model) == expected


def _exit_code(argv) -> int:
    """main()'s status, whether it returns it or argparse's error raises it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, needle", [
    (["--json", "/nonexistent-dir/r.json"], "--json"),
    (["--dtype", "float8"], "--dtype"),
    (["--model", "/nonexistent-dir/model"], "--model"),
    (["bogus-suite"], "invalid choice"),
])
def test_bench_user_errors_are_one_line(argv, needle, capsys):
    rc = _exit_code(["bench", "--device", "cpu", "--smoke"] + argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert "[bench]" not in err  # refused before any timing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_without_cuda_says_so(capsys):
    rc = main(["bench", "--device", "cuda", "--smoke"])
    assert rc == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------- suites and the CLI glue
def test_fastgpt_never_imports_benchmarks():
    """Dependencies point one way: benchmarks imports fastgpt. fastgpt/cli.py names benchmarks.cli as a
    string (imported only when `fastgpt bench` runs); no module of fastgpt has an import of benchmarks."""
    import ast
    import pathlib

    import fastgpt

    offenders = []
    for path in pathlib.Path(fastgpt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert offenders == []


def test_bench_without_the_benchmarks_package_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)  # import of it fails, as when it is not installed
    rc = _exit_code(["bench", "--smoke"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "benchmarks package" in err and "Traceback" not in err


def test_a_new_suite_is_one_registration(monkeypatch, capsys):
    """A suite is a module with run_suite(ctx); a line in SUITES makes it `fastgpt bench NAME`, and rows of
    a kind the report does not know yet still print, as a table of all their fields."""
    seen = {}

    def run_suite(ctx):
        seen["ctx"] = ctx
        ctx.notes.append("fake: a note")
        return [{"kind": "fake_rows", "case": "a", "tok_s": 12.5}, {"kind": "fake_rows", "case": "b", "tok_s": 7.25}]

    monkeypatch.setitem(sys.modules, "fake_suite_module", _fake_suite("fake_suite_module", run_suite=run_suite))
    monkeypatch.setitem(bench_cli.SUITES, "fake", ("fake_suite_module", "a suite of the test", True))
    rc = main(["bench", "fake", "--smoke", "--device", "cpu", "--dtype", "float32,float16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ctx = seen["ctx"]
    assert ctx.device.type == "cpu" and ctx.smoke and ctx.dtypes == [torch.float32, torch.float16]
    assert ctx.ceilings["copy_gbs"] > 0
    assert "fake_rows" in out and "12.5" in out and "7.25" in out and "fake: a note" in out
    assert "CPU reference path" not in out  # only the named suite ran


def test_a_failing_or_missing_suite_is_reported_and_the_others_run(monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setitem(sys.modules, "boom_suite", _fake_suite("boom_suite", run_suite=boom))
    monkeypatch.setitem(sys.modules, "ok_suite", _fake_suite("ok_suite", run_suite=lambda ctx: [{"kind": "ok", "v": 1}]))
    monkeypatch.setitem(sys.modules, "gone_suite", None)
    monkeypatch.setitem(sys.modules, "own_jobs_suite",
                        _fake_suite("own_jobs_suite", run_suite=lambda ctx: [{"kind": "own_jobs", "v": 2}]))
    monkeypatch.setattr(bench_cli, "SUITES", {"boom": ("boom_suite", "", True), "gone": ("gone_suite", "", True),
                                              "ok": ("ok_suite", "", True), "own": ("own_jobs_suite", "", False)})
    rc = main(["bench", "all", "--smoke", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1  # a failed suite fails the run
    assert "suite boom: FAILED: RuntimeError: out of memory" in out and "second line" not in out
    assert "suite gone: not available" in out
    assert "== ok ==" in out
    assert "own_jobs" not in out  # registered outside `all`: runs only when named


def test_plots_draw_bars_for_one_point_per_series_and_lines_otherwise():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3)
    assert report.draw_series(a, {"gpt2 vs transformers": [(1, 1.3)], "tiny vs transformers": [(1, 3.1)]},
                              "batch", "speedup", "t") == "bars"
    assert len(a.patches) == 2 and not a.lines[1:]  # two bars (a.lines holds at most the reference line)
    assert report.draw_series(b, {"s": [(1, 1.0), (8, 2.0)], "lone": [(1, 1.5)]}, "batch", "speedup", "t") == "lines"
    assert len(b.lines) == 2 and not b.patches
    assert report.draw_series(c, {}, "batch", "speedup", "t") == "empty"
    plt.close(fig)
    stamp = report._stamp({"device_name": "AMD EPYC (2 cores)", "date": "2026-12-01T10:00:00+00:00"},
                          [{"dtype": "float32"}, {"dtype": "bfloat16"}, {"dtype": "float32"}])
    assert stamp == "AMD EPYC (2 cores) | 2026-12-01 | float32, bfloat16"


def test_cpu_decode_mode_of_the_generate_suite(capsys, monkeypatch):
    """`python -m benchmarks.bench_generate --cpu-decode` (the old bench_generate_cpu.py): the table with
    the same-tokens check, both speedups against their goals, and the two floors."""
    pytest.importorskip("transformers")
    interpret_before = os.environ.get("TRITON_INTERPRET")
    assert bench_generate.main(["--cpu-decode", "--smoke", "--device", "cpu"]) == 0
    assert os.environ.get("TRITON_INTERPRET") == interpret_before
    out = capsys.readouterr().out
    assert "same tokens as transformers: True" in out
    assert "goal 1.5x" in out and "goal 70%" in out
    assert "weight-streaming floor" in out and "read-only floor" in out


@pytest.mark.parametrize("x_rows", [1, 5])
def test_cpu_matvec_table_covers_every_candidate(x_rows, monkeypatch):
    """benchmarks/bench_cpu_matvec.py on small shapes, one round: a rate (or the reason there is none) for
    every candidate at every thread count, and the environment and load with the numbers; with several
    rows of x, a rate for every candidate that takes them (each checked against float64 first)."""
    from benchmarks import bench_cpu_matvec
    from kernels import reference

    monkeypatch.setattr(reference, "PACK_MIN_WEIGHT", 0)  # the small shapes get packed copies too
    result = bench_cpu_matvec.measure([1, 2], 1, {"a": (256, 96), "odd": (257, 64)}, stream_bytes=1 << 20,
                                      x_rows=x_rows)
    if torch.backends.mkldnn.is_available():
        assert all(r["gbs"] for r in result["rows"] if r["candidate"] == "kernels.linear prepacked")
    names = set(bench_cpu_matvec.candidates())
    if x_rows > 1:
        for r in result["rows"]:
            assert (r["note"] == "one row only") == (r["candidate"] in bench_cpu_matvec.ONE_ROW_ONLY), r
    assert {"kernels.linear (in,out)", "bmm split-K (in,out)", "F.linear (out,in)"} <= names
    rows = result["rows"]
    assert len(rows) == 2 * 2 * len(names)
    for r in rows:
        assert (r["gbs"] is not None and r["gbs"] > 0) or r["note"], r
    assert not [r for r in rows if r["note"] and r["note"].startswith("wrong result")]
    assert result["load_avg_before"] and result["device_name"] and result["date"]
    table = bench_cpu_matvec.format_table(result)
    assert "load average" in table and "kernels.linear" in table and f"x ({x_rows}, in)" in table


def test_bench_engine_smoke_through_the_cli(tmp_path, capsys):
    """`fastgpt bench engine` (a suite outside `all`): its rows, speedup notes and plot."""
    pytest.importorskip("transformers")
    rc = main(["bench", "engine", "--smoke", "--device", "cpu", "--plot", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Engine: continuous batching" in out and "fastgpt engine vs transformers static" in out
    assert "engine: 4 requests" in out
    _assert_png(tmp_path / "engine.png")


def test_report_shows_every_kind_once_in_its_section():
    """Each kind the report knows gets its own section, once; a kind it does not know is shown with every
    field (a tp_engine row once fell into both)."""
    doc = {**report.environment("cpu"), "ceilings": {},
           "rows": [{"kind": kind, "model": f"m-{kind}", "decode_ms": 1.0, "batch": 1, "dtype": "float32",
                     "context": 16} for kind, *_ in report.SECTIONS] + [{"kind": "brand_new", "field": 3.5}]}
    text = report.render(doc)
    for kind, title, *_ in report.SECTIONS:
        assert text.count(f"== {title}") == 1, kind
        assert f"== {kind} ==" not in text, kind  # not also shown as an unknown kind
    assert text.count("== brand_new ==") == 1 and "3.5" in text
