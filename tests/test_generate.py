"""Generation: greedy parity with transformers, cache vs. recompute, sampling semantics, EOS, bad input."""

import pytest
import torch

from fastgpt import GPT
from fastgpt.generate import sample
from helpers import greedy_by_full_forward, make_hf_checkpoint, random_ids
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

NEW_TOKENS = 25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(dir, hf_model): a tiny random GPT-2 with odd sizes (vocab 211, context 72, 3 layers of 3 heads)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("gen"), seed=7, vocab_size=211, n_embd=48, n_head=3,
                              n_layer=3, n_positions=72)


@pytest.fixture(scope="module")
def model(checkpoint):
    return GPT.from_pretrained(checkpoint[0])


def _assert_varied(new_tokens: torch.Tensor) -> None:
    """Guard the strength of the parity tests: a row stuck on one token would prove little."""
    for row in new_tokens:
        assert len(set(row.tolist())) >= 4, f"degenerate test model: greedy emits {row.tolist()}"


def _hf_greedy(hf_model, ids, n, unused_token):
    """transformers' greedy generate, told that EOS and padding are a token it never emits, so it runs
    the full n steps (its default EOS would otherwise stop it)."""
    with torch.no_grad():
        return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=unused_token, pad_token_id=unused_token)


@pytest.mark.parametrize("batch, prompt_len", [(1, 16), (2, 9)])
def test_greedy_matches_transformers(reference_path, checkpoint, model, batch, prompt_len):
    _, hf_model = checkpoint
    ids = random_ids(batch, prompt_len, model.config.vocab_size, seed=prompt_len)
    ours = model.generate(ids, NEW_TOKENS)
    assert ours.shape == (batch, prompt_len + NEW_TOKENS)
    assert torch.equal(ours[:, :prompt_len], ids)
    _assert_varied(ours[:, prompt_len:])
    unused = next(t for t in range(model.config.vocab_size) if not (ours == t).any())
    theirs = _hf_greedy(hf_model, ids, NEW_TOKENS, unused)
    assert theirs.shape == ours.shape
    assert ours.tolist() == theirs.tolist()


def test_greedy_matches_transformers_through_triton_kernels(interpreter_path, checkpoint, model):
    """Prefill (flash attention), decode (split-KV attention), layer norm and MLP kernels all run, under
    Triton's interpreter; a short case to keep the interpreter's time small."""
    _, hf_model = checkpoint
    ids = random_ids(2, 7, model.config.vocab_size, seed=7)
    ours = model.generate(ids, 6)
    assert ours.tolist() == greedy_by_full_forward(hf_model, ids, 6).tolist()


@pytest.mark.parametrize("batch, prompt_len", [(1, 1), (3, 13)])
def test_cached_generation_equals_full_recompute(reference_path, model, batch, prompt_len):
    ids = random_ids(batch, prompt_len, model.config.vocab_size, seed=100 + prompt_len)
    ours = model.generate(ids, NEW_TOKENS)
    _assert_varied(ours[:, prompt_len:])
    assert ours.tolist() == greedy_by_full_forward(model, ids, NEW_TOKENS).tolist()


def test_reused_cache_gives_the_same_tokens(reference_path, checkpoint, model):
    """A second call reuses the (larger) cache left by the first; stale entries must not leak in."""
    small = random_ids(1, 5, model.config.vocab_size, seed=55)
    fresh = GPT.from_pretrained(checkpoint[0]).generate(small, 20)
    model.generate(random_ids(3, 30, model.config.vocab_size, seed=56), 30)  # fills a bigger cache
    assert model.generate(small, 20).tolist() == fresh.tolist()


def test_stream_yields_the_generated_columns(reference_path, model):
    ids = random_ids(2, 6, model.config.vocab_size, seed=8)
    steps = list(model.stream(ids, 10))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.stack(steps, dim=1).tolist() == model.generate(ids, 10)[:, 6:].tolist()


