"""fastgpt.parallel: tensor-parallel inference and data-parallel training, 2 gloo processes on the CPU.

The ranks are real processes: started with torchrun, or (where a test must see each rank's output or kill
the job) as plain processes given torchrun's environment, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT on
127.0.0.1 and a free port. Every launch has a time limit, so a rank waiting forever fails the test instead
of hanging CI. Models are tiny or shallow; the reference ops run unless a test says otherwise.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastgpt import GPT, Tokenizer, default_model_dir
from fastgpt.cli import main
from fastgpt.config import GPTConfig
from fastgpt.parallel import World, check_tensor_parallel, padded_vocab, shard_plan, take_shard
from fastgpt.train import TrainConfig, latest_checkpoint, list_checkpoints, load_training_state, train
from helpers import make_hf_checkpoint, max_rel_err, random_ids, train_tiny_tokenizer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")
LAUNCH_TIMEOUT = 300  # seconds for one multi-process job: generous on a loaded machine, and never a hang
FP32_TOL = 1e-5


# ------------------------------------------------------------------------------------------ launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    """Offline, this checkout importable, one thread per rank (two ranks share two cores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_ranks(argv: list[str], tmp_path, nprocs: int = 2, env=None, pipe_rank0: bool = False):
    """nprocs processes of argv with torchrun's environment; their output goes to files (a pipe that
    fills up would stall a rank and, through the collectives, every other)."""
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        rank_env = base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                            LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            **(env or {}))
        out = open(tmp_path / f"launch-{port}-rank{rank}.out", "w+")
        err = subprocess.PIPE if pipe_rank0 and rank == 0 else open(tmp_path / f"launch-{port}-rank{rank}.err", "w+")
        procs.append(subprocess.Popen(argv, stdout=out, stderr=err, env=rank_env, text=True, cwd=ROOT))
        logs.append((out, err))
    return procs, logs


