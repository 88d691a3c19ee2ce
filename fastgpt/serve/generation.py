"""One generation request in flight: its prompts' engine requests, turned into a response or a stream.

A request with P prompts and n samples is P engine requests (RequestStreams) sharing one asyncio queue;
the engine loop puts each step's newest cumulative output there. Streaming sends each choice's new text
as it comes (see responses.py for the shapes); otherwise the outputs are gathered until every choice has
finished. Whatever way this ends (finished, the client gone, an engine failure, shutdown), ``close``
aborts what is still running, so its KV blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import time

from fastgpt.serve.errors import APIError
from fastgpt.serve.responses import (DONE, ChoiceState, Prompt, Shape, chat_logprobs, completion_logprobs,
                                     merge_logprobs, sse, usage)


class Generation:
    def __init__(self, state, shape: Shape, prompts: list[Prompt], params: list, echo: bool = False,
                 logprobs: int | None = None, arrival: float | None = None):
        self.state, self.shape, self.prompts = state, shape, prompts
        self.echo, self.want_logprobs = echo, logprobs is not None
        self.n = params[0].n
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams = []
        try:
            for prompt, p in zip(prompts, params):
                self.streams.append(state.loop.submit(prompt.ids, p, self.queue, prefix=shape.id))
        except APIError:
            self.close()
            raise
        self.index = {s: i for i, s in enumerate(self.streams)}
        self.latest = [None] * len(self.streams)
        self.choices = [[ChoiceState(p * self.n + i) for i in range(self.n)] for p in range(len(prompts))]
        self.seen = [[0] * self.n for _ in prompts]  # tokens counted into the metrics, per choice
        self.first_token_at: float | None = None

    # --------------------------------------------------------------------------------- outputs in
    async def _updates(self) -> list[int]:
        """Wait for news: the prompt indices whose output changed (self.latest holds the outputs)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        changed = []
        for stream, item in items:
            stream.take(item)  # raises APIError when the engine failed the request
            p = self.index[stream]
            self.latest[p] = item
            if p not in changed:
                changed.append(p)
        self._measure(changed)
        return changed

    def _measure(self, changed: list[int]) -> None:
        m, now = self.state.metrics, time.perf_counter()
        for p in changed:
            out = self.latest[p]
            for c in out.outputs:
                made = len(c.token_ids) - self.seen[p][c.index]
                if made <= 0:
                    continue
                if self.seen[p][c.index] == 0:
                    self.choices[p][c.index].first_token_at = now
                    if c.index == 0:
                        m.prompt_tokens.inc(len(out.prompt_token_ids))
                    if self.first_token_at is None:
                        self.first_token_at = now
                        m.ttft.observe(now - self.arrival)
                self.seen[p][c.index] = len(c.token_ids)
                m.generation_tokens.inc(made)
                if c.finish_reason is not None and len(c.token_ids) > 1:
                    m.tpot.observe((now - self.choices[p][c.index].first_token_at) / (len(c.token_ids) - 1))

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.streams)

    def close(self) -> None:
        reason = "shutdown" if self.state.draining else "disconnect"
        for s in self.streams:
            s.close(reason)

    # ------------------------------------------------------------------------------ not streamed
    async def collect(self) -> dict:
        try:
            while not self.finished:
                await self._updates()
            choices = []
            for p, out in enumerate(self.latest):
                for c in sorted(out.outputs, key=lambda c: c.index):
                    choices.append(self._choice(p, c))
            return self.shape.response(choices, usage(self.prompts, self.latest))
        finally:
            self.close()

    def _choice(self, p: int, c) -> dict:
        index = p * self.n + c.index
        strings = self.state.token_strings
        if self.shape.chat:
            lp = None
            if self.want_logprobs:
                lp = {"content": chat_logprobs(strings, c.token_ids, c.logprobs, c.top_logprobs)}
            return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": c.finish_reason}
        prompt = self.prompts[p]
        lp = None
        if self.want_logprobs:
            head = self._prompt_logprobs(prompt) if self.echo else None
            offset = sum(len(t) for t in head["tokens"]) if head else 0
            lp = merge_logprobs(head, completion_logprobs(strings, c.token_ids, c.logprobs, c.top_logprobs, offset))
        return {"index": index, "text": (prompt.text if self.echo else "") + c.text, "logprobs": lp,
                "finish_reason": c.finish_reason}

    def _prompt_logprobs(self, prompt: Prompt) -> dict:
        return completion_logprobs(self.state.token_strings, prompt.ids, prompt.logprobs, prompt.top_logprobs, 0)

    # ---------------------------------------------------------------------------------- streamed
    async def stream(self):
        """The SSE body: chunks as the engine makes tokens, then the usage (if asked for) and [DONE]."""
        try:
            if self.shape.chat:  # OpenAI opens each chat choice with the assistant role
                yield sse(self.shape.chunk([{"index": cs.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}
                                            for row in self.choices for cs in row]))
            elif self.echo:
                for p, row in enumerate(self.choices):
                    for cs in row:
                        yield sse(self.shape.chunk([self._echo_chunk(p, cs)]))
            while not self.finished:
                for p in await self._updates():
                    for c in sorted(self.latest[p].outputs, key=lambda c: c.index):
                        choice = self._delta(p, c)
                        if choice is not None:
                            yield sse(self.shape.chunk([choice]))
            if self.shape.include_usage:
                yield sse(self.shape.usage_chunk(usage(self.prompts, self.latest)))
        except APIError as e:  # the engine failed this request mid-stream: say so in the stream
            yield sse(e.body())
        finally:
            self.close()
        yield DONE

    def _echo_chunk(self, p: int, cs: ChoiceState) -> dict:
        prompt = self.prompts[p]
        lp = None
        if self.want_logprobs:
            lp = self._prompt_logprobs(prompt)
            cs.offset = sum(len(t) for t in lp["tokens"])
        return {"index": cs.index, "text": prompt.text, "logprobs": lp, "finish_reason": None}

    def _delta(self, p: int, c) -> dict | None:
        """The chunk choice with what c has that was not sent yet; None when there is nothing to send."""
        cs = self.choices[p][c.index]
        if cs.finished:
            return None
        text = c.text[cs.text_sent:]
        new = len(c.token_ids) - cs.tokens_sent
        done = c.finish_reason is not None
        if not text and not done and not (self.want_logprobs and new > 0):
            return None
        lp = None
        if self.want_logprobs:
            s = slice(cs.tokens_sent, len(c.token_ids))
            strings = self.state.token_strings
            if self.shape.chat:
                lp = {"content": chat_logprobs(strings, c.token_ids[s], c.logprobs[s], c.top_logprobs[s])}
            else:
                lp = completion_logprobs(strings, c.token_ids[s], c.logprobs[s], c.top_logprobs[s], cs.offset)
                cs.offset += sum(len(t) for t in lp["tokens"])
        cs.text_sent, cs.tokens_sent, cs.finished = len(c.text), len(c.token_ids), done
        if self.shape.chat:
            delta = {"content": text} if text or not done else {}
            return {"index": cs.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}
        return {"index": cs.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
