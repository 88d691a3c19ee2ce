"""Shared test utilities: tiny random GPT-2 checkpoints made with transformers, and a tiny tokenizer.

Everything here is seeded, so a failing test fails the same way on every run. The checkpoints are
written by ``transformers`` itself (``save_pretrained``), so loading them tests fastgpt against the
real on-disk format, Conv1D layouts included.
"""

from __future__ import annotations

import os

import pytest
import torch

# A little text with some repetition (so BPE learns merges), unicode, emoji and whitespace runs.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "Once upon a time there was a small model that wanted to be fast, faster, fastest.",
    "def forward(self, x):\n    return self.linear(x)  # the model   is   tiny\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u00fcber \u65e5\u672c\u8a9e "
    "\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \U0001F600\U0001F680",
    "tokens, tokens and more tokens: 1234567890 3.14159 2.71828\t\ttabs\n\n\nnewlines",
] * 20

# Strings the tokenizer tests encode; none is in the training text verbatim.
SAMPLE_STRINGS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "The fox and the dog are friends.",
    "mixed\ttabs\nand\n\n\nnewlines   runs",
    "emoji \U0001F600\U0001F680 and \U0001F9EA in a row",
    "Caf\u00e9 \u00fcber \u65e5\u672c\u8a9e \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u00e9\u00e8\u00ea",
    "unseen bytes: \u00a7\u00b6\u2603 \x00\x7f",
    "x",
    "",
]

TINY = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)


def train_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained by fastgpt.Tokenizer.train on TRAINING_TEXT (well under a second)."""
    from fastgpt import Tokenizer

    return Tokenizer.train(TRAINING_TEXT, vocab_size=vocab_size, min_frequency=2)


def make_hf_model(seed: int = 0, vocab_size: int = 101, eos_token_id: int | None = None, **config):
    """A transformers GPT2LMHeadModel with seeded random weights that are *not* near-uniform.

    HF's own init (std 0.02) gives logits so flat that the greedy choice hangs on rounding. With the
    scales here (std 0.2) the top-2 logit gap along greedy paths stays ~1e-2 or more, far above fp32
    rounding, and greedy does not collapse into repeating the last token (as it does when the tied
    embeddings dominate), so greedy-parity tests compare real, varied choices. Dropout is off.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    cfg = GPT2Config(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **{**TINY, **config})
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_hf_checkpoint(path, seed: int = 0, vocab_size: int = 101, tokenizer=None,
                       safe_serialization: bool = True, **config):
    """Write a tiny random HF GPT-2 checkpoint dir with transformers; return (path, hf_model).

    With a fastgpt Tokenizer the vocab size follows it and its files are saved too (for the CLI).
    """
    path = os.fspath(path)
    if tokenizer is not None:
        vocab_size = tokenizer.vocab_size
        config.setdefault("eos_token_id", tokenizer.eos_token_id)
    model = make_hf_model(seed=seed, vocab_size=vocab_size, **config)
    model.save_pretrained(path)
    if not safe_serialization:
        # transformers 5 always writes safetensors; older versions (and the original gpt2 upload) wrote
        # a torch.save'd state dict, so make that file the way they did and drop the safetensors one
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        os.remove(os.path.join(path, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(path)
    return path, model


def random_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: relative to the scale of the expected tensor (robust to entries near 0)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def greedy_by_full_forward(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: the whole sequence through the model every step, no cache.

    Works for a fastgpt GPT and for a transformers GPT2LMHeadModel alike.
    """
    ids = input_ids.long()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(ids)
            logits = getattr(out, "logits", out)[:, -1]  # transformers returns an output object
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU every parallel region
    waits for a descheduled thread (measured: a 1-query attention took 16 ms with 2 threads, 0.02 ms
    with 1). Imported by the test modules, so it applies to them only; the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grad_errors(ours, peer, tensors: dict, seed: int = 0) -> tuple[dict, dict]:
    """Gradients of ours(**tensors) and of peer(**tensors) (PyTorch's autograd in the same dtype), each
    against peer(**float64 copies): ({name: max |g - g64| / max |g64|} for ours, the same for peer).

    Every tensor that requires grad is a leaf of all three runs. Each output gets the same seeded random
    gradient, rounded to that output's dtype (the float64 run uses the rounded values), so the errors
    measure the backward alone. Outputs may be a tensor or a tuple of tensors.
    """
    def run(fn, upcast):
        leaves = {k: (v.detach().double() if upcast else v.detach()).requires_grad_(v.requires_grad)
                  if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in tensors.items()}
        out = fn(**leaves)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(seed)
        grads = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
        dtypes = dtypes_seen.setdefault("outs", [o.dtype for o in outs])
        grads = [g.to(dt).to(o.dtype) for g, dt, o in zip(grads, dtypes, outs)]
        torch.autograd.backward(outs, grads)
        return {k: leaves[k].grad for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad}

    dtypes_seen: dict = {}
    g_ours = run(ours, upcast=False)
    g_peer = run(peer, upcast=False)
    g64 = run(peer, upcast=True)
    for k, g in g_ours.items():
        assert g is not None, f"no gradient for {k}"
        assert g.dtype == tensors[k].dtype, f"d{k} has dtype {g.dtype}, {k} has {tensors[k].dtype}"
    return ({k: max_rel_err(g_ours[k], g64[k]) for k in g_ours}, {k: max_rel_err(g_peer[k], g64[k]) for k in g_peer})


def assert_grads_within(ours: dict, peer: dict, dtype: torch.dtype, factor: float = 3.0) -> None:
    """FlashAttention's rule: each gradient's error at most `factor` x PyTorch's own same-dtype error, or
    one rounding of the dtype (its unit roundoff) where PyTorch happens to be exact."""
    floor = torch.finfo(dtype).eps / 2
    bad = {k: (f"{ours[k]:.3g}", f"{peer[k]:.3g}") for k in ours if not ours[k] <= max(factor * peer[k], floor)}
    assert not bad, f"gradient errors (ours, PyTorch's) above {factor}x PyTorch's: {bad}"
