"""OpenAI's response shapes, built from the engine's outputs.

Non-streamed: one ``text_completion`` / ``chat.completion`` object with every choice and the usage.
Streamed: ``data: {chunk}\n\n`` events, each carrying one choice's new text (the engine's outputs are
cumulative, so a choice remembers how much it has sent), ending with ``data: [DONE]\n\n``; with
stream_options.include_usage every chunk has ``"usage": null`` and one last chunk with no choices
carries the usage.

Choice i of prompt p has index p * n + i. Usage counts each prompt once and every generated token of
every sample (a final EOS or stop token included, as in token_ids). Log-probabilities follow OpenAI:
completions give ``tokens``, ``token_logprobs``, ``top_logprobs`` (the top k and the chosen token, so up
to k + 1 entries) and ``text_offset`` (each token's character offset in the choice's text); chat gives
``content`` entries with token, logprob, bytes and top_logprobs. A token's string is its own decode, so
one half of a split multi-byte character reads as U+FFFD. Non-finite values are sent as -9999.0 (JSON
has no -inf).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo shows: the string given, or the decode of the ids given
    logprobs: list | None = None  # echo with logprobs: one per prompt token, None for the first
    top_logprobs: list | None = None


@dataclass
class ChoiceState:
    """What one streamed choice has sent so far."""

    index: int
    text_sent: int = 0  # characters of the output's text
    tokens_sent: int = 0
    offset: int = 0  # text_offset of its next token
    started: bool = False  # chat: the role delta went out
    finished: bool = False
    first_token_at: float | None = None


class TokenStrings:
    """Every token id's own decoded string, computed once (logprobs name tokens by their text)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._strings = tokenizer.decode_batch([[i] for i in range(vocab_size)])

    def __getitem__(self, token_id: int) -> str:
        return self._strings[token_id]


def usage(prompts: list[Prompt], outputs) -> dict:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ------------------------------------------------------------------------------------- logprobs
def completion_logprobs(strings: TokenStrings, token_ids, logprobs, tops, offset: int) -> dict:
    """OpenAI's completions logprobs object for these tokens, the first one at text offset `offset`."""
    tokens = [strings[t] for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    top_logprobs = []
    for t, lp, top in zip(token_ids, logprobs, tops):
        if top is None:  # the first prompt token: nothing came before it
            top_logprobs.append(None)
            continue
        entry = {}
        for tid, v in top.items():
            entry.setdefault(strings[tid], _finite(v))
        entry.setdefault(strings[t], _finite(lp))
        top_logprobs.append(entry)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else _finite(lp) for lp in logprobs],
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_token(s: str, lp: float) -> dict:
    return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(strings: TokenStrings, token_ids, logprobs, tops) -> list[dict]:
    """OpenAI's chat logprobs ``content`` list for these tokens."""
    return [{**_chat_token(strings[t], lp), "top_logprobs": [_chat_token(strings[i], v) for i, v in top.items()]}
            for t, lp, top in zip(token_ids, logprobs, tops)]


def merge_logprobs(a: dict | None, b: dict) -> dict:
    """Completions logprobs of a then b (echo: the prompt's, then the generated tokens')."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


@dataclass
class Shape:
    """What every response and chunk of one request shares."""

    id: str
    created: int
    model: str
    chat: bool
    include_usage: bool = False

    def chunk(self, choices: list[dict]) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, usage_: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage_}

    def response(self, choices: list[dict], usage_: dict) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage_}
