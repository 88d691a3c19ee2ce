"""The engine: greedy outputs equal GPT.generate on each prompt alone (float64, so batch composition cannot
flip a near-tie) under every scheduling regime, and sampling, stops, logprobs, errors and aborts behave."""

import pytest
import torch

from fastgpt import GPT, CompletionOutput, Engine, RequestOutput, SamplingParams, Tokenizer
from fastgpt.engine.sequence import Request, Sequence, add_text
from helpers import make_hf_checkpoint, random_ids, train_tiny_tokenizer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

VOCAB = 101
# ragged prompts (1 to a few hundred tokens, block boundaries on both sides) with different max_tokens
LENGTHS = [1, 2, 16, 17, 63, 150, 301]
MAX_TOKENS = [9, 30, 5, 16, 24, 12, 20]


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("engine"), seed=3, vocab_size=VOCAB, n_positions=512)
    return GPT.from_pretrained(path, dtype=torch.float64)


@pytest.fixture(scope="module")
def prompts():
    return [random_ids(1, n, VOCAB, seed=100 + n)[0].tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(model64, prompts):
    """GPT.generate on each prompt alone (dense cache), greedy, the full max_tokens (no EOS stop)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        return [model64.generate(torch.tensor([p]), m)[0, len(p):].tolist() for p, m in zip(prompts, MAX_TOKENS)]


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_greedy(engine, prompts):
    outs = engine.generate(prompts, [greedy(m) for m in MAX_TOKENS[:len(prompts)]])
    assert [o.finished for o in outs] == [True] * len(prompts)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_ragged_batch_equals_generate_alone(reference_path, model64, prompts, expected):
    engine = Engine(model64, num_blocks=128)
    assert run_greedy(engine, prompts) == expected
    s = engine.stats()
    assert s["preemptions"] == 0 and s["free_blocks"] == s["total_blocks"] == 128
    assert s["running"] == s["waiting"] == 0 and not engine.has_unfinished_requests()


def test_greedy_with_preemption(reference_path, model64, prompts, expected):
    # 20 blocks of 16 hold the longest sequence (301 + 19 tokens) alone: the first six prompts take 19 of
    # them, and their decodes need 4 more
    engine = Engine(model64, num_blocks=20, max_num_batched_tokens=4096)
    assert run_greedy(engine, prompts) == expected
    s = engine.stats()
    assert s["preemptions"] > 0
    assert s["free_blocks"] == s["total_blocks"]


def test_greedy_with_chunked_prefill(reference_path, model64, prompts, expected):
    engine = Engine(model64, num_blocks=128, max_num_batched_tokens=7, block_size=5)  # odd, prime sizes
    assert run_greedy(engine, prompts) == expected
    assert engine.stats()["steps"] > sum(LENGTHS) // 7


def test_greedy_with_prefix_caching(reference_path, model64):
    base = random_ids(1, 100, VOCAB, seed=1)[0].tolist()
    shared = [base + random_ids(1, k, VOCAB, seed=k)[0].tolist() for k in (1, 7, 28)] + [base[:64], base[:64]]
    max_tokens = [6, 11, 3, 8, 8]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        want = [model64.generate(torch.tensor([p]), m)[0, len(p):].tolist() for p, m in zip(shared, max_tokens)]
    engine = Engine(model64, num_blocks=64)
    first = engine.generate([shared[0]], greedy(max_tokens[0]))  # computes the shared prefix once
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    rest = engine.generate(shared[1:], [greedy(m) for m in max_tokens[1:]])
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == want
    hits = engine.stats()["prefix_cache_hit_tokens"]
    # 6 blocks of the 100-token base for the two longer prompts; the 64-token prompt hits 3 blocks, never
    # its 4th (which holds its last token), twice (the first run of it cached nothing new to hit)
    assert hits == 2 * 96 + 2 * 48
    assert engine.stats()["free_blocks"] == 64  # cached blocks are free blocks too


def test_n_samples_share_the_prompt_blocks(reference_path, model64, prompts, expected):
    engine = Engine(model64, num_blocks=64)
    prompt, m = prompts[4], MAX_TOKENS[4]  # 63 tokens: 3 full blocks and a partial one
    engine.add_request("r", prompt, greedy(m, n=3))
    engine.step()  # the prefill; the first tokens of all three samples come from its logits
    seqs = engine.requests["r"].seqs
    assert len(seqs) == 3 and [len(s.token_ids) for s in seqs] == [len(prompt) + 1] * 3
    assert [s.block_table for s in seqs[1:]] == [seqs[0].block_table[:3]] * 2
    assert [engine.block_manager.blocks[b].ref_count for b in seqs[0].block_table] == [3, 3, 3, 1]
    engine.step()  # each sample recomputes the prompt's partial last block into a block of its own
    assert len({s.block_table[3] for s in seqs}) == 3
    while engine.has_unfinished_requests():
        outs = engine.step()
    out = outs[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [expected[4]] * 3  # greedy: all three are the same


def test_seeded_sampling_is_the_same_alone_and_batched(reference_path, model64, prompts):
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = Engine(model64, num_blocks=64).generate([prompts[3]], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=1.3, top_p=0.5, max_tokens=15, seed=7, ignore_eos=True), params]
    batched = Engine(model64, num_blocks=64, max_num_batched_tokens=40).generate(
        [prompts[5], prompts[1], prompts[3]], others)
    assert batched[2].outputs[0].token_ids == alone
    n3 = Engine(model64, num_blocks=64).generate([prompts[3]], SamplingParams(
        n=3, temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True))[0]
    samples = [c.token_ids for c in n3.outputs]
    assert samples[0] == Engine(model64, num_blocks=64).generate([prompts[3]], SamplingParams(
        temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True))[0].outputs[0].token_ids
    assert len({tuple(s) for s in samples}) == 3  # each sample has its own generator (seed + index)
    unseeded = Engine(model64, num_blocks=64).generate(
        [prompts[3]] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_logprobs_are_the_models_raw_log_softmax(reference_path, model64, prompts):
    engine = Engine(model64, num_blocks=64)
    prompt = prompts[3]
    # temperature 2 and top-k 5 shape the sampling, not the reported distribution
    out = engine.generate([prompt], SamplingParams(temperature=2.0, top_k=5, seed=0, max_tokens=6, logprobs=4,
                                                   ignore_eos=True))[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model64(ids)[0, len(prompt) - 1:-1], dim=-1)  # (6, V)
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(lp[i, tok].item(), abs=1e-10)
        top = lp[i].topk(4)
        assert list(out.top_logprobs[i]) == top.indices.tolist()
        assert list(out.top_logprobs[i].values()) == pytest.approx(top.values.tolist(), abs=1e-10)
        assert tok in lp[i].topk(5).indices.tolist()  # top_k=5 held
    plain = engine.generate([prompt], greedy(3))[0].outputs[0]
    assert plain.logprobs is None and plain.top_logprobs is None


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("max_tokens", 0), ("n", 0), ("logprobs", 21), ("logprobs", -1), ("stop", ""), ("stop", ["ok", ""]),
    ("seed", 1.5), ("stop_token_ids", [-1]),
])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_requests_raise_at_add_request_and_the_rest_still_run(reference_path, model64, prompts, expected):
    engine = Engine(model64, num_blocks=30, max_num_seqs=4)
    engine.add_request("a", prompts[2], greedy(MAX_TOKENS[2]))
    engine.add_request("b", prompts[5], greedy(MAX_TOKENS[5]))
    engine.step()
    before = engine.stats()
    bad = [
        ("a", prompts[0], greedy(3), "already in use"),
        ("c", [], greedy(3), "empty"),
        ("c", [1, VOCAB], greedy(3), "not a token id"),
        ("c", "text", greedy(3), "tokenizer"),
        ("c", prompts[0], SamplingParams(stop="x"), "tokenizer"),
        ("c", prompts[6], greedy(300), "context length 512"),
        ("c", prompts[0], greedy(512), "context length 512"),
        ("c", prompts[6], greedy(200), "KV-cache"),  # 500 tokens > 30 blocks of 16
        ("c", prompts[0], greedy(3, n=5), "max_num_seqs"),
        ("c", prompts[0], {"max_tokens": 3}, "SamplingParams"),
    ]
    for request_id, prompt, params, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            engine.add_request(request_id, prompt, params)
        assert engine.stats() == before
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["a"].outputs[0].token_ids == expected[2]
    assert done["b"].outputs[0].token_ids == expected[5]
    assert engine.stats()["free_blocks"] == 30


def test_abort_frees_blocks(reference_path, model64, prompts):
    engine = Engine(model64, num_blocks=64, max_num_batched_tokens=64)
    for i in (3, 5, 6):
        engine.add_request(f"r{i}", prompts[i], greedy(20))
    for _ in range(4):
        engine.step()
    free = engine.stats()["free_blocks"]
    engine.abort_request("r5")
    assert engine.stats()["free_blocks"] > free and "r5" not in engine.requests
    engine.abort_request("r5")  # unknown ids are ignored
    outs = engine.step()
    assert "r5" not in {o.request_id for o in outs}
    engine.abort_request("r3")
    engine.abort_request("r6")  # r6 may still be waiting for its prefill
    s = engine.stats()
    assert not engine.has_unfinished_requests() and s["running"] == s["waiting"] == 0
    assert s["free_blocks"] == 64 and engine.step() == []


def test_preempted_sequence_is_the_newest_and_goes_first_in_line(reference_path, model64, prompts):
    # both fit exactly: "old" fills 4 blocks of 16 and needs a 5th for its first decode, "new" holds the last
    engine = Engine(model64, num_blocks=5, max_num_batched_tokens=512)
    engine.add_request("old", random_ids(1, 64, VOCAB, seed=64)[0].tolist(), greedy(10))
    engine.add_request("new", prompts[1], greedy(10))
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["free_blocks"] == 0
    engine.step()
    assert engine.stats()["preemptions"] == 1
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["new"]
    assert [s.request.request_id for s in engine.scheduler.running] == ["old"]
    assert engine.requests["new"].seqs[0].num_computed == 0 and len(engine.requests["old"].seqs[0].block_table) == 5


def test_step_outputs_are_cumulative_request_outputs(reference_path, model64, prompts, expected):
    engine = Engine(model64, num_blocks=64)
    engine.add_request("x", prompts[1], greedy(MAX_TOKENS[1]))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert isinstance(out, RequestOutput) and isinstance(out.outputs[0], CompletionOutput)
            assert out.prompt_token_ids == prompts[1]
            seen.append(list(out.outputs[0].token_ids))
    assert [len(s) for s in seen] == list(range(1, MAX_TOKENS[1] + 1))
    assert seen[-1] == expected[1]


# --------------------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    tok = train_tiny_tokenizer()
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("engine_text"), seed=8, tokenizer=tok, n_positions=128)
    return Engine(GPT.from_pretrained(path, dtype=torch.float64), Tokenizer.from_pretrained(path), num_blocks=64)


def test_stop_string_spanning_tokens_ends_the_text_before_it(reference_path, text_engine):
    tok = text_engine.tokenizer
    prompt = "The quick brown fox"
    full = text_engine.generate([prompt], greedy(40))[0].outputs[0]
    assert full.text == tok.decode(full.token_ids)
    pieces = [tok.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-1] + pieces[k + 1][0]
    cut = full.text.find(stop)
    assert 0 <= cut
    params = greedy(40, stop=["never appears \u2603", stop])
    text_engine.add_request("s", prompt, params)
    reported = []
    while text_engine.has_unfinished_requests():
        for out in text_engine.step():
            reported.append(out.outputs[0].text)
    final = reported[-1]
    assert final == full.text[:cut] and out.outputs[0].finish_reason == "stop"
    assert all(final.startswith(r) for r in reported)  # what was reported is never taken back
    assert out.outputs[0].token_ids == full.token_ids[:len(out.outputs[0].token_ids)]


def test_stop_token_ids_and_eos(reference_path, text_engine):
    prompt = "Once upon a time"
    full = text_engine.generate([prompt], greedy(30))[0].outputs[0]
    target = full.token_ids[6]
    out = text_engine.generate([prompt], greedy(30, stop_token_ids=[target]))[0].outputs[0]
    first = full.token_ids.index(target)
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.text == text_engine.tokenizer.decode(full.token_ids[:first])  # the stop token is not text
    eos = text_engine.tokenizer.eos_token_id
    forced = text_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30,
                                                           stop_token_ids=[], ignore_eos=False))[0].outputs[0]
    assert (eos in forced.token_ids) == (forced.finish_reason == "stop")
    if eos in forced.token_ids:
        assert forced.token_ids[-1] == eos


def test_incremental_detokenisation_waits_for_whole_characters(text_engine):
    tok = text_engine.tokenizer
    text = "emoji \U0001F9EA and \u65e5\u672c\u8a9e done"  # a character the tokenizer never saw: bytes
    ids = tok.encode(text)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)  # some token ends mid-character
    request = Request("d", [0], SamplingParams(stop=["\u672c\u8a9e d"]), eos_token_id=None)
    seq = Sequence(request, 0, [0], None)
    for t in ids:
        seq.pending.append(t)
        add_text(seq, tok.decode(seq.pending), final=False)
        assert "\ufffd" not in seq.text
        if seq.finished:
            break
    assert seq.text == text[:text.index("\u672c\u8a9e d")] and seq.finish_reason == "stop"


def test_text_prompts_and_from_pretrained_default_model(reference_path, capsys):
    engine = Engine.from_pretrained(device="cpu", num_blocks=64)
    out = engine.generate("The os module", greedy(8), progress=True)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 8 and out[0].outputs[0].text
    assert out[0].prompt_token_ids == engine.tokenizer.encode("The os module")
    bar = capsys.readouterr().err
    assert "1/1" in bar and "output tok/s" in bar


@pytest.mark.parametrize("prepack", [True, False])
def test_cpu_engine_prepacks_fp32_weights_and_keeps_the_tokens(reference_path, monkeypatch, tmp_path, prepack):
    """On CPU the engine gives an fp32 model's projections packed copies (unless told not to), and its
    steps, all of them batches here, make the tokens GPT.generate makes on each prompt alone."""
    from kernels import reference

    monkeypatch.setattr(reference, "PACK_MIN_WEIGHT", 0)  # the test model's small weights are packed too
    path, _ = make_hf_checkpoint(tmp_path, seed=7, vocab_size=VOCAB, n_positions=512)
    model = GPT.from_pretrained(path)
    ps = [random_ids(1, n, VOCAB, seed=n)[0].tolist() for n in (5, 40, 97)]
    want = [model.generate(torch.tensor([p]), 6)[0, len(p):].tolist() for p in ps]
    engine = Engine(model, num_blocks=64, prepack_weights=prepack)
    x = torch.randn(2, model.config.n_embd)
    for w in (model.transformer.h[0].attn.c_attn.weight, model.transformer.h[-1].mlp.c_fc.weight,
              model.transformer.wte.weight):
        with torch.no_grad():  # as the engine's steps run
            packed = reference.linear_plan(x, w)[0] == "packed"
        assert packed == (prepack and torch.backends.mkldnn.is_available())
    assert [o.outputs[0].token_ids for o in engine.generate(ps, greedy(6))] == want


# ------------------------------------------------------------------------------------ Triton kernels
def test_greedy_through_the_triton_kernels(interpreter_path, tmp_path):
    """A small mixed batch (prefill chunks beside decodes) through whatever the public ops dispatch to
    under the interpreter, fp32, against GPT.generate under the interpreter too."""
    path, _ = make_hf_checkpoint(tmp_path, seed=5, vocab_size=VOCAB, n_embd=32, n_head=2, n_layer=1,
                                 n_positions=64)
    model = GPT.from_pretrained(path, cpu_decode_layout=False)
    ps = [random_ids(1, n, VOCAB, seed=n)[0].tolist() for n in (3, 21)]
    want = [model.generate(torch.tensor([p]), 4)[0, len(p):].tolist() for p in ps]
    engine = Engine(model, num_blocks=16, block_size=8, max_num_batched_tokens=12)
    assert [o.outputs[0].token_ids for o in engine.generate(ps, greedy(4))] == want


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, seed=5, vocab_size=VOCAB, n_positions=256)
    model = GPT.from_pretrained(path, device="cuda", dtype=torch.float32)
    engine = Engine(model, num_blocks=256, max_num_seqs=24)
    assert engine.runner.graphs is not None, engine.runner.graph_error
    ps = [random_ids(1, n, VOCAB, seed=n)[0].tolist() for n in (1, 5, 17, 40, 90)]
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, greedy(30))
    for _ in range(3):  # past the prefills: every row decodes
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_decodes == len(batch.seqs) == 5  # padded to the graph of 8
    replay = engine.runner.execute(batch).clone()
    eager = engine.runner.execute(batch, use_graphs=False)
    # fp32 tl.dot runs as TF32 on a GPU (~3e-4 relative per product), and the padded batch of 8 may take
    # other tiles and splits than the eager batch of 5: the same numbers to TF32 rounding, the same argmax
    assert (replay - eager).abs().max() <= 1e-3 * eager.abs().max()
    assert torch.equal(replay.argmax(-1), eager.argmax(-1))
