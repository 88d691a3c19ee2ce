"""fastgpt.train and fastgpt.data: the training loop, checkpoints and resume, data handling, the bundled model,
and the fused training path.

The runs go through the CPU path of the ops (PyTorch, the loss chunked) with tiny models on a small
seeded synthetic corpus; the fused path (Triton kernels forward and backward, under the interpreter) is
checked against the reference path step by step in test_fused_training_follows_the_reference_path.
"""

import io
import json
import math
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgpt import GPT, Tokenizer, default_model_dir
from fastgpt import data as datalib
from fastgpt.cli import main
from helpers import max_rel_err
from fastgpt.train import (TrainConfig, evaluate, latest_checkpoint, list_checkpoints, load_training_state,
                           loss_sum_and_count, lr_at, parameter_groups, save_checkpoint, train)

FP32_TOL = 1e-5
TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32)
TINY_MODEL_ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-positions", "32"]

SUBJECTS = ["cat", "dog", "parser", "module", "function", "list", "server", "thread", "buffer"]
VERBS = ["reads", "returns", "sorts", "opens", "closes", "writes", "ignores", "copies"]
OBJECTS = ["file", "string", "socket", "value", "record", "table", "queue", "number"]


def write_corpus(folder, n_docs=24, seed=0):
    """Seeded random sentences with a fixed grammar: learnable structure, never the same text twice."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n_docs):
        sentences = [f"The {rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(10, 20))]
        with open(os.path.join(folder, f"doc{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(sentences) + "\n")
    return str(folder)


def tiny_config(out_dir, data, **overrides):
    base = dict(out_dir=str(out_dir), data=[data], vocab_size=300, **TINY_MODEL, block_size=32, batch_size=8,
                max_steps=40, lr=3e-3, warmup_steps=5, eval_interval=20, eval_iters=4, checkpoint_interval=0,
                val_fraction=0.1, log_interval=10, seed=1, threads=1)
    return TrainConfig(**{**base, **overrides})


def python_env():
    """The environment for `python -m fastgpt`: reference ops, offline, this checkout importable."""
    env = dict(os.environ, TRITON_INTERPRET="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short from-scratch run shared by several tests (reference ops for its whole duration)."""
    root = tmp_path_factory.mktemp("tiny_run")
    corpus = write_corpus(root / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        result = train(tiny_config(root / "run", corpus), stream=open(os.devnull, "w"))
    return corpus, result


# ------------------------------------------------------------------------------------------ learning
def test_loss_falls_on_tiny_corpus(tiny_run, reference_path):
    _, result = tiny_run
    vocab = Tokenizer.from_pretrained(result.out_dir).vocab_size
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 40
    # an untrained model is close to a uniform guess, and a few dozen steps take it far below
    assert abs(first["val_loss"] - math.log(vocab)) < 0.5
    assert last["val_loss"] < first["val_loss"] - 1.5, result.evals
    assert last["train_loss"] < first["train_loss"] - 1.5, result.evals
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 1.5
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]), rel=1e-9)
    report = json.load(open(os.path.join(result.out_dir, "training.json")))
    assert report["step"] == 40 and report["evals"][-1]["val_loss"] == pytest.approx(last["val_loss"])


def test_finetune_starts_at_checkpoint_loss(tiny_run, tmp_path, reference_path):
    corpus, base = tiny_run
    config = tiny_config(tmp_path / "ft", corpus, init=base.out_dir, n_layer=None, n_head=None, n_embd=None,
                         n_positions=None, max_steps=3, eval_interval=1, lr=1e-4, seed=5)
    result = train(config, stream=open(os.devnull, "w"))
    # same data, same tokenizer, same fixed validation batches: the fine-tune's step-0 validation is the
    # base run's last one
    assert result.evals[0]["step"] == 0
    assert result.evals[0]["val_loss"] == pytest.approx(base.evals[-1]["val_loss"], rel=FP32_TOL)
    # and its first training loss is the checkpoint's loss on the fine-tune's first batch
    model = GPT.from_pretrained(base.out_dir)
    tokens = datalib.open_tokens(os.path.join(result.out_dir, "data", "train.bin"), model.config.vocab_size)
    x, y = datalib.sample_batch(tokens, None, config.batch_size, config.block_size,
                                torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        loss, count = loss_sum_and_count(model, x, y)
    assert result.losses[0] == pytest.approx(float(loss) / count, rel=FP32_TOL)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, reference_path):
    """Two micro-batches of 4 accumulate to the gradient of the 8 windows at once (every target counts)."""
    corpus = write_corpus(tmp_path / "corpus", seed=7)
    docs = datalib.read_documents(corpus)
    tokenizer = Tokenizer.train((d.text for d in docs), vocab_size=300)
    tokens, _ = datalib.encode_documents(tokenizer, docs)
    from fastgpt import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    x, y = datalib.sample_batch(tokens, None, 8, 31, torch.Generator().manual_seed(3))
    loss, n = loss_sum_and_count(model, x, y)
    (loss / n).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for sl in (slice(0, 4), slice(4, 8)):
        loss, n = loss_sum_and_count(model, x[sl], y[sl])
        (loss / n / 2).backward()
    for g_whole, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, g_whole, rtol=1e-4, atol=1e-6)


