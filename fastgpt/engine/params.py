"""The engine's public dataclasses, with vLLM's names and meanings: what a request asks for
(``SamplingParams``) and what it gets back (``RequestOutput`` holding n ``CompletionOutput``)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top_logprobs per token a request may ask for (OpenAI's limit)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How one request samples. Checked on construction: a bad value raises ValueError naming the field.

    n: samples per prompt (they share the prompt's cache blocks). temperature 0 is greedy. top_k None
    keeps every token. stop: strings that end the text (the text ends before them); stop_token_ids:
    tokens that end it (kept in token_ids, not in the text). seed: the request's own generator (sample i
    uses seed + i, as vLLM does), so its tokens do not depend on what else is in the batch. logprobs=k:
    the chosen token's log-probability under the raw distribution (before temperature / top-k / top-p) and
    the k likeliest tokens of each step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold token ids >= 0, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} (or None), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class CompletionOutput:
    """One sample of a request, cumulative: everything generated so far.

    token_ids: the generated ids only (a final EOS / stop token included); text: their text, ending before
    a stop string (and, while unfinished, holding back the last characters that could start one);
    finish_reason: None while running, then "stop" (EOS, stop string or stop token) or "length";
    logprobs: one float per token, and top_logprobs one {token_id: logprob} per token, when asked for."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: its prompt, its n samples, and whether all of them have finished."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
