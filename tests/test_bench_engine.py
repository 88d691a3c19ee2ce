"""benchmarks/bench_engine.py's plumbing on a tiny workload: the workload, each system, the rows, the table
and the plot. (transformers' continuous batching is left out here: its manager's warm-up alone takes
tens of seconds on this CPU; the full benchmark runs it.)"""

import json

import pytest
import torch

from benchmarks import bench_engine
from benchmarks.bench_engine import Workload, make_requests
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def test_workload_is_seeded_and_in_range():
    w = Workload(num_requests=50, prompt_range=(3, 9), output_range=(2, 5), seed=4)
    reqs = make_requests(101, w)
    assert reqs == make_requests(101, w) and reqs != make_requests(101, Workload(**{**w.__dict__, "seed": 5}))
    assert all(3 <= len(p) <= 9 and 2 <= n <= 5 and all(0 <= t < 101 for t in p) for p, n in reqs)
    assert {len(p) for p, _ in reqs} == set(range(3, 10))  # both ends reached: the ranges are inclusive


def test_bench_engine_runs_and_reports(reference_path, tmp_path, capsys):
    pytest.importorskip("transformers")
    w = Workload(num_requests=5, prompt_range=(4, 40), output_range=(2, 9), concurrency=(2, 4))
    systems = ("fastgpt engine", "transformers static", "fastgpt static")
    doc = bench_engine.run("cpu", torch.float32, w, model_name="tiny", systems=systems)
    rows = doc["rows"]
    assert [(r["system"], r["concurrency"]) for r in rows] == [(s, c) for c in (2, 4) for s in systems]
    assert all(r["output_tokens"] == sum(n for _, n in make_requests(50257, w)) and r["output_tok_s"] > 0
               for r in rows)
    static = [r for r in rows if r["system"] == "transformers static"]
    assert all(r["same_requests"] == 5 for r in static)  # fp32 greedy on a tiny model: the same tokens
    assert set(doc["speedups"]) == {"transformers static", "fastgpt static"}
    text = bench_engine.render(doc)
    assert "fastgpt engine vs transformers static" in text and "output tok/s" in text
    path = tmp_path / "bench_engine.png"
    bench_engine.plot(doc, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(doc, default=str)