def wait_ranks(procs, logs, timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each rank; every rank is killed if any is still running at the end."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [read_log(err) for _, err in logs]
        pytest.fail(f"a rank was still running after {timeout:.0f} s (hung?); stderr of each rank:\n" +
                    "\n---\n".join(o[-3000:] for o in outputs))
    return [(p.returncode, read_log(out), read_log(err)) for p, (out, err) in zip(procs, logs)]


def read_log(f) -> str:
    if f is subprocess.PIPE or f is None:
        return ""
    f.seek(0)
    return f.read()


def run_ranks(argv, tmp_path, nprocs: int = 2, env=None, check: bool = True):
    results = wait_ranks(*start_ranks(argv, tmp_path, nprocs, env))
    if check:
        for rank, (code, _, err) in enumerate(results):
            assert code == 0, f"rank {rank} exited with {code}:\n{err[-4000:]}"
    return results


def torchrun(args: list[str], timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """The real launcher, as a user types it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=base_env(), timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s (hung?):\n{(e.stderr or b'')[-3000:]}")


# -------------------------------------------------------------------------------- sharding, one process
def test_qkv_shard_holds_q_k_v_of_its_own_heads():
    config = GPTConfig(vocab_size=101, n_embd=12, n_head=6, n_layer=1, n_positions=8)
    C, hd = config.n_embd, config.head_dim
    full = torch.randn(3 * C, C)  # (3C, C): q rows, then k rows, then v rows, head after head
    heads = full.view(3, config.n_head, hd, C)
    for tp in (1, 2, 3, 6):
        for rank in range(tp):
            shard = take_shard("transformer.h.0.attn.c_attn.weight", full, config, rank, tp)
            mine = slice(rank * config.n_head // tp, (rank + 1) * config.n_head // tp)
            assert torch.equal(shard, heads[:, mine].reshape(-1, C)), (tp, rank)
    # what a plain split of the fused rows would give rank 0 of 2: all of q and half of k
    naive = full.chunk(2)[0]
    assert not torch.equal(naive, take_shard("transformer.h.0.attn.c_attn.weight", full, config, 0, 2))


def test_row_parallel_and_vocab_shards_cover_the_whole():
    config = GPTConfig(vocab_size=101, n_embd=12, n_head=6, n_layer=1, n_positions=8)
    tp = 2
    for name, shape in (("transformer.h.0.attn.c_proj.weight", (12, 12)),
                        ("transformer.h.0.mlp.c_proj.weight", (12, 48)),
                        ("transformer.h.0.mlp.c_fc.weight", (48, 12)), ("transformer.h.0.mlp.c_fc.bias", (48,))):
        full = torch.randn(shape)
        dim = shard_plan(name, config, 0, tp)[0]
        pieces = [take_shard(name, full, config, r, tp) for r in range(tp)]
        assert torch.equal(torch.cat(pieces, dim=dim), full), name
    # HF's Conv1D layout (in, out) gives the same shard, read transposed
    full = torch.randn(36, 12)
    for rank in range(tp):
        assert torch.equal(take_shard("transformer.h.0.attn.c_attn.weight", full.t().contiguous(), config, rank, tp,
                                      transposed=True),
                           take_shard("transformer.h.0.attn.c_attn.weight", full, config, rank, tp))
    # vocab: 101 rows padded to 102, one zero row at the end of the last rank's shard
    assert padded_vocab(101, 2) == 102 and padded_vocab(50257, 8) == 50264
    wte = torch.randn(101, 12)
    pieces = [take_shard("transformer.wte.weight", wte, config, r, tp) for r in range(tp)]
    assert [p.shape[0] for p in pieces] == [51, 51]
    assert torch.equal(torch.cat(pieces)[:101], wte) and torch.equal(pieces[1][-1], torch.zeros(12))
    assert shard_plan("transformer.h.0.ln_1.weight", config, 0, tp) is None  # replicated
    assert shard_plan("transformer.h.0.attn.c_proj.bias", config, 1, tp) is None  # added once, after the sum


def test_tensor_parallel_size_must_divide_the_heads():
    check_tensor_parallel(GPTConfig(n_head=12, n_embd=768), 4)
    message = r"tensor-parallel size 2 does not divide the model's 25 attention heads.*\[1, 5, 25\]"
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(GPTConfig(n_head=25, n_embd=1600), 2)
    with pytest.raises(ValueError, match="integer >= 1"):
        check_tensor_parallel(GPTConfig(), 0)


def test_serve_tp_without_torchrun_says_how_to_launch(capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--tp", "2", "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node 2" in err and len(err.strip().splitlines()) == 1


def test_world_from_env():
    assert World.from_env({}) == World(0, 1, 0)
    assert World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        World.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_generate_tp_without_torchrun_says_how_to_launch(capsys):
    assert main(["generate", "--tp", "2", "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node 2" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- tensor parallel, 2 ranks
@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    # gpt2's width, heads, context and vocabulary (50257: odd, so the vocab shards get a padding row),
    # two layers instead of twelve; GPT-2's own init, written by fastgpt (transformers' init of 40M
    # parameters would take seconds)
    torch.manual_seed(1)
    gpt2_shaped = str(root / "gpt2-shaped")
    GPT(GPTConfig.from_preset("gpt2", n_layer=2)).save_pretrained(gpt2_shaped)
    tiny_bin, _ = make_hf_checkpoint(root / "tiny-bin", seed=2, vocab_size=101, n_embd=32, n_head=4, n_layer=2,
                                     n_positions=16, safe_serialization=False)
    three_heads, _ = make_hf_checkpoint(root / "three-heads", seed=3, n_embd=24, n_head=3, n_layer=1,
                                        tokenizer=train_tiny_tokenizer())
    return dict(root=root, bundled=default_model_dir(), gpt2_shaped=gpt2_shaped, tiny_bin=tiny_bin,
                three_heads=three_heads)


@pytest.fixture(scope="module")
def tp_results(tp_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-out")
    c = tp_checkpoints
    run_ranks([sys.executable, WORKER, "tp", str(out), c["bundled"], c["gpt2_shaped"], c["tiny_bin"], c["three_heads"]],
              out, env={"TRITON_INTERPRET": "1"})
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def one_process(path, fn, cpu_decode_layout=True):
    with torch.inference_mode():
        return fn(GPT.from_pretrained(path, cpu_decode_layout=cpu_decode_layout))


def test_tp_logits_match_one_process(tp_results, tp_checkpoints, reference_path):
    for name, ids in (("bundled", random_ids(2, 23, 4096, seed=1)), ("gpt2_shaped", random_ids(1, 9, 50257, seed=2))):
        expected = one_process(tp_checkpoints[name], lambda m: m(ids))
        for rank, got in enumerate(tp_results):
            logits = got[f"{name}_logits"]
            assert logits.shape == expected.shape
            err = max_rel_err(logits, expected)
            assert err <= FP32_TOL, f"{name}, rank {rank}: max relative error {err:.2e}"
        # every rank ends with the very same logits (results of the same all-gather): same sampling
        assert torch.equal(tp_results[0][f"{name}_logits"], tp_results[1][f"{name}_logits"])
    # each rank holds half the heads (and caches only those), and half the padded vocabulary, in tensors
    # that own their storage (no view of a whole tensor keeps it alive)
    assert all(r["bundled_heads_per_rank"] == 3 and r["bundled_kv_heads"] == 3 for r in tp_results)
    assert all(r["gpt2_shaped_wte_rows"] == 25129 for r in tp_results)
    assert all(r["gpt2_shaped_param_bytes"] == r["gpt2_shaped_storage_bytes"] for r in tp_results)
    full = GPT.from_pretrained(tp_checkpoints["gpt2_shaped"]).num_params()
    assert tp_results[0]["gpt2_shaped_params"] < 0.55 * full  # the shard, plus the small replicated parts


def test_tp_greedy_generation_matches_one_process(tp_results, tp_checkpoints, reference_path):
    ids = random_ids(2, 23, 4096, seed=1)[:, :7]
    expected = one_process(tp_checkpoints["bundled"], lambda m: m.generate(ids, 12))
    for got in tp_results:
        assert torch.equal(got["bundled_generate"], expected)
    assert not torch.equal(expected[:, 7:], expected[:, 7:8].expand(-1, 12))  # real, varied choices


def test_tp_through_the_triton_kernels_and_a_bin_checkpoint(tp_results, tp_checkpoints, reference_path):
    ids = random_ids(2, 5, 101, seed=3)
    expected = one_process(tp_checkpoints["tiny_bin"], lambda m: m(ids), cpu_decode_layout=False)
    expected_tokens = one_process(tp_checkpoints["tiny_bin"], lambda m: m.generate(ids, 3), cpu_decode_layout=False)
    for got in tp_results:
        assert max_rel_err(got["tiny_logits"], expected) <= FP32_TOL
        assert max_rel_err(got["tiny_sharded_in_memory_logits"], expected) <= FP32_TOL
        assert torch.equal(got["tiny_generate"], expected_tokens)


def test_naive_qkv_split_is_wrong(tp_results, tp_checkpoints, reference_path):
    """The regrouping is what makes TP right: the same model with c_attn split as a plain block of rows
    runs, with the same shapes, and gives logits off by a large fraction of their scale."""
    ids = random_ids(2, 23, 4096, seed=1)
    expected = one_process(tp_checkpoints["bundled"], lambda m: m(ids))
    for got in tp_results:
        assert max_rel_err(got["bundled_naive_qkv_logits"], expected) > 0.05


def test_ddp_syncs_gradients_on_the_last_micro_step_only(tp_results):
    for got in tp_results:
        first, last = got["ddp_grad_after_no_sync"], got["ddp_grad_after_sync"]
        assert not torch.equal(first[0], first[1])  # local gradients only: each rank's own micro-batch
        assert torch.equal(last[0], last[1])  # synced: the same mean on both ranks
        torch.testing.assert_close(last[0], (got["ddp_local_sums"][0] + got["ddp_local_sums"][1]) / 2,
                                   rtol=FP32_TOL, atol=1e-7)


def test_tp_size_not_dividing_heads_fails_alike_on_every_rank(tp_results):
    for got in tp_results:
        assert "tensor-parallel size 2 does not divide the model's 3 attention heads" in got["three_heads_error"]


def test_torchrun_generate_tp_prints_the_one_process_text(tp_checkpoints, capsys, reference_path):
    """Two prompts through the engine on every rank; rank 0 prints them, in order, as one process does."""
    args = ["generate", "--device", "cpu", "--prompt", "def forward(self", "--prompt", "The os module",
            "--temperature", "0", "--max-new-tokens", "16"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("def forward(self") and "\nThe os module" in expected
    done = torchrun(["-m", "fastgpt", *args, "--tp", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected  # printed once (rank 0), the same text
    assert done.stderr.count("[2 prompts, ") == 1 and "x 2 ranks (tensor parallel)" in done.stderr


def test_tp_size_not_dividing_the_heads_fails_on_every_rank(tp_checkpoints, tmp_path):
    """Each rank prints the same one-line error and exits 2; none is left waiting for the other."""
    results = run_ranks([sys.executable, "-m", "fastgpt", "generate", "--device", "cpu", "--prompt", "hi",
                         "--model", tp_checkpoints["three_heads"], "--tp", "2"], tmp_path, check=False)
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, f"rank {rank}: exit {code}\n{err[-2000:]}"
        lines = [line for line in err.splitlines() if line.startswith("fastgpt: error:")]
        assert len(lines) == 1 and "does not divide the model's 3 attention heads" in lines[0], err[-2000:]
        assert "Traceback" not in err and out == ""


def test_tp_size_must_match_the_launch(monkeypatch, capsys):
    """Checked from the environment alone, before any process group: the same on every rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["generate", "--tp", "3", "--prompt", "x", "--device", "cpu"]) == 2
    assert "torchrun started 2 processes but --tp is 3" in capsys.readouterr().err


# -------------------------------------------------------------------------- the engine on TP, 2 ranks
@pytest.fixture(scope="module")
def tp_engine_results(tp_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-engine")
    c = tp_checkpoints
    run_ranks([sys.executable, WORKER, "engine", str(out), c["bundled"], c["gpt2_shaped"], c["tiny_bin"]], out,
              env={"TRITON_INTERPRET": "1"})
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def alone(model, prompts, max_tokens) -> list[list[int]]:
    """GPT.generate on each prompt by itself (the dense cache, no engine)."""
    return [model.generate(torch.tensor([p]), m)[0, len(p):].tolist() for p, m in zip(prompts, max_tokens)]


def test_tp_engine_greedy_equals_one_process_under_every_schedule(tp_engine_results, tp_checkpoints, reference_path):
    """Plain, chunked prefill (7-token budget, 5-token blocks) and preemption (a 10-block cache) on 2 ranks
    give the tokens of the one-process engine and of GPT.generate on each prompt alone (float64)."""
    from fastgpt import Engine
    from parallel_worker import ENGINE_LENGTHS, ENGINE_MAX_TOKENS, ENGINE_REGIMES, engine_greedy, engine_prompts

    model = GPT.from_pretrained(tp_checkpoints["bundled"], dtype=torch.float64)
    prompts = engine_prompts(model.config.vocab_size)
    with torch.inference_mode():
        want = alone(model, prompts, ENGINE_MAX_TOKENS)
        assert engine_greedy(Engine(model, num_blocks=64), prompts, ENGINE_MAX_TOKENS) == want
    for rank, got in enumerate(tp_engine_results):
        for name, _ in ENGINE_REGIMES:
            assert got[f"bundled_{name}"] == want, f"rank {rank}, {name}"
            s = got[f"bundled_{name}_stats"]
            assert s == tp_engine_results[0][f"bundled_{name}_stats"]  # the very same schedule on each rank
            assert s["free_blocks"] == s["total_blocks"] and s["tensor_parallel"] == 2 and s["cuda_graphs"] is None
        assert got["bundled_preempting_stats"]["preemptions"] > 0
        assert got["bundled_chunked_stats"]["steps"] > sum(ENGINE_LENGTHS) // 7
        # the pages hold the rank's 3 of the 6 heads, and the engine's budget counts exactly those bytes
        assert got["bundled_kv_pages_shape"] == (4, 10, 16, 3, 32)
        assert got["bundled_kv_bytes"] == got["bundled_kv_bytes_expected"]


def test_tp_engine_samples_alike_on_every_rank(tp_engine_results, tp_checkpoints, reference_path):
    """Seeded samples (n=2, top-p) are the one-process engine's; unseeded ones draw from the shared
    generator, seeded from rank 0 when the engine was made: the same on both ranks, and really sampled."""
    from fastgpt import Engine, SamplingParams
    from parallel_worker import engine_prompts

    model = GPT.from_pretrained(tp_checkpoints["bundled"], dtype=torch.float64)
    prompts = engine_prompts(model.config.vocab_size)[3:5]
    seeded = Engine(model, num_blocks=64).generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=0.9,
                                                                           max_tokens=8, seed=7))
    want = [[c.token_ids for c in o.outputs] for o in seeded]
    r0, r1 = tp_engine_results
    assert r0["bundled_seeded"] == r1["bundled_seeded"] == want
    assert r0["bundled_unseeded"] == r1["bundled_unseeded"]
    assert all(a != b for a, b in r0["bundled_unseeded"]) and r0["bundled_unseeded"] != want


