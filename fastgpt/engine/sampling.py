"""Sampling a batch in which every row has its own parameters and, when seeded, its own generator.

Each row is drawn with the exponential race: token = argmax(p / E) with E ~ Exp(1) drawn per token,
which picks token i with probability p_i (the same distribution as torch.multinomial), in one batched
argmax. The noise of a seeded row comes from that row's generator alone and its logits are its own, so
the row gives the same tokens whatever else is in the batch; unseeded rows share the engine's generator.

Greedy rows (temperature 0) take the argmax of the raw logits. Top-k keeps the k highest-ranked tokens;
top-p drops a token once the tokens ranked above it hold more than p of the mass (as
fastgpt.generate.sample does; the first token always stays); both after temperature. Log-probabilities
are always those of the raw distribution, log_softmax(logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgpt.engine.params import SamplingParams


@dataclass
class SampleRows:
    """What to draw: sample s uses logits row rows[s] with params[s] and generators[s] (None: shared)."""

    rows: list[int]
    params: list[SamplingParams]
    generators: list[torch.Generator | None]


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # per sample: the chosen token's, when its request asked for logprobs
    top_logprobs: list[dict[int, float] | None]


def _filter_top_k_top_p(x: torch.Tensor, top_k: list[int | None], top_p: list[float]) -> torch.Tensor:
    """x (S, V) scaled logits -> the same with the tokens outside each row's top-k / top-p at -inf."""
    S, V = x.shape
    sorted_x, order = x.sort(dim=-1, descending=True)
    k = torch.tensor([V if t is None else min(t, V) for t in top_k], device=x.device)
    drop = torch.arange(V, device=x.device)[None, :] >= k[:, None]  # (S, V), in rank order
    if any(p < 1 for p in top_p):
        probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # rows without top-p get p = inf: rounding in the cumulative sum must not cut their tail
        p = torch.tensor([q if q < 1 else float("inf") for q in top_p], dtype=probs.dtype, device=x.device)
        drop |= probs.cumsum(dim=-1) - probs > p[:, None]
    return x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))


@torch.inference_mode()
def sample(logits: torch.Tensor, what: SampleRows, shared: torch.Generator | None = None) -> Sampled:
    """Draw one token per sample from logits (R, V)."""
    S = len(what.rows)
    if what.rows != list(range(logits.shape[0])):  # several samples of one row (n > 1) or rows left out
        logits = logits[torch.tensor(what.rows, device=logits.device)]
    acc = torch.promote_types(logits.dtype, torch.float32)
    tokens = logits.argmax(dim=-1)  # the greedy rows' answer, overwritten for the others
    drawn = [s for s in range(S) if not what.params[s].greedy]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        temps = torch.tensor([what.params[s].temperature for s in drawn], dtype=acc, device=logits.device)
        x = logits[idx].to(acc) / temps[:, None]
        top_k = [what.params[s].top_k for s in drawn]
        top_p = [what.params[s].top_p for s in drawn]
        if any(k is not None for k in top_k) or any(p < 1 for p in top_p):
            x = _filter_top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, s in enumerate(drawn) if what.generators[s] is None]
        if unseeded:  # one draw for all of them
            noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), dtype=acc,
                                          device=probs.device).exponential_(generator=shared)
        for j, s in enumerate(drawn):
            if what.generators[s] is not None:
                noise[j].exponential_(generator=what.generators[s])
        noise.clamp_(min=torch.finfo(acc).tiny)  # a 0 would turn a dropped token's 0 / 0 into NaN
        tokens[idx] = (probs / noise).argmax(dim=-1)
    token_list = tokens.tolist()

    logprobs: list[float | None] = [None] * S
    top: list[dict[int, float] | None] = [None] * S
    wanted = [s for s in range(S) if what.params[s].logprobs is not None]
    if wanted:
        idx = torch.tensor(wanted, device=logits.device)
        lp = torch.log_softmax(logits[idx].to(acc), dim=-1)  # the raw distribution
        chosen = lp.gather(1, tokens[idx, None])[:, 0].tolist()
        k_max = max(what.params[s].logprobs for s in wanted)
        top_v, top_i = (lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long()))
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, s in enumerate(wanted):
            k = what.params[s].logprobs
            logprobs[s] = chosen[j]
            top[s] = dict(zip(top_i[j][:k], top_v[j][:k]))
    return Sampled(token_list, logprobs, top)
