"""The FastAPI app: its state, its routes, and the exception handlers that keep every error in OpenAI's
shape.

    GET  /health                 200 while the engine loop runs (503 if it died)
    GET  /v1/models              the served name(s)
    GET  /metrics                Prometheus text (metrics.py)
    POST /v1/completions         prompt(s) -> text; streamed or not
    POST /v1/chat/completions    messages -> the chat template -> a prompt -> text (400 without a template)

A route handler reads the body (already size-checked and buffered by middleware.Gate), validates it
(protocol.py, inputs.py), submits it to the engine loop (engine_loop.py) and answers through a
Generation (generation.py). A non-streamed request races its generation against the client's
disconnect, so a client that gives up aborts its request at once; a streamed one is cancelled by
Starlette when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastgpt.serve import inputs
from fastgpt.serve.chat import ChatTemplate
from fastgpt.serve.engine_loop import EngineLoop
from fastgpt.serve.engine_process import EngineProcess
from fastgpt.serve.errors import APIError, error_body, from_validation_errors, parse_request
from fastgpt.serve.generation import Generation
from fastgpt.serve.metrics import Metrics
from fastgpt.serve.middleware import CountStatus, Gate
from fastgpt.serve.protocol import ChatCompletionRequest, CompletionRequest
from fastgpt.serve.responses import Prompt, Shape, TokenStrings

log = logging.getLogger("fastgpt.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 1024
    chat_template: ChatTemplate | None = None


class ServeState:
    """Everything the routes share: the engine loop, the metrics, the config, and whether we are draining.

    engine: an Engine, which a thread of this process then runs (EngineLoop), or an EngineProcess, which
    runs one in a process of its own (engine_process.py); then ``self.engine`` is its EngineFacts."""

    def __init__(self, engine, config: ServeConfig, lockstep=None):
        self.metrics = Metrics(lambda: self.loop.stats, lambda: self.loop.in_flight)
        on_abort = lambda reason: self.metrics.aborts.labels(reason).inc()  # noqa: E731
        if isinstance(engine, EngineProcess):
            if lockstep is not None:
                raise ValueError("a tensor-parallel engine runs on rank 0's thread, not in an engine process")
            self.loop, engine = engine, engine.facts
            self.loop.capacity, self.loop.on_abort = engine.max_num_seqs + config.max_queue, on_abort
        else:
            self.loop = EngineLoop(engine, config.max_queue, on_abort=on_abort, lockstep=lockstep)
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer")
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        self.token_strings = TokenStrings(self.tokenizer, engine.config.vocab_size)
        self.draining = False
        self.started = int(time.time())


def build_app(engine, config: ServeConfig, lockstep=None):
    """(the ASGI app to serve, its ServeState): the FastAPI app inside the status counter and the gate.
    engine: an Engine or an EngineProcess (see ServeState). lockstep: rank 0's fastgpt.parallel.Lockstep
    when the engine is tensor-parallel (engine_loop.py)."""
    state = ServeState(engine, config, lockstep)
    engine = state.engine  # what the routes read of it: config and limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start(asyncio.get_running_loop())
        yield
        state.draining = True
        await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="fastgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    # ------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        # FastAPI's locations start with where the value came from ("body", "query"): drop that
        err = from_validation_errors([{**x, "loc": tuple(x["loc"])[1:]} for x in e.errors()])
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):  # a bug of ours: this request fails, the server goes on
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}", code="internal_error"),
                            status_code=500)

    # ------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse(error_body(503, "the engine loop is not running", code="engine_dead"), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.started, "owned_by": "fastgpt",
             "max_model_len": engine.config.n_positions} for name in config.served_model_names]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        body = parse_request(await request.body(), CompletionRequest)
        model = inputs.check_model(body.model, config.served_model_names)
        prompts = await inputs.completion_prompts(body.prompt, state.tokenizer, engine.config.vocab_size, body.n,
                                                  state.loop.capacity)
        params = [inputs.sampling_params(body, len(p.ids), engine, body.max_tokens, body.logprobs) for p in prompts]
        if body.echo and body.logprobs is not None:
            for p in prompts:
                # a module function and its arguments, not a lambda: under TP it travels to every rank
                p.logprobs, p.top_logprobs = await state.loop.call(
                    functools.partial(inputs.prompt_logprobs, ids=p.ids, k=body.logprobs))
        shape = Shape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, chat=False,
                      include_usage=body.include_usage)
        gen = Generation(state, shape, prompts, params, echo=body.echo, logprobs=body.logprobs, arrival=arrival)
        return await _answer(request, gen, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        body = parse_request(await request.body(), ChatCompletionRequest)
        model = inputs.check_model(body.model, config.served_model_names)
        if config.chat_template is None:
            raise APIError(400, "this model has no chat template: start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": inputs.check_text(m.text, "messages"),
                     **({"name": m.name} if m.name else {})} for m in body.messages]
        text = config.chat_template.render(messages, body.add_generation_prompt)
        ids = await inputs.encode(state.tokenizer, text, "messages")
        if not ids:
            raise APIError(400, "the chat template rendered these messages to an empty prompt", param="messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = [inputs.sampling_params(body, len(ids), engine, body.max_new_tokens, k)]
        shape = Shape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, chat=True,
                      include_usage=body.include_usage)
        gen = Generation(state, shape, [Prompt(ids, text)], params, logprobs=k, arrival=arrival)
        return await _answer(request, gen, body.stream)

    return CountStatus(Gate(app, state), state.metrics), state


class EventStream(StreamingResponse):
    """The SSE response of a generation. Its close also runs when the body never started (the client left
    before the first byte): Starlette would then drop the unstarted generator, and with it the abort."""

    def __init__(self, gen: Generation):
        super().__init__(gen.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        self.generation = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _answer(request: Request, gen: Generation, stream: bool):
    if stream:
        return EventStream(gen)
    work = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():  # the client left (or we were cancelled): stop the generation now
            work.cancel()
        gone.cancel()
    if work.cancelled() or not work.done():
        gen.close()
        return Response(status_code=499)
    return JSONResponse(work.result())


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
