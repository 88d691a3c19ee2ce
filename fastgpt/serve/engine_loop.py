"""The engine loop: one thread owns the engine and runs it; the HTTP side talks to it only through here.

    event loop (HTTP handlers)                 engine thread
    submit(ids, params) -> RequestStream ─┐   ┌─ loop:
    RequestStream.close() (abort) ────────┼──▶│    apply the inbox: add / abort / call, in order
    call(fn) (e.g. prompt logprobs) ──────┘   │    engine.step() while any request is unfinished,
                          inbox (a lock)      │    else sleep until the inbox has something
    RequestStream.queue ◀── call_soon_threadsafe(one batch of outputs per step) ──┘

The loop has two halves, so that the engine can also run in a process of its own (engine_process.py):
``EngineDriver`` is the engine's side (commands in, outputs and failures out, by request id), and
``Frontend`` the event loop's (admission, request streams, calls). ``EngineLoop`` joins them with a
thread; ``EngineProcess`` with two pipes.

The engine is not thread-safe, so only this thread touches it. Neither side waits on the other: the
event loop only appends to the inbox under a lock held for a list append, and the engine thread hands
each step's outputs over with a single call_soon_threadsafe. An abort is applied before the next step,
so a client that leaves frees its KV blocks within one step.

Outputs are cumulative (RequestOutput holds everything so far), so a reader that falls behind takes
only the newest one from its queue. Admission is counted on the event loop: the samples in flight may
not exceed max_num_seqs + max_queue (the rest would wait without bound), and a request past that is
refused with 503 before it reaches the engine.

A request the engine refuses (ValueError from add_request) fails alone with a 400; any other exception
in add_request fails that request alone with a 500. An exception inside a step cannot be pinned on one
request of the batch: every request then in the engine fails with a 500, and the loop goes on serving;
so do they when a step schedules nothing at all (nothing runs that could free room for them).

Under tensor parallelism (``fastgpt serve --tp N`` under torchrun) this loop runs on rank 0, and every
other rank runs ``follow``. Before applying a batch of commands, rank 0 hands them to the others
(``fastgpt.parallel.Lockstep``): the adds with their request ids, prompts and parameters, the aborts, the
calls (picklable: a module function and its arguments). Each rank applies the same commands in the same
order and steps when rank 0 does (whether it does follows from the commands), so the engines stay in
lockstep, collectives included; what rank 0 does on a failure (abort every request) the others do too.
While idle, rank 0 sends an empty batch every LOCKSTEP_IDLE_S, so a waiting rank never sits in one
collective past its timeout; it sends None when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from fastgpt.serve.errors import APIError

log = logging.getLogger("fastgpt.serve")

LOCKSTEP_IDLE_S = 1.0


@dataclass
class EngineFailure:
    """Put in a request's queue instead of an output: the engine could not run it."""

    status: int
    message: str


