"""The engine loop: one thread owns the engine and runs it; the HTTP side talks to it only through here.

    event loop (HTTP handlers)                 engine thread
    submit(ids, params) -> RequestStream ─┐   ┌─ loop:
    RequestStream.close() (abort) ────────┼──▶│    apply the inbox: add / abort / call, in order
    call(fn) (e.g. prompt logprobs) ──────┘   │    engine.step() while any request is unfinished,
                          inbox (a lock)      │    else sleep until the inbox has something
    RequestStream.queue ◀── call_soon_threadsafe(one batch of outputs per step) ──┘

The engine is not thread-safe, so only this thread touches it. Neither side waits on the other: the
event loop only appends to the inbox under a lock held for a list append, and the engine thread hands
each step's outputs over with a single call_soon_threadsafe. An abort is applied before the next step,
so a client that leaves frees its KV blocks within one step.

Outputs are cumulative (RequestOutput holds everything so far), so a reader that falls behind takes
only the newest one from its queue. Admission is counted here, on the event loop: the samples in
flight may not exceed max_num_seqs + max_queue (the rest would wait without bound), and a request past
that is refused with 503 before it reaches the engine.

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

    def __init__(self, owner: "EngineLoop", request_id: str, slots: int, queue: asyncio.Queue):
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


class EngineLoop:
    def __init__(self, engine, max_queue: int, on_abort=None, lockstep=None):
        """lockstep: a fastgpt.parallel.Lockstep when the engine is tensor-parallel (this is rank 0)."""
        self.engine = engine
        self._lockstep = lockstep
        self.capacity = engine.max_num_seqs + max_queue  # samples in flight, running or waiting
        self.in_flight = 0  # event-loop side only
        self.stats = engine.stats()  # the engine thread replaces it after every step (a dict swap: atomic)
        self._on_abort = on_abort  # called on the event loop with the reason of each abort
        self._inbox: list[tuple] = []
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}  # engine-thread side only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self.crashed: BaseException | None = None

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
        self._post(("add", stream, prompt_ids, params))
        return stream

    def _release(self, stream: RequestStream, aborted: str | None) -> None:
        self.in_flight -= stream._slots
        if aborted is not None:
            self._post(("abort", stream.request_id))
            if self._on_abort is not None:
                self._on_abort(aborted)

    async def call(self, fn):
        """fn(engine) run on the engine thread between steps; its result (or exception) here."""
        future = self._loop.create_future()
        self._post(("call", fn, future))
        return await future

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
                    self._apply(command)
                if engine.has_unfinished_requests():
                    self._step()
                self.stats = engine.stats()
        except BaseException as e:  # a bug in this loop itself: /health goes red, requests fail fast
            self.crashed = e
            log.exception("the engine loop died")
            self._fail_all(500, f"the engine loop died: {type(e).__name__}: {e}")
        finally:
            for request_id in list(self._streams):
                engine.abort_request(request_id)
            self._streams.clear()
            self.stats = engine.stats()
            if self._lockstep is not None:
                try:
                    self._lockstep.close()
                except Exception:  # a rank is gone already: nobody to tell
                    log.exception("could not tell the other tensor-parallel ranks to stop")

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, stream, prompt_ids, params = command
            try:
                self.engine.add_request(stream.request_id, prompt_ids, params)
            except ValueError as e:
                self._deliver([(stream, EngineFailure(400, str(e)))])
            except Exception as e:
                log.exception("add_request failed for %s", stream.request_id)
                self._deliver([(stream, EngineFailure(500, f"internal error: {type(e).__name__}: {e}"))])
            else:
                self._streams[stream.request_id] = stream
        elif kind == "abort":
            self.engine.abort_request(command[1])
            self._streams.pop(command[1], None)
        elif kind == "call":
            _, fn, future = command
            try:
                result, error = fn(self.engine), None
            except Exception as e:
                result, error = None, e
            self._loop.call_soon_threadsafe(_settle, future, result, error)

    def _step(self) -> None:
        steps = self.engine.stats()["steps"]
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the %d request(s) in it", len(self._streams))
            self._fail_all(500, f"internal error in the engine step: {type(e).__name__}: {e}")
            return
        if self.engine.stats()["steps"] == steps:  # nothing could be scheduled, with nothing running to
            # free room: these requests can never run (and the loop would spin on them forever)
            log.error("the engine could schedule none of its %d request(s): %s", len(self._streams),
                      self.engine.stats())
            self._fail_all(500, "internal error: the engine could not schedule this request")
            return
        batch = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batch.append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
        if batch:
            self._deliver(batch)

    def _fail_all(self, status: int, message: str) -> None:
        failed = [(s, EngineFailure(status, message)) for s in self._streams.values()]
        for request_id in list(self._streams):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
        self._streams.clear()
        self._deliver(failed)

    def _deliver(self, batch: list) -> None:
        if batch and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _portable(command: tuple) -> tuple:
    """A command as the other ranks of a TP server get it: no stream, no future."""
    kind = command[0]
    if kind == "add":
        _, stream, prompt_ids, params = command
        return "add", stream.request_id, prompt_ids, params
    if kind == "call":
        return "call", command[1]
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


def _put_all(batch) -> None:
    for stream, item in batch:
        if not stream.closed:
            stream.queue.put_nowait((stream, item))


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