def test_zero_new_tokens_returns_the_prompt(reference_path, model):
    ids = random_ids(2, 4, model.config.vocab_size, seed=4).int()
    out = model.generate(ids, 0)
    assert out.dtype == torch.int64 and out.tolist() == ids.tolist()


def test_int32_prompt_is_accepted(reference_path, model):
    ids = random_ids(1, 8, model.config.vocab_size, seed=10)
    assert model.generate(ids.int(), 5).tolist() == model.generate(ids, 5).tolist()


# ------------------------------------------------------------------------------------------- sampling
def test_top_k_1_sampling_equals_greedy(reference_path, model):
    ids = random_ids(2, 10, model.config.vocab_size, seed=11)
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, NEW_TOKENS, temperature=1.0, top_k=1, generator=gen)
    assert sampled.tolist() == model.generate(ids, NEW_TOKENS).tolist()


def test_tiny_top_p_equals_greedy(reference_path, model):
    ids = random_ids(2, 10, model.config.vocab_size, seed=12)
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, NEW_TOKENS, temperature=1.0, top_p=1e-6, generator=gen)
    assert sampled.tolist() == model.generate(ids, NEW_TOKENS).tolist()


def test_seeded_sampling_is_reproducible(reference_path, model):
    ids = random_ids(2, 10, model.config.vocab_size, seed=13)

    def run(seed, **kw):
        return model.generate(ids, NEW_TOKENS, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert run(1).tolist() == run(1).tolist()
    assert run(1, top_k=20, top_p=0.9).tolist() == run(1, top_k=20, top_p=0.9).tolist()
    # 2 x 25 draws at temperature 1 over 211 tokens: two seeds agreeing on all of them is (almost) impossible
    assert run(1).tolist() != run(2).tolist()
    assert run(1).tolist() != model.generate(ids, NEW_TOKENS).tolist()  # and sampling is not greedy


def _skewed_logits(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits with a clear ranking; returns (logits (V,), token ids sorted by probability)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=gen) * 3
    return logits, logits.argsort(descending=True)


def test_sample_top_k_keeps_exactly_the_k_most_likely():
    logits, ranked = _skewed_logits(37, seed=0)
    gen = torch.Generator().manual_seed(0)
    drawn = sample(logits.expand(4000, -1), temperature=2.0, top_k=3, generator=gen)
    assert set(drawn.tolist()) == set(ranked[:3].tolist())


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    logits, ranked = _skewed_logits(37, seed=1)
    probs = logits.softmax(-1)[ranked]
    # the nucleus for p: the fewest top tokens whose mass reaches p (the token that crosses p is kept)
    p = float(probs[:3].sum() - probs[2] / 2)  # halfway into the 3rd token's mass -> 3 tokens
    gen = torch.Generator().manual_seed(0)
    drawn = sample(logits.expand(4000, -1), temperature=1.0, top_p=p, generator=gen)
    assert set(drawn.tolist()) == set(ranked[:3].tolist())
    # top_p = 1 keeps everything that has noticeable mass: more than 3 distinct tokens appear
    drawn_all = sample(logits.expand(4000, -1), temperature=1.0, top_p=1.0, generator=gen)
    assert len(set(drawn_all.tolist())) > 3


def test_sample_frequencies_follow_the_renormalised_distribution():
    logits, ranked = _skewed_logits(11, seed=2)
    n = 20000
    gen = torch.Generator().manual_seed(3)
    drawn = sample(logits.expand(n, -1), temperature=1.5, top_k=4, generator=gen)
    kept = ranked[:4]
    expected = (logits[kept] / 1.5).softmax(-1)
    observed = torch.stack([(drawn == t).float().mean() for t in kept])
    # binomial standard error is <= 0.0036 for n = 20000; 5 sigma
    assert (observed - expected).abs().max() < 5 * 0.0036


def test_temperature_zero_is_argmax_whatever_top_k_and_top_p():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(4))
    assert sample(logits, temperature=0.0, top_k=7, top_p=0.3).tolist() == logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------------ EOS