def test_weight_decay_only_on_weight_matrices():
    from fastgpt import GPTConfig

    model = GPT(GPTConfig(vocab_size=301, **TINY_MODEL))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters()
                       if p.dim() == 2 and not n.endswith(("wte.weight", "wpe.weight"))}
    assert not any(n.endswith("bias") or ".ln_" in n or "wte" in n or "wpe" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 10, 110
    lrs = [lr_at(s, lr, min_lr, warmup, steps) for s in range(steps + 1)]
    assert lrs[0] == pytest.approx(lr / warmup) and lrs[warmup - 1] == pytest.approx(lr)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # rises linearly
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then only falls
    assert lrs[warmup + (steps - warmup) // 2] == pytest.approx((lr + min_lr) / 2)  # cosine midpoint
    assert lrs[steps] == pytest.approx(min_lr)


# --------------------------------------------------------------------------------- kill and resume
# a run that checkpoints every 3 steps; the same settings for the CLI and for the Python API
# (with dropout, so the resumed run must also draw the same masks: the RNG states are part of the state)
KILLED_RUN = dict(**TINY_MODEL, block_size=32, batch_size=8, max_steps=60, lr=3e-3,
                  warmup_steps=5, eval_interval=0, eval_iters=2, checkpoint_interval=3, keep_checkpoints=100,
                  log_interval=1, threads=1, seed=2, dropout=0.1)


def test_killed_run_resumes_exactly(tmp_path, reference_path):
    corpus = write_corpus(tmp_path / "corpus", seed=3)
    killed_dir = tmp_path / "killed"
    # one tokenizer for both runs, so the comparison below depends on nothing but the resume
    Tokenizer.train((d.text for d in datalib.read_documents(corpus)), vocab_size=300).save(tmp_path / "tok")
    settings = dict(KILLED_RUN, tokenizer=str(tmp_path / "tok"))
    flags = [arg for k, v in settings.items() for arg in ("--" + k.replace("_", "-"), str(v))]
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt", "train", "--data", corpus, "--out", str(killed_dir),
                             *flags], stderr=subprocess.PIPE, text=True, env=python_env())
    saved = 0
    for line in proc.stderr:
        saved += line.startswith("saved checkpoint")
        if saved == 3:  # mid-run, and quite possibly mid-way through writing the 4th checkpoint
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.read()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"

    # every entry that looks like a checkpoint is complete; anything else is a hidden temporary
    ckpts = list_checkpoints(str(killed_dir))
    assert len(ckpts) >= 2
    for name in os.listdir(killed_dir / "checkpoints"):
        assert name.startswith(".") or os.path.join(killed_dir, "checkpoints", name) in ckpts, name
    for ckpt in ckpts:
        GPT.from_pretrained(ckpt)
        Tokenizer.from_pretrained(ckpt)
        load_training_state(ckpt)
    last = latest_checkpoint(str(killed_dir))
    state = load_training_state(last)
    stopped_at = state["step"]
    assert 9 <= stopped_at < 60 and last.endswith(f"step-{stopped_at:06d}")
    # AdamW's own step counters agree with the run's, and its moments are real (not a fresh optimizer)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {stopped_at}
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in state["optimizer"]["state"].values())

    done = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--resume", "--out", str(killed_dir)],
                          capture_output=True, text=True, env=python_env())
    assert done.returncode == 0, done.stderr
    assert f"at step {stopped_at}" in done.stderr
    report = json.load(open(killed_dir / "training.json"))
    assert report["step"] == 60 and report["resumed_from"] == stopped_at

    # the same run, never interrupted, compared at the end: a faithful resume (step counter and LR schedule,
    # the optimizer's moments, the data position, the weights' layout) computes the very same floats
    whole_dir = tmp_path / "whole"
    train(TrainConfig(out_dir=str(whole_dir), data=[corpus], **settings), stream=open(os.devnull, "w"))
    name = "step-000060"
    resumed, uninterrupted = (GPT.from_pretrained(d / "checkpoints" / name) for d in (killed_dir, whole_dir))
    for (param, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b), f"{param} differs by {(a - b).abs().max():.3g}"
    resumed, uninterrupted = (load_training_state(d / "checkpoints" / name) for d in (killed_dir, whole_dir))
    assert resumed["step"] == uninterrupted["step"] == 60
    assert torch.equal(resumed["sampler_rng"], uninterrupted["sampler_rng"])  # same data position
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert int(a["step"]) == int(b["step"]) == 60
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_interrupted_checkpoint_leaves_no_checkpoint(tmp_path, monkeypatch, reference_path):
    from fastgpt import GPTConfig

    tokenizer = Tokenizer.train(["some words to make a tokenizer from"] * 3, vocab_size=260)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    out = str(tmp_path)
    first = save_checkpoint(out, 3, model, tokenizer, {"step": 3}, keep=2)

    def dies_mid_write(obj, path):  # the weights are written, the training state is not
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", dies_mid_write)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(out, 6, model, tokenizer, {"step": 6}, keep=2)
    assert list_checkpoints(out) == [first]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000003"]

    # old checkpoints are pruned down to `keep`, newest kept
    later = [save_checkpoint(out, step, model, tokenizer, {"step": step}, keep=2) for step in (9, 12)]
    assert list_checkpoints(out) == later

    # what SIGKILL leaves (a hidden temporary) is never taken for a checkpoint
    os.makedirs(os.path.join(out, "checkpoints", ".step-000009.abc.tmp"))
    assert latest_checkpoint(out) == later[-1]