class RequestStream:
    """One engine request, seen from the event loop; its outputs arrive in `queue` (which the prompts of
    one HTTP request share) as (stream, RequestOutput or EngineFailure) pairs."""

    def __init__(self, owner: "Frontend", request_id: str, slots: int, queue: asyncio.Queue):
        self.request_id, self.queue = request_id, queue
        self.finished = False
        self.closed = False
        self._owner, self._slots = owner, slots

    def take(self, item) -> None:
        """Note an item from the queue; raises APIError when it says the engine failed this request."""
        if isinstance(item, EngineFailure):
            self.finished = True  # nothing more will come, and there is nothing to abort
            raise APIError(item.status, item.message, code="engine_error" if item.status >= 500 else None)
        self.finished = item.finished

    def close(self, reason: str = "disconnect") -> None:
        """Done with this request: abort it if it is still running, and give its slots back. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._owner._release(self, aborted=None if self.finished else reason)


class Frontend:
    """The event loop's half of an engine loop: admission, the request streams, calls into the engine.
    A subclass carries the commands to the engine (``_post``) and hands its outputs back (``_dispatch``,
    ``_settle``, on the event loop)."""

    def __init__(self, capacity: int, stats: dict, on_abort=None):
        self.capacity = capacity  # samples in flight, running or waiting: max_num_seqs + the queue
        self.in_flight = 0
        self.stats = stats  # the engine's latest stats(), replaced after every step
        self.on_abort = on_abort  # called with the reason of each abort
        self.crashed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._next_id = 0

    def submit(self, prompt_ids: list[int], params, queue: asyncio.Queue, prefix: str = "req") -> RequestStream:
        """Queue one prompt, its outputs to go to queue; 503 when the samples in flight would pass capacity."""
        if not self.alive:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        if self.in_flight + params.n > self.capacity:
            raise APIError(503, f"the server is at capacity ({self.in_flight} samples running or waiting, "
                                f"limit {self.capacity}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        self.in_flight += params.n
        self._next_id += 1
        stream = RequestStream(self, f"{prefix}-{self._next_id}", params.n, queue)
        self._streams[stream.request_id] = stream
        self._post(("add", stream.request_id, prompt_ids, params))
        return stream

    def _release(self, stream: RequestStream, aborted: str | None) -> None:
        self.in_flight -= stream._slots
        self._streams.pop(stream.request_id, None)
        if aborted is not None:
            self._post(("abort", stream.request_id))
            if self.on_abort is not None:
                self.on_abort(aborted)

    async def call(self, fn):
        """fn(engine) run by the engine between steps; its result (or exception) here."""
        self._next_id += 1
        token = self._next_id
        self._calls[token] = future = self._loop.create_future()
        try:
            self._post(("call", token, fn))
            return await future
        finally:
            self._calls.pop(token, None)

    def _dispatch(self, batch: list) -> None:
        """(request id, RequestOutput or EngineFailure) pairs from the engine, to their streams' queues."""
        for request_id, item in batch:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.closed:
                stream.queue.put_nowait((stream, item))

    def _settle(self, token: int, result, error) -> None:
        future = self._calls.get(token)
        if future is None or future.done():  # its caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_streams(self, status: int, message: str) -> None:
        """The engine is gone: every stream hears so, every call raises."""
        self._dispatch([(rid, EngineFailure(status, message)) for rid in list(self._streams)])
        for token in list(self._calls):
            self._settle(token, None, RuntimeError(message))

    # what a subclass provides
    alive: bool

    def _post(self, command: tuple) -> None:
        raise NotImplementedError


class EngineDriver:
    """The engine's half: applies commands in order and steps, reporting through deliver(batch of
    (request id, RequestOutput or EngineFailure)) and settle(call token, result, error)."""

    def __init__(self, engine, deliver, settle):
        self.engine, self.deliver, self.settle = engine, deliver, settle
        self.live: set[str] = set()  # requests in the engine that somebody waits for

    def apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params = command
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as e:
                self.deliver([(request_id, EngineFailure(400, str(e)))])
            except Exception as e:
                log.exception("add_request failed for %s", request_id)
                self.deliver([(request_id, EngineFailure(500, f"internal error: {type(e).__name__}: {e}"))])
            else:
                self.live.add(request_id)
        elif kind == "abort":
            self.engine.abort_request(command[1])
            self.live.discard(command[1])
        elif kind == "call":
            _, token, fn = command
            try:
                result, error = fn(self.engine), None
            except Exception as e:
                result, error = None, e
            self.settle(token, result, error)

    def step(self) -> None:
        steps = self.engine.stats()["steps"]
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the %d request(s) in it", len(self.live))
            self.fail_all(500, f"internal error in the engine step: {type(e).__name__}: {e}")
            return
        if self.engine.stats()["steps"] == steps:  # nothing could be scheduled, with nothing running to
            # free room: these requests can never run (and the loop would spin on them forever)
            log.error("the engine could schedule none of its %d request(s): %s", len(self.live), self.engine.stats())
            self.fail_all(500, "internal error: the engine could not schedule this request")
            return
        batch = []
        for out in outputs:
            if out.request_id not in self.live:
                continue
            batch.append((out.request_id, out))
            if out.finished:
                self.live.discard(out.request_id)
        if batch:
            self.deliver(batch)

    def fail_all(self, status: int, message: str) -> None:
        failed = [(rid, EngineFailure(status, message)) for rid in self.live]
        self.abort_all()
        self.deliver(failed)

    def abort_all(self) -> None:
        for request_id in list(self.live):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
        self.live.clear()


