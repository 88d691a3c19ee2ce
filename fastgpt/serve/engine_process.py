"""The engine in a process of its own, so that the server's event loop and the engine stop sharing a GIL.

    server process (event loop)                    engine process (run_engine)
    EngineProcess.submit / close / call ─commands─▶ EngineDriver, as in the thread loop: apply the
      (a sender thread: a full pipe never            commands, step while anything is unfinished,
       blocks the event loop)                        else wait on the pipe
    RequestStream.queue ◀─ _on_readable ◀─updates── one message per step: output deltas, failures,
                                                     call results, the engine's stats()

Why: with the engine on a thread, its Python work (scheduling, sampling, detokenizing) and the HTTP
side's (parsing, one SSE chunk per token per stream) take turns on one GIL, and on a CPU the server ran
at ~0.7x the offline engine (benchmarks/results/2026-12-01-cpu-2core/serve.md). vLLM's engine core runs
apart from its API server for the same reason. Under --tp the engine stays on rank 0's thread
(engine_loop.py): its collectives belong to that process.

What crosses per step is only what is new: per sample, the new token ids, text and logprobs. Outputs
are append-only (sequence.py never takes back text it reported), so the server rebuilds each request's
cumulative RequestOutput and hands it to the streams as the thread loop does; generation.py cannot tell
the two loops apart. A long generation costs O(tokens) to carry, not O(tokens^2).

Start-up: the engine process loads the model and warms it up, then answers with EngineFacts (what the
HTTP side needs to know of the engine); a failure to load comes back as the exception, for the CLI's
one-line error. Lifetime: the engine process ignores SIGINT and SIGTERM (Ctrl-C and group kills reach it
too, and the server still needs it to drain its requests); it leaves when told to stop, or when its
command pipe closes because the server is gone, however it went. The server sees the engine process
die as the end of the update pipe: /health turns 503, and every request in flight fails with a 500.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import threading
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

from fastgpt.engine.params import CompletionOutput, RequestOutput
from fastgpt.serve.engine_loop import EngineDriver, EngineFailure, Frontend

log = logging.getLogger("fastgpt.serve")

STOP_TIMEOUT_S = 10.0
MAX_UPDATES_PER_WAKE = 64  # engine steps taken in per callback of the event loop


@dataclass
class EngineSpec:
    """How the engine process builds its engine (Engine.from_pretrained's arguments; all picklable)."""

    model_dir: str
    device: str
    dtype: str | None = None
    threads: int | None = None  # torch's CPU threads in the engine process (None: torch's default)
    options: dict = field(default_factory=dict)  # Engine options: max_num_seqs, num_blocks, ...
    log_level: str = "INFO"

    def build(self):
        import torch

        from fastgpt import Engine, SamplingParams

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        engine = Engine.from_pretrained(self.model_dir, device=self.device, dtype=self.dtype, **self.options)
        engine.generate([[0, 0]], SamplingParams(max_tokens=2, temperature=0))  # first-call costs, paid now
        return engine


@dataclass
class EngineFacts:
    """What the HTTP side reads of an engine (inputs.py, app.py, the start-up log): an Engine has the same
    attributes, so the routes take either."""

    config: object  # the model's GPTConfig
    block_size: int
    num_blocks: int
    max_num_seqs: int
    device: str
    dtype: str
    threads: int
    stats: dict
    tokenizer: object = None  # the server loads its own; a tokenizer does not cross the pipe

    @classmethod
    def of(cls, engine) -> "EngineFacts":
        import torch

        return cls(engine.config, engine.block_size, engine.num_blocks, engine.max_num_seqs, str(engine.device),
                   str(engine.model.dtype).replace("torch.", ""), torch.get_num_threads(), engine.stats(),
                   engine.tokenizer)


class EngineProcess(Frontend):
    def __init__(self, spec: EngineSpec):
        """Start the engine process and wait until its engine is built (raises what building raised).
        Admits max_num_seqs samples until the server sets ``capacity`` (ServeState adds its queue)."""
        from fastgpt import Tokenizer

        context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch threads
        commands_in, self._commands = context.Pipe(duplex=False)
        self._updates, updates_out = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine, args=(spec, commands_in, updates_out),
                                        name="fastgpt-engine", daemon=True)
        self._process.start()
        commands_in.close()
        updates_out.close()  # ours closed, the pipe ends when the engine process's end does
        try:
            kind, payload = self._updates.recv()
        except EOFError:
            self._process.join(STOP_TIMEOUT_S)
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while it "
                               "started (see the log above)") from None
        except BaseException:  # e.g. Ctrl-C while the model loads: it ignores SIGINT and SIGTERM
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
            raise
        if kind == "error":
            self._process.join(STOP_TIMEOUT_S)
            raise payload
        self.facts: EngineFacts = payload
        self.facts.tokenizer = Tokenizer.from_pretrained(spec.model_dir)
        super().__init__(self.facts.max_num_seqs, self.facts.stats)
        self._outbox: SimpleQueue = SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="fastgpt-engine-commands", daemon=True)
        self._outputs: dict[str, Cumulative] = {}
        self._stopping = False

    # ---------------------------------------------------------------------------- event-loop side
    def start(self, loop) -> None:
        self._loop = loop
        loop.add_reader(self._updates.fileno(), self._on_readable)
        self._sender.start()

    @property
    def alive(self) -> bool:
        return self.crashed is None and self._process.is_alive()

    def submit(self, prompt_ids, params, queue, prefix: str = "req"):
        stream = super().submit(prompt_ids, params, queue, prefix)
        self._outputs[stream.request_id] = Cumulative(stream.request_id, prompt_ids)
        return stream

    def _release(self, stream, aborted) -> None:
        self._outputs.pop(stream.request_id, None)
        super()._release(stream, aborted)

    def _post(self, command: tuple) -> None:
        self._outbox.put(command)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Tell the engine process to go, and wait for it (then make it). Idempotent."""
        self._stopping = True
        if self._sender.is_alive():
            self._outbox.put(("stop",))
        else:  # never started (or already gone): say it ourselves
            try:
                self._commands.send([("stop",)])
            except OSError:
                pass
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self._process.kill()
            self._process.join(timeout)

    def _send_commands(self) -> None:
        """The sender thread: what the event loop posted, in order, one pipe message per batch."""
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except Empty:
                    break
            try:
                self._commands.send(batch)
            except OSError:  # the engine process is gone; the update pipe tells the event loop
                return
            if ("stop",) in batch:
                return

    def _on_readable(self) -> None:
        try:
            for _ in range(MAX_UPDATES_PER_WAKE):  # then the event loop's other work has its turn
                if not self._updates.poll():
                    break
                kind, *payload = self._updates.recv()
                if kind == "update":
                    self._apply(*payload)
                elif kind == "crashed":
                    self._lost(payload[0])
                    return
        except (EOFError, OSError):
            if self._stopping:  # stop() is joining it (two joins of one process race on its exit code)
                self._lost(None)
            else:
                self._process.join(1.0)
                self._lost(f"the engine process exited (code {self._process.exitcode})")

    def _apply(self, events: list, stats: dict) -> None:
        self.stats = stats
        batch = []
        for kind, key, *rest in events:
            if kind == "out":
                output = self._outputs.get(key)
                if output is not None:
                    batch.append((key, output.extend(*rest)))
                    if rest[0]:  # finished
                        del self._outputs[key]
            elif kind == "fail":
                self._outputs.pop(key, None)
                batch.append((key, EngineFailure(*rest)))
            elif kind == "result":
                self._settle(key, *rest)
        self._dispatch(batch)

    def _lost(self, message: str | None) -> None:
        self._loop.remove_reader(self._updates.fileno())
        if message is None:  # we stopped it
            return
        log.error("%s", message)
        self.crashed = RuntimeError(message)
        self._fail_streams(500, message)


class DeltaEncoder:
    """The engine side of the output pipe: each RequestOutput as what is new since the last one sent."""

    def __init__(self):
        self._sent: dict[str, dict[int, tuple[int, int]]] = {}  # request -> sample -> (tokens, characters)

    def encode(self, output: RequestOutput) -> tuple:
        """("out", request id, finished, [(sample index, new ids, new text, new logprobs, new top
        logprobs, finish reason)]); forgets the request once it has finished."""
        marks = self._sent.setdefault(output.request_id, {})
        deltas = []
        for c in output.outputs:
            tokens, chars = marks.get(c.index, (0, 0))
            deltas.append((c.index, c.token_ids[tokens:], c.text[chars:],
                           None if c.logprobs is None else c.logprobs[tokens:],
                           None if c.top_logprobs is None else c.top_logprobs[tokens:], c.finish_reason))
            marks[c.index] = (len(c.token_ids), len(c.text))
        if output.finished:
            del self._sent[output.request_id]
        return "out", output.request_id, output.finished, deltas

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


class Cumulative:
    """One request's output as the server rebuilds it from the engine's deltas (DeltaEncoder.encode)."""

    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.samples: dict[int, CompletionOutput] = {}

    def extend(self, finished: bool, deltas: list) -> RequestOutput:
        for index, ids, text, logprobs, top, reason in deltas:
            old = self.samples.get(index)
            if old is not None:  # new lists: an output already handed out never changes
                ids, text = old.token_ids + ids, old.text + text
                logprobs = None if logprobs is None else old.logprobs + logprobs
                top = None if top is None else old.top_logprobs + top
            self.samples[index] = CompletionOutput(index=index, text=text, token_ids=ids, finish_reason=reason,
                                                   logprobs=logprobs, top_logprobs=top)
        return RequestOutput(self.request_id, self.prompt_ids, [self.samples[i] for i in sorted(self.samples)],
                             finished)


# ------------------------------------------------------------------------------ engine process
def run_engine(spec: EngineSpec, commands, updates) -> None:
    """The engine process: build the engine, then apply commands and step until told to stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = spec.build()
    except BaseException as e:
        updates.send(("error", _portable_error(e)))
        return
    updates.send(("ready", EngineFacts.of(engine)))

    events: list[tuple] = []
    deltas = DeltaEncoder()

    def deliver(batch) -> None:
        for request_id, item in batch:
            if isinstance(item, EngineFailure):
                deltas.forget(request_id)
                events.append(("fail", request_id, item.status, item.message))
            else:
                events.append(deltas.encode(item))

    def settle(token, result, error) -> None:
        why = _pickling_error((result, error))
        if why is not None:
            result, error = None, RuntimeError(f"the engine's answer could not be sent: {type(why).__name__}: {why}")
        events.append(("result", token, result, error))

    driver = EngineDriver(engine, deliver, settle)
    last_stats = None
    try:
        while True:
            if commands.poll(0 if engine.has_unfinished_requests() else None):
                if not _apply_commands(commands, driver, deltas):
                    break
            if engine.has_unfinished_requests():
                driver.step()
            stats = engine.stats()
            if events or stats != last_stats:
                updates.send(("update", events, stats))  # pickled here: the list may be reused
                events.clear()
                last_stats = stats
    except (EOFError, OSError):  # the server is gone: nobody to serve
        pass
    except BaseException as e:  # a bug in this loop: the server fails its requests and turns /health red
        log.exception("the engine loop died")
        try:
            updates.send(("crashed", f"the engine loop died: {type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        driver.abort_all()


def _apply_commands(commands, driver: EngineDriver, deltas: "DeltaEncoder") -> bool:
    """Every command that has arrived, in order; False when one says stop."""
    while True:
        for command in commands.recv():
            if command[0] == "stop":
                return False
            driver.apply(command)
            if command[0] == "abort":
                deltas.forget(command[1])
        if not commands.poll(0):
            return True


def _portable_error(e: BaseException) -> BaseException:
    """e if it survives pickling (the CLI then prints it as it would its own), else a RuntimeError."""
    return e if _pickling_error(e) is None else RuntimeError(f"{type(e).__name__}: {e}")


def _pickling_error(obj) -> Exception | None:
    """Why obj cannot cross the pipe (pickled and unpickled again), or None when it can."""
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception as e:
        return e
    return None