def test_fresh_run_refuses_a_dir_with_checkpoints(tiny_run, reference_path):
    corpus, result = tiny_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(result.out_dir, corpus), stream=open(os.devnull, "w"))


# ------------------------------------------------------------------------------------- fused path
CONVERGENCE_STEPS = 24


def _train_tiny(ops, dtype=torch.float32, steps=CONVERGENCE_STEPS):
    """A tiny GPT trained with AdamW on seeded batches whose targets are a fixed function of the inputs
    (learnable); the same initial weights and batches for every call. Returns (losses, final weights)."""
    from fastgpt import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2)).to(dtype).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 32, (2, 8), generator=gen)
        y = (3 * x + 1) % 32
        y[:, 0] = datalib.IGNORE_INDEX  # some targets that do not count
        with ops():
            loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_training_follows_the_reference_path(interpreter_path):
    """Liger's convergence test, with FlashAttention's error rule: the same tiny GPT trained for two dozen
    AdamW steps on the fused path (the Triton kernels forward and backward, interpreted) and on the
    reference path (PyTorch) from the same seed. Measured against the same training in float64, the
    fused run's loss at every step and its final weights (each tensor, relative to its largest entry) are
    within 3x the deviation of PyTorch's own fp32 run, or one fp32 rounding where that is smaller."""
    import contextlib

    import kernels

    fused, fused_w = _train_tiny(contextlib.nullcontext)
    ref, ref_w = _train_tiny(kernels.reference_ops)
    ref64, ref64_w = _train_tiny(kernels.reference_ops, dtype=torch.float64)
    assert np.mean(ref64[-4:]) < np.mean(ref64[:4]) - 0.5, ref64  # it does learn
    eps = torch.finfo(torch.float32).eps
    ref_dev = 0.0
    for step, (a, b, c) in enumerate(zip(fused, ref, ref64)):
        ref_dev = max(ref_dev, abs(b - c))  # the reference's deviation so far
        assert abs(a - c) <= max(3 * ref_dev, eps * abs(c)), (step, a, b, c)
    for name in fused_w:
        got, peer = max_rel_err(fused_w[name], ref64_w[name]), max_rel_err(ref_w[name], ref64_w[name])
        assert got <= max(3 * peer, eps), f"{name}: {got:.3g} vs PyTorch's {peer:.3g}"