class EngineLoop(Frontend):
    def __init__(self, engine, max_queue: int, on_abort=None, lockstep=None):
        """lockstep: a fastgpt.parallel.Lockstep when the engine is tensor-parallel (this is rank 0)."""
        super().__init__(engine.max_num_seqs + max_queue, engine.stats(), on_abort)
        self.engine = engine
        self._lockstep = lockstep
        self._inbox: list[tuple] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fastgpt-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.thread_alive and self.crashed is None

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _post(self, command: tuple) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------- engine side
    def _run(self) -> None:
        engine = self.engine
        driver = EngineDriver(engine, self._hand_over(self._dispatch, skip_empty=True), self._hand_over(self._settle))
        idle_wait = None if self._lockstep is None else LOCKSTEP_IDLE_S
        if engine.device.type == "cuda":  # a thread starts on GPU 0: the engine's may be another
            import torch

            torch.cuda.set_device(engine.device)
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self._stopping and not engine.has_unfinished_requests():
                        if not self._wake.wait(idle_wait):
                            break  # idle under TP: the other ranks hear that nothing happened
                    if self._stopping:
                        break
                    commands, self._inbox = self._inbox, []
                if self._lockstep is not None:
                    self._lockstep.share([_portable(c) for c in commands])
                for command in commands:
                    driver.apply(command)
                if engine.has_unfinished_requests():
                    driver.step()
                self.stats = engine.stats()  # a dict swap: atomic
        except BaseException as e:  # a bug in this loop itself: /health goes red, requests fail fast
            self.crashed = e
            log.exception("the engine loop died")
            # every stream, those whose add is still in the inbox too
            self._hand_over(self._fail_streams)(500, f"the engine loop died: {type(e).__name__}: {e}")
        finally:
            driver.abort_all()
            self.stats = engine.stats()
            if self._lockstep is not None:
                try:
                    self._lockstep.close()
                except Exception:  # a rank is gone already: nobody to tell
                    log.exception("could not tell the other tensor-parallel ranks to stop")

    def _hand_over(self, fn, skip_empty: bool = False):
        """fn, called from the engine thread, run on the event loop instead (not at all for an empty batch
        when skip_empty)."""
        def call(*args):
            if skip_empty and not args[0]:
                return
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
        return call


def _portable(command: tuple) -> tuple:
    """A command as the other ranks of a TP server get it: no call token."""
    if command[0] == "call":
        return "call", command[2]
    return command


def follow(engine, lockstep) -> None:
    """The engine loop of a rank other than 0 in a tensor-parallel server: rank 0's commands, applied in
    its order, and a step whenever rank 0 steps, until rank 0 stops (or the group breaks: then it raises)."""
    while True:
        commands = lockstep.share()
        if commands is None:
            break
        for kind, *args in commands:
            try:
                if kind == "add":
                    engine.add_request(*args)
                elif kind == "abort":
                    engine.abort_request(*args)
                elif kind == "call":
                    args[0](engine)
            except Exception:  # rank 0 met the same and answered its client; the engine did not change
                pass
        if not engine.has_unfinished_requests():
            continue
        steps = engine.stats()["steps"]
        try:
            engine.step()
            progressed = engine.stats()["steps"] != steps
        except Exception:
            log.exception("engine step failed on this rank; failing its requests, as rank 0 does")
            progressed = False
        if not progressed:  # rank 0 fails every request it holds (EngineLoop._step)
            for request_id in list(engine.requests):
                engine.abort_request(request_id)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
