"""A request and its samples as the scheduler sees them, and how a sample's tokens turn into text.

A ``Request`` holds n ``Sequence``s, one per sample. Only the first exists at first: it carries the
prompt through prefill, and the step that samples its first token forks the other n - 1 from the same
logits (each with its own generator); they share the prompt's full blocks (see scheduler.py).

Text is decoded incrementally: the tokens not yet in the text wait in ``pending`` until they decode to
whole characters (GPT-2's byte-level tokens can split a multi-byte character; a decode that ends in
U+FFFD waits for the rest), then the decoded piece is appended. Byte-level decoding is a concatenation
of bytes, so pieces decoded at character boundaries add up to the decode of the whole. A stop string is
searched in the text around each new piece, so it is found when it spans tokens; the text is cut before
it. While a sample runs, its reported text holds back the last (longest stop string - 1) characters,
which could still become a stop string: what was reported is never taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastgpt.engine.block_manager import ROOT_HASH
from fastgpt.engine.params import CompletionOutput, RequestOutput, SamplingParams

REPLACEMENT_CHAR = "\ufffd"


@dataclass(eq=False)
class Sequence:
    request: "Request"
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + generated
    generator: torch.Generator | None  # None: the engine's shared generator (unseeded request)
    num_forks: int = 0  # samples still to fork from this one's first token
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already offered to the prefix cache
    last_hash: int = ROOT_HASH
    text: str = ""
    pending: list[int] = field(default_factory=list)  # generated tokens not yet decoded into text
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_slots(self) -> int:
        """Sequence slots (max_num_seqs) it stands for: itself and the samples it will fork."""
        return 1 + self.num_forks

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def reset_cache_state(self) -> None:
        """Forget the cache (preempted: it will be recomputed from its tokens)."""
        self.num_computed, self.block_table = 0, []
        self.num_hashed_blocks, self.last_hash = 0, ROOT_HASH

    def completion(self) -> CompletionOutput:
        hold = 0 if self.finished else self.request.stop_hold
        text = self.text[:len(self.text) - hold] if hold else self.text
        return CompletionOutput(
            index=self.index, text=text, token_ids=self.token_ids[self.num_prompt_tokens:],
            finish_reason=self.finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None
    generators: list[torch.Generator | None] = field(default_factory=list)  # one per sample
    seqs: list[Sequence] = field(default_factory=list)  # forked samples appear once the first is sampled

    def __post_init__(self):
        self.stop_hold = max((len(s) for s in self.params.stop), default=1) - 1
        self.stop_token_ids = set(self.params.stop_token_ids)
        if self.eos_token_id is not None and not self.params.ignore_eos:
            self.stop_token_ids.add(self.eos_token_id)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, list(self.prompt_token_ids), [s.completion() for s in self.seqs],
                             self.finished)


# ------------------------------------------------------------------------------------------- text
def add_text(seq: Sequence, decoded: str, final: bool) -> None:
    """Take decoded = decode(seq.pending) into the text unless it ends mid-character (and this is not
    the last chance); then look for a stop string around the new piece."""
    if decoded.endswith(REPLACEMENT_CHAR) and not final:
        return
    start = len(seq.text)
    seq.text += decoded
    seq.pending.clear()
    stops = seq.params.stop
    if not stops:
        return
    window = max(0, start - seq.request.stop_hold)  # a stop string may begin in the text before the piece
    hits = [i for i in (seq.text.find(s, window) for s in stops) if i >= 0]
    if hits:
        seq.text = seq.text[:min(hits)]
        seq.finish_reason = "stop"