def test_ops_path_and_dropout_are_logged(tmp_path, reference_path):
    from fastgpt.train import ops_path

    assert "--reference-ops" in ops_path(torch.device("cpu"), True)
    assert "chunked linear cross-entropy" in ops_path(torch.device("cpu"), False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert "Triton kernels, forward and backward" in ops_path(torch.device("cpu"), False)
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, seed=4)
    log = io.StringIO()
    result = train(tiny_config(tmp_path / "run", corpus, max_steps=2, eval_interval=0, dropout=0.2,
                               reference_ops=True), stream=log)
    assert "dropout 0.2" in log.getvalue() and "--reference-ops" in log.getvalue()
    saved = json.load(open(os.path.join(result.out_dir, "config.json")))
    assert saved["resid_pdrop"] == saved["embd_pdrop"] == 0.2 and saved["attn_pdrop"] == 0.0


def test_compile_trains_as_eager(tmp_path, reference_path):
    """--compile: the compiled forward + fused loss (and its compiled backward) take the steps eager takes."""
    torch._dynamo.reset()
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, seed=4)
    runs = {}
    for compiled in (False, True):
        log = io.StringIO()
        runs[compiled] = train(tiny_config(tmp_path / f"run{compiled}", corpus, max_steps=3, eval_interval=0,
                                           eval_iters=1, compile=compiled), stream=log)
    torch._dynamo.reset()
    assert "torch.compile'd" in log.getvalue()
    for a, b in zip(runs[True].losses, runs[False].losses):
        assert abs(a - b) <= 1e-5 * abs(b), (runs[True].losses, runs[False].losses)
    assert runs[True].evals[-1]["val_loss"] == pytest.approx(runs[False].evals[-1]["val_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- data
def test_token_file_is_a_memmap_of_the_smallest_dtype(tiny_run):
    _, result = tiny_run
    vocab = Tokenizer.from_pretrained(result.out_dir).vocab_size
    path = os.path.join(result.out_dir, "data", "train.bin")
    tokens = datalib.open_tokens(path, vocab)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert os.path.getsize(path) == 2 * len(tokens) and int(tokens.max()) < vocab
    assert datalib.token_dtype(65535) == np.uint16 and datalib.token_dtype(65536) == np.uint32


@pytest.mark.parametrize("case", ["empty", "missing", "not_utf8", "blank_folder", "bad_jsonl", "jsonl_keys"])
def test_bad_data_is_a_clear_error(tmp_path, capsys, case):
    path = tmp_path / "data.txt"
    expected = str(path)
    if case == "empty":
        path.write_text("  \n")
        message = "empty file"
    elif case == "missing":
        message = "not found"
    elif case == "not_utf8":
        path.write_bytes("caf\u00e9 ".encode("utf-8") + b"\xff\xfe latin")
        message = "not UTF-8"
    elif case == "blank_folder":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "a.txt").write_text("")
        expected, message = str(path), "no text"
    elif case == "bad_jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
        expected, message = f"{path}:2", "not valid JSON"
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"prompt": "a", "answer": "b"}\n')
        expected, message = f"{path}:1", '"completion"'
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        datalib.read_documents([str(path)])
    assert expected in str(info.value) and message in str(info.value)
    # the CLI: one line on stderr, status 2, no traceback
    rc = main(["train", "--data", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fastgpt: error:") and expected in err
    assert "Traceback" not in err


def test_train_without_data_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err


def test_jsonl_loss_counts_the_completion_only(tmp_path, reference_path):
    rng = random.Random(11)
    pairs = [{"prompt": f"Q: what does the {rng.choice(SUBJECTS)} do?\nA:",
              "completion": f" it {rng.choice(VERBS)} the {rng.choice(OBJECTS)}."} for _ in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs) + "\n", encoding="utf-8")
    docs = datalib.read_documents([str(path)])
    assert [(d.prompt, d.text) for d in docs] == [(p["prompt"], p["completion"]) for p in pairs]
    tokenizer = Tokenizer.train((t for p in pairs for t in p.values()), vocab_size=300)
    tokens, mask = datalib.encode_documents(tokenizer, docs)
    assert mask is not None and len(mask) == len(tokens)

    # the mask is 0 exactly over each prompt's tokens, 1 over its completion and the <|endoftext|> after it
    expected_mask, pos = [], 0
    for p in pairs:
        n_prompt, n_completion = len(tokenizer.encode(p["prompt"])), len(tokenizer.encode(p["completion"])) + 1
        expected_mask += [0] * n_prompt + [1] * n_completion
        assert tokenizer.decode(tokens[pos + n_prompt:pos + n_prompt + n_completion]) == \
            p["completion"] + "<|endoftext|>"
        pos += n_prompt + n_completion
    assert mask.tolist() == expected_mask

    # targets under a prompt are ignored, so the loss is the mean over completion targets alone
    x, y = datalib.sample_batch(tokens, mask, 6, 24, torch.Generator().manual_seed(4))
    counts = y != datalib.IGNORE_INDEX
    assert 0 < int(counts.sum()) < y.numel()
    from fastgpt import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY_MODEL))
    with torch.no_grad():
        loss, n = loss_sum_and_count(model, x, y)
        per_token = F.cross_entropy(model(x).flatten(0, 1), y.clamp(min=0).flatten(), reduction="none")
    assert n == int(counts.sum())
    torch.testing.assert_close(loss, per_token[counts.flatten()].sum(), rtol=FP32_TOL, atol=FP32_TOL)

    # and a fine-tuning run on the pairs goes end to end
    result = train(TrainConfig(out_dir=str(tmp_path / "run"), data=[str(path)], vocab_size=300, **TINY_MODEL,
                               block_size=24, batch_size=4, max_steps=4, warmup_steps=1, eval_interval=0,
                               eval_iters=2, val_fraction=0.1), stream=open(os.devnull, "w"))
    assert result.step == 4 and os.path.exists(os.path.join(result.out_dir, "data", "train.mask.bin"))