def test_tp_engine_gpt2_shaped_and_through_the_paged_kernels(tp_engine_results, tp_checkpoints, reference_path):
    from parallel_worker import gpt2_shaped_prompts, tiny_prompts

    model = GPT.from_pretrained(tp_checkpoints["gpt2_shaped"], dtype=torch.float64)
    with torch.inference_mode():
        want = alone(model, gpt2_shaped_prompts(model.config.vocab_size), [6, 6])
    del model
    tiny = GPT.from_pretrained(tp_checkpoints["tiny_bin"], cpu_decode_layout=False)
    with torch.inference_mode():
        want_tiny = alone(tiny, tiny_prompts(tiny.config.vocab_size), [4, 4])
    for got in tp_engine_results:
        assert got["gpt2_shaped"] == want  # 50257 tokens: the vocab shards' padding row never wins
        assert got["gpt2_shaped_stats"]["steps"] > 3  # the 40-token prompt went in chunks of 16
        assert got["tiny_triton"] == want_tiny


def test_tp_engine_settings_must_agree(tp_engine_results):
    for got in tp_engine_results:
        message = got["mismatch_error"]
        assert message is not None and "must be the same on every tensor-parallel rank" in message
        assert "num_blocks: rank 0 10, rank 1 11" in message


def test_tp_server_completion_equals_the_single_device_server():
    """torchrun, 2 ranks: rank 0 serves, rank 1 follows; a greedy completion, and an echo with prompt
    logprobs (a dense forward both ranks run), equal the single-device server's. SIGTERM stops both."""
    pytest.importorskip("fastapi")
    from benchmarks.serve_process import ServerProcess, httpx

    body = {"prompt": "The os module", "max_tokens": 24, "temperature": 0}
    echo = {"prompt": "def main():", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())]
    answers = {}
    for name, extra in (("tp", dict(launcher=launcher)), ("one", {})):
        args = ["--device", "cpu", "--dtype", "float32", "--num-blocks", "64"] + (["--tp", "2"] if extra else [])
        with ServerProcess(*args, env=dict(OMP_NUM_THREADS="1"), **extra) as server:
            answers[name] = [httpx.post(server.url + "/v1/completions", json=b, timeout=120).json()
                             for b in (body, echo)]
            if name == "tp":  # SIGTERM to torchrun, which passes it on to both ranks
                server.terminate(60)
                server._reader.join(10)
                assert "fastgpt.serve: stopped" in server.log()  # rank 0 drained and stopped
                assert "rank 1: rank 0 stopped serving; leaving" in server.log()  # and told rank 1 to go
    (tp, tp_echo), (one, one_echo) = answers["tp"], answers["one"]
    assert tp["choices"][0]["text"] == one["choices"][0]["text"] and tp["usage"] == one["usage"]
    assert tp["choices"][0]["text"]
    a, b = tp_echo["choices"][0]["logprobs"], one_echo["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and tp_echo["choices"][0]["text"] == one_echo["choices"][0]["text"]
    assert a["token_logprobs"][0] is None and b["token_logprobs"][0] is None
    assert a["token_logprobs"][1:] == pytest.approx(b["token_logprobs"][1:], rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------ data parallel, 2 ranks
WORDS = ["the", "model", "reads", "a", "token", "and", "writes", "next", "one", "fast", "slow", "rank", "sum"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("dp")
    rng = random.Random(0)
    os.makedirs(root / "corpus")
    for i in range(12):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 250)))
        (root / "corpus" / f"doc{i}.txt").write_text(text + "\n", encoding="utf-8")
    texts = [(root / "corpus" / f"doc{i}.txt").read_text() for i in range(12)]
    Tokenizer.train(texts, vocab_size=280).save(root / "tok")
    return root


