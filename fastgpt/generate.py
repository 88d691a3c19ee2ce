"""Generation: prefill the prompt once, then one token per row per step from the static KV cache.

    prefill(model, prompt)            -> logits of the last prompt position (B, V)
    decode_one_token(model, tok, pos) -> logits of the next position (B, V)
    sample(logits, ...)               -> next token ids (B,)

``generate`` returns the whole sequence; ``stream`` yields each step's tokens as they are chosen.
"""

from __future__ import annotations

from typing import Iterator

import torch


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 is greedy (top_k / top_p then moot)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first is kept)
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the whole prompt (B, T) from position 0, filling the caches; return last logits (B, V)."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model(input_ids, input_pos=input_pos, last_only=True)[:, -1]


def decode_one_token(model, tokens: torch.Tensor, input_pos: torch.Tensor,
                     cache_seqlens: torch.Tensor) -> torch.Tensor:
    """One step: tokens (B,) at position input_pos (1,); return the next logits (B, V)."""
    return model(tokens[:, None], input_pos=input_pos, cache_seqlens=cache_seqlens)[:, -1]


def _validate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    V, ctx = model.config.vocab_size, model.config.n_positions
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {V})")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    if T + max_new_tokens > ctx:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context length {ctx}")
    validate_sampling(temperature, top_k, top_p)
    if eos_token_id is not None and not 0 <= eos_token_id < V:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {V})")
    if input_ids.device != model.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {model.device}")
    if generator is not None and temperature > 0 and generator.device.type != model.device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {model.device}; "
                         f"use torch.Generator(device=model.device)")


@torch.inference_mode()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) step by step; rows that emitted eos_token_id keep emitting it,
    and the stream ends when every row has (or after max_new_tokens)."""
    _validate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    if max_new_tokens == 0:
        return
    B, T = input_ids.shape
    input_ids = input_ids.long()
    model.setup_caches(max_batch=B, max_len=T + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = prefill(model, input_ids)
    input_pos = torch.tensor([T], device=input_ids.device)
    cache_seqlens = torch.full((B,), T + 1, dtype=torch.int32, device=input_ids.device)
    for step in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(done, eos_token_id)
            done |= tokens == eos_token_id
        yield tokens
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            return
        logits = decode_one_token(model, tokens, input_pos, cache_seqlens)
        input_pos += 1
        cache_seqlens += 1


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt (B, T) -> LongTensor (B, T + n), prompt included, n <= max_new_tokens (fewer only when
    every row has emitted eos_token_id). temperature 0 is greedy; pass a seeded ``generator`` for
    reproducible sampling."""
    steps = list(stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator))
    if not steps:
        return input_ids.long().clone()
    return torch.cat([input_ids.long(), torch.stack(steps, dim=1)], dim=1)