def _expected_with_eos(greedy_new: torch.Tensor, eos: int) -> torch.Tensor:
    """From the greedy tokens generated without EOS: each row cut after its first EOS and filled with EOS;
    the sequence ends at the step where the last row emits EOS (or runs the full length)."""
    rows, ends = [], []
    for row in greedy_new.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:end] + [eos] * (len(row) - end))
        ends.append(end if eos in row else len(row))
    return torch.tensor(rows)[:, :max(ends)]


def test_eos_stops_when_the_only_row_emits_it(reference_path, model):
    ids = random_ids(1, 9, model.config.vocab_size, seed=20)
    greedy = model.generate(ids, NEW_TOKENS)
    eos = int(greedy[0, 9])  # the first token greedy emits
    out = model.generate(ids, NEW_TOKENS, eos_token_id=eos)
    assert out.tolist() == greedy[:, :10].tolist()


@pytest.mark.parametrize("eos_from", ["row 0 first token", "row 1 fifth token"])
def test_eos_rows_are_filled_and_generation_stops_when_all_are_done(reference_path, model, eos_from):
    ids = random_ids(3, 9, model.config.vocab_size, seed=21)
    greedy_new = model.generate(ids, NEW_TOKENS)[:, 9:]
    eos = int(greedy_new[0, 0]) if eos_from == "row 0 first token" else int(greedy_new[1, 4])
    out = model.generate(ids, NEW_TOKENS, eos_token_id=eos)
    assert out[:, :9].tolist() == ids.tolist()
    assert out[:, 9:].tolist() == _expected_with_eos(greedy_new, eos).tolist()


def test_eos_stops_when_every_row_has_emitted_it(reference_path, model):
    """Two identical rows emit the same first token; with it as EOS both finish at step 1."""
    row = random_ids(1, 9, model.config.vocab_size, seed=22)
    ids = row.expand(2, -1).contiguous()
    eos = int(model.generate(row, 1)[0, -1])
    out = model.generate(ids, NEW_TOKENS, eos_token_id=eos)
    assert out.shape == (2, 10) and out[:, -1].tolist() == [eos, eos]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("ids, kwargs, message", [
    ("ok", dict(max_new_tokens=60), "prompt of 13 tokens \\+ 60 new tokens exceeds the context length 72"),
    ("ok", dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    ("ok", dict(temperature=float("nan")), "temperature must be >= 0"),
    ("ok", dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
    ("ok", dict(top_p=1.5), "top_p must be in \\(0, 1\\], got 1.5"),
    ("ok", dict(top_p=-0.1), "top_p must be in \\(0, 1\\]"),
    ("ok", dict(top_k=0), "top_k must be an integer >= 1, got 0"),
    ("ok", dict(top_k=2.5), "top_k must be an integer >= 1"),
    ("ok", dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    ("ok", dict(eos_token_id=211), "eos_token_id 211 is outside the vocabulary \\[0, 211\\)"),
    ("too big", {}, "token id 211 is outside the vocabulary \\[0, 211\\)"),
    ("negative", {}, "token id -3 is outside the vocabulary"),
    ("empty", {}, "empty prompt"),
    ("no rows", {}, "empty prompt"),
    ("1-D", {}, "input_ids must be 2-D"),
])
def test_bad_input_raises_value_error(reference_path, model, ids, kwargs, message):
    good = random_ids(2, 13, model.config.vocab_size, seed=30)
    prompts = {
        "ok": good,
        "too big": torch.cat([good[:, :5], torch.full((2, 1), 211), good[:, 5:]], dim=1),
        "negative": torch.cat([good, torch.full((2, 1), -3)], dim=1),
        "empty": torch.zeros(1, 0, dtype=torch.long),
        "no rows": torch.zeros(0, 5, dtype=torch.long),
        "1-D": good[0],
    }
    kwargs = {"max_new_tokens": 5, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        model.generate(prompts[ids], n, **kwargs)


def test_float_token_ids_raise_type_error(reference_path, model):
    with pytest.raises(TypeError, match="integer token ids"):
        model.generate(torch.rand(1, 4), 3)
