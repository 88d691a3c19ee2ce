"""From a validated request body to what the engine takes: prompt token ids and SamplingParams.

Everything the engine would refuse is refused here first, with a 400 that names the field: token ids
outside the vocabulary, a prompt that with max_tokens passes the context (OpenAI's
context_length_exceeded) or the KV cache, n past --max-num-seqs, a batch of prompts larger than the
server could ever hold. The ``model`` field is only ever compared with the served names (404 if none
matches); nothing here opens a path a client sends.
"""

from __future__ import annotations

import asyncio

import torch

from fastgpt.engine import SamplingParams
from fastgpt.serve.errors import APIError
from fastgpt.serve.responses import Prompt

LONG_TEXT = 16 << 10  # characters: longer prompts are tokenised off the event loop


def check_model(name: str | None, served: list[str]) -> str:
    if name is None:
        return served[0]
    if name not in served:
        raise APIError(404, f"The model `{name}` does not exist; this server serves {', '.join(served)}",
                       param="model", code="model_not_found")
    return name


def check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer can encode it
        raise APIError(400, f"{param} holds an unpaired UTF-16 surrogate, which is not text", param=param) from None
    return text


async def encode(tokenizer, text: str, param: str) -> list[int]:
    check_text(text, param)
    if len(text) > LONG_TEXT:
        return await asyncio.to_thread(tokenizer.encode, text)
    return tokenizer.encode(text)


def check_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise APIError(400, f"{param}: token id {t} is outside the vocabulary [0, {vocab_size})", param=param)


async def completion_prompts(prompt, tokenizer, vocab_size: int, n: int, capacity: int) -> list[Prompt]:
    """A completions `prompt` (str, list[str], list[int] or list[list[int]]) as Prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if len(prompt) * n > capacity:
        raise APIError(400, f"prompt: {len(prompt)} prompt(s) x n={n} samples exceed what this server can hold "
                            f"at once ({capacity})", param="prompt")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            ids = await encode(tokenizer, p, "prompt")
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", param="prompt")
            prompts.append(Prompt(ids, p))
        else:
            check_ids(p, vocab_size)
            prompts.append(Prompt(list(p), tokenizer.decode(p)))
    return prompts


def sampling_params(body, prompt_len: int, engine, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams for one prompt of this request, or a 400 naming the field at fault.
    engine: the Engine, or the EngineFacts of one in another process (engine_process.py)."""
    ctx = engine.config.n_positions
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len}",
                       param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = ctx - prompt_len
    if prompt_len + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens; you asked for "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate). "
                            "Lower max_tokens or shorten the prompt", param="max_tokens",
                       code="context_length_exceeded")
    blocks = -(-(prompt_len + max_tokens - 1) // engine.block_size)
    if blocks > engine.num_blocks:
        raise APIError(400, f"max_tokens: the prompt ({prompt_len} tokens) with max_tokens={max_tokens} needs "
                            f"{blocks} KV-cache blocks; the server has {engine.num_blocks}", param="max_tokens")
    if body.n > engine.max_num_seqs:
        raise APIError(400, f"n={body.n} exceeds the server's --max-num-seqs={engine.max_num_seqs}", param="n")
    try:
        return SamplingParams(
            n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=None if body.top_k is None or body.top_k < 1 else body.top_k,
            max_tokens=max_tokens, stop=body.stop_list, ignore_eos=body.ignore_eos, seed=body.seed,
            logprobs=logprobs)
    except ValueError as e:  # the pydantic model checks the same ranges; this is the second line
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


@torch.inference_mode()
def prompt_logprobs(engine, ids: list[int], k: int) -> tuple[list, list]:
    """Echo with logprobs: each prompt token's log-probability given the tokens before it and the top k
    alternatives (None for the first token), from one dense forward of the engine's model. Runs on the
    engine's thread or process (Frontend.call), between steps."""
    model = engine.model
    logits = model(torch.tensor([ids], device=engine.device))[0, :-1].float()  # (T-1, V): row j predicts ids[j+1]
    lp = torch.log_softmax(logits, dim=-1)
    nxt = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
    if k:
        top_v, top_i = lp.topk(k, dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [{} for _ in chosen]
    return [None] + chosen, [None] + tops