# 2 ranks x batch 2 x accum 2 against 1 process x batch 2 x accum 4; checkpoints every 2 steps
DP_RUN = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, block_size=32, batch_size=2, grad_accum=2,
              max_steps=16, lr=3e-3,
              warmup_steps=3, eval_interval=8, eval_iters=3, checkpoint_interval=2, keep_checkpoints=100,
              log_interval=1, seed=4, val_fraction=0.1)


def dp_config(corpus, out, **overrides):
    return dict(DP_RUN, data=[str(corpus / "corpus")], tokenizer=str(corpus / "tok"), out_dir=str(out), **overrides)


def cli_flags(config: dict) -> list[str]:
    flags = []
    for k, v in config.items():
        if k == "out_dir":
            flags += ["--out", v]
        elif k == "data":
            flags += ["--data", *v]
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


@pytest.fixture(scope="module")
def single_run(corpus):
    """The reference: one process with grad-accum 4."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        result = train(TrainConfig(**dp_config(corpus, corpus / "single", grad_accum=4, threads=1)),
                       stream=open(os.devnull, "w"))
    return result


@pytest.fixture(scope="module")
def ddp_run(corpus):
    """2 ranks, DDP, through torchrun and the CLI as a user runs it."""
    done = torchrun(["-m", "fastgpt", "train", *cli_flags(dp_config(corpus, corpus / "ddp"))])
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def weights(path):
    return GPT.from_pretrained(path, cpu_decode_layout=False).state_dict()


def assert_same_weights(a, b, exact: bool):
    for name, t in a.items():
        if exact:
            assert torch.equal(t, b[name]), f"{name} differs by {(t - b[name]).abs().max():.3g}"
        else:
            torch.testing.assert_close(b[name], t, rtol=FP32_TOL, atol=FP32_TOL, msg=name)


def test_ddp_two_ranks_train_as_one_process_with_twice_the_accumulation(single_run, ddp_run, corpus):
    ddp, one = (json.load(open(corpus / d / "training.json")) for d in ("ddp", "single"))
    assert ddp["step"] == one["step"] == 16 and ddp["world_size"] == 2
    assert ddp["tokens_seen"] == one["tokens_seen"]  # the same global batch
    for a, b in zip(ddp["evals"], one["evals"]):  # validation reduced across the ranks
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=FP32_TOL)
    assert_same_weights(weights(corpus / "single"), weights(corpus / "ddp"), exact=False)
    # one progress line per step, from rank 0 only
    assert ddp_run.stderr.count("step 16/16 |") == 1 and ddp_run.stderr.count("done: step 16") == 1
    assert "x 2 ranks (DDP)" in ddp_run.stderr
    # rank 0 wrote a checkpoint that one process loads and resumes from its training state
    state = load_training_state(latest_checkpoint(str(corpus / "ddp")))
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2


def test_fsdp_two_ranks_train_as_one_process_and_resume_exactly(corpus, tmp_path, reference_path):
    short = dict(max_steps=4, checkpoint_interval=2, eval_interval=2)
    one = train(TrainConfig(**dp_config(corpus, tmp_path / "single", grad_accum=4, threads=1, **short)),
                stream=open(os.devnull, "w"))
    out = corpus / "fsdp"
    config = dp_config(corpus, out, fsdp=True, **short)
    run_ranks([sys.executable, WORKER, "train", str(tmp_path), json.dumps(config)], tmp_path)
    got = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert got[0] == got[1]  # every rank reports the reduced losses
    assert got[0]["losses"] == pytest.approx(one.losses, rel=FP32_TOL)
    for a, b in zip(got[0]["evals"], one.evals):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=FP32_TOL)
    assert_same_weights(weights(tmp_path / "single"), weights(out), exact=False)
    # the optimizer state was written shard by shard with torch.distributed.checkpoint
    assert os.path.isfile(out / "checkpoints" / "step-000002" / "optimizer" / ".metadata")

    # resume from step 2 (a copy of the run without its later checkpoint) and finish the same way
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("step-000004"))
    run_ranks([sys.executable, WORKER, "train", str(tmp_path),
               json.dumps(dict(config, out_dir=str(resumed))), "resume"], tmp_path)
    assert json.load(open(tmp_path / "rank0.json"))["losses"] == pytest.approx(got[0]["losses"][2:], rel=FP32_TOL)
    assert_same_weights(weights(out), weights(resumed), exact=True)


def test_killed_two_rank_job_resumes_to_the_same_weights(ddp_run, corpus, tmp_path):
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "fastgpt", "train", *cli_flags(dp_config(corpus, killed))]
    procs, logs = start_ranks(argv, tmp_path, pipe_rank0=True)
    saved = 0
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for line in procs[0].stderr:
        saved += line.startswith("saved checkpoint")
        if saved == 3 or time.monotonic() > deadline:  # mid-run, perhaps mid-way through the 4th checkpoint
            break
    for p in procs:  # the whole job, every rank, with no chance to clean up
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
    procs[0].stderr.close()
    assert saved == 3 and procs[0].returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = load_training_state(latest_checkpoint(str(killed)))["step"]
    assert 6 <= stopped_at < 16
    for name in os.listdir(killed / "checkpoints"):  # complete checkpoints, or hidden temporaries
        assert name.startswith(".") or os.path.join(killed, "checkpoints", name) in list_checkpoints(str(killed))

    results = run_ranks([sys.executable, "-m", "fastgpt", "train", "--resume", "--out", str(killed)], tmp_path)
    assert f"at step {stopped_at}" in results[0][2]
    assert_same_weights(weights(corpus / "ddp"), weights(killed), exact=True)
    a, b = (load_training_state(d / "checkpoints" / "step-000016") for d in (corpus / "ddp", killed))
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resume_with_another_world_size_fails_on_every_rank(single_run, corpus, tmp_path):
    before = sorted(os.listdir(corpus / "single" / "checkpoints"))
    results = run_ranks([sys.executable, "-m", "fastgpt", "train", "--resume", "--out", str(corpus / "single")],
                        tmp_path, check=False)
    for rank, (code, _, err) in enumerate(results):
        lines = [line for line in err.splitlines() if line.startswith("fastgpt: error:")]
        assert code == 2 and len(lines) == 1, f"rank {rank}: exit {code}\n{err[-2000:]}"
        assert "written by a run of 1 process(es) and this one has 2" in lines[0]
    assert sorted(os.listdir(corpus / "single" / "checkpoints")) == before


# ----------------------------------------------------------------------------------------------- bench
def test_bench_parallel_smoke_rows(reference_path):
    from benchmarks import bench_parallel
    from benchmarks.report import render

    notes, errors = [], []
    rows = bench_parallel.run("cpu", torch.float32, quick=False, smoke=True, notes=notes, errors=errors,
                              timeout=LAUNCH_TIMEOUT)
    assert not errors
    parity = [r for r in rows if r["kind"] == "parity"]
    assert len(parity) == 1 and parity[0]["ok"] and parity[0]["max_err"] <= 1e-4
    tp = {r["tp"]: r for r in rows if r["kind"] == "tp_decode"}
    assert sorted(tp) == [1, 2] and tp[1]["comm_ms"] is None and tp[2]["comm_ms"] > 0
    for r in tp.values():
        assert r["tok_s"] == pytest.approx(r["batch"] / (r["decode_ms"] * 1e-3))
    engine = {r["tp"]: r for r in rows if r["kind"] == "tp_engine"}
    assert sorted(engine) == [1, 2] and engine[2]["same_tokens"] == "2/2" and "tokens" not in engine[2]
    for r in engine.values():
        assert r["tok_s"] == pytest.approx(r["requests"] * r["max_tokens"] / (r["generate_ms"] * 1e-3))
    dp = {r["ranks"]: r for r in rows if r["kind"] == "dp_train"}
    assert sorted(dp) == [1, 2] and dp[2]["mode"] == "ddp" and dp[1]["vs_one"] == pytest.approx(1.0)
    assert dp[2]["tok_s"] == pytest.approx(2 * dp[2]["batch_per_rank"] * dp[2]["block"] / (dp[2]["step_ms"] * 1e-3))
    assert any("not speed" in n for n in notes)
    text = render({"device_name": "cpu", "device": "cpu", "torch": "-", "triton": "-", "date": "-", "rows": rows})
    assert "Tensor-parallel decode" in text and "Data-parallel training" in text and "Tensor-parallel engine" in text