# ------------------------------------------------------------------------------------ bundled model
def test_bundled_model_beats_a_uniform_guess_on_held_out_stdlib_text(reference_path):
    model_dir = default_model_dir()
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    assert size <= 10 * 2**20, f"the bundled model takes {size / 2**20:.1f} MiB"
    model = GPT.from_pretrained(model_dir)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    tokenizer = Tokenizer.from_pretrained(model_dir)
    assert tokenizer.vocab_size == model.config.vocab_size
    run = json.load(open(os.path.join(model_dir, "training.json")))["config"]
    assert run["corpus"] == "stdlib"

    # the documents the training run held out (chosen by name, so only those are parsed)
    held_out = datalib.stdlib_documents(keep=lambda name: datalib.is_validation_name(name, run["val_fraction"]))
    assert len(held_out) >= 10
    tokens, _ = datalib.encode_documents(tokenizer, held_out)
    val_loss = evaluate(model, tokens, None, batch_size=8, block_size=min(128, model.config.n_positions), iters=2,
                        seed=0, device=torch.device("cpu"))
    uniform = math.log(tokenizer.vocab_size)
    print(f"bundled model: held-out stdlib loss {val_loss:.3f} vs uniform log(V) {uniform:.3f}")
    assert val_loss < uniform - 2.5  # a perplexity under 1/12 of a uniform guess's


def test_transformers_loads_the_bundled_model(reference_path):
    transformers = pytest.importorskip("transformers")
    model_dir = default_model_dir()
    ours = GPT.from_pretrained(model_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(model_dir).encode("Return the number of items in a list.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=FP32_TOL, atol=1e-4)


def test_generate_with_the_bundled_model_offline(reference_path):
    prompt = "The list type"
    done = subprocess.run([sys.executable, "-m", "fastgpt", "generate", "--prompt", prompt, "--max-new-tokens",
                           "24", "--device", "cpu", "--seed", "1"], capture_output=True, text=True,
                          env=python_env(), cwd=os.path.dirname(default_model_dir()))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(prompt) and len(done.stdout.strip()) > len(prompt) + 10
