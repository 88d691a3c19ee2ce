"""``fastgpt serve``: the OpenAI-compatible server on the engine.

    fastgpt serve                                   # the bundled model on http://127.0.0.1:8000
    fastgpt serve --model gpt2 --device cuda --api-key $KEY --chat-template chat.jinja
    torchrun --nproc-per-node 2 -m fastgpt serve --tp 2 --model gpt2 --device cuda

The socket is bound first (a taken port is an error before the model loads), then the engine is built
in a process of its own (serve/engine_process.py: the HTTP side and the engine then have a GIL each),
warmed up with one tiny request, and served until SIGTERM / Ctrl-C (see server.py). --engine-thread
keeps it on a thread of the server process instead.

With --tp N, under torchrun, every rank loads its shard and builds the same engine; rank 0 binds the
socket and serves HTTP, the others run the engine in lockstep with it (serve/engine_loop.py) and leave
when it stops. They ignore SIGINT / SIGTERM (torchrun passes both to every rank): rank 0 drains its
requests, which needs them, then tells them to go.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from fastgpt.cli import _fail, positive_int, resolve_device

DEFAULT_MODEL_NAME = "fastgpt-default"


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF GPT-2 checkpoint dir or hub name (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_non_negative_int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the name(s) clients send as `model` (default: --model as given, or "
                        f"{DEFAULT_MODEL_NAME}); the first is the one /v1/models lists first")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY on /v1/* (default: $FASTGPT_API_KEY, else open)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja2 chat template (default: the model's own, if it has one)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences in one batch")
    p.add_argument("--num-blocks", type=positive_int, default=None, help="KV-cache blocks (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="tokens in one step (default: the engine's, 512 on CPU, 8192 on CUDA)")
    p.add_argument("--max-queue", type=_non_negative_int, default=1024,
                   help="samples that may wait beyond --max-num-seqs; past that, 503 with Retry-After")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds SIGTERM gives in-flight requests before aborting them")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="the engine's torch CPU threads (default on CPU: torch's count minus one, so the HTTP side "
                        "keeps a core: an engine that shares every core with the event loop stalls at each "
                        "parallel region)")
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine on a thread of the server process instead of a process of its own "
                        "(always so with --tp); they then share one GIL")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size: shard the model by heads across this many processes, started with "
                        "torchrun --nproc-per-node N (rank 0 serves HTTP)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")


def run(args) -> int:
    try:
        import fastapi, jinja2, prometheus_client, uvicorn  # noqa: F401, E401
    except ImportError as e:
        return _fail(f"fastgpt serve needs the serve extra (pip install 'fastgpt[serve]'): {e}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("fastgpt.serve")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FASTGPT_API_KEY") or None
    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0, got {args.grace_period}")

    from fastgpt import parallel
    from fastgpt.serve.server import bind, serve

    world = parallel.World.from_env()
    tensor_parallel = args.tp > 1 or world.size > 1
    if tensor_parallel:
        world, _ = parallel.launch_tensor_parallel(args.tp, args.device)
    sock = engine = None

    def bind_socket():
        nonlocal sock
        sock = bind(args.host, args.port)

    try:
        parallel.on_main(world, bind_socket)  # a taken port is the same one-line error on every rank
        import torch

        from fastgpt import Engine, SamplingParams, default_model_dir
        from fastgpt.load import resolve_model_dir
        from fastgpt.serve.app import ServeConfig, build_app
        from fastgpt.serve.chat import load_chat_template
        from fastgpt.serve.engine_loop import follow
        from fastgpt.serve.engine_process import EngineFacts, EngineProcess, EngineSpec

        device = resolve_device(args.device)
        threads = args.threads
        if threads is None and device.type == "cpu":
            threads = max(1, torch.get_num_threads() - 1)
        model_dir = default_model_dir() if args.model is None else resolve_model_dir(args.model)
        template = load_chat_template(model_dir, args.chat_template)
        options = dict(max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
                       max_num_batched_tokens=args.max_num_batched_tokens)
        if tensor_parallel or args.engine_thread:
            if threads is not None:
                torch.set_num_threads(threads)
            engine = Engine.from_pretrained(model_dir, device=args.device if tensor_parallel else device,
                                            dtype=args.dtype, tp=args.tp, **options)
            engine.generate([[0, 0]], SamplingParams(max_tokens=2, temperature=0))  # first-call costs, paid now
            facts = EngineFacts.of(engine)
        else:
            engine = EngineProcess(EngineSpec(model_dir, str(device), args.dtype, threads, options, args.log_level))
            facts = engine.facts
        lockstep = parallel.Lockstep(world) if tensor_parallel else None
        if not world.is_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            log.info("rank %d: the engine follows rank 0", world.rank)
            follow(engine, lockstep)
            log.info("rank %d: rank 0 stopped serving; leaving", world.rank)
            return 0
        state = None
        try:
            names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
            config = ServeConfig(served_model_names=names, api_key=api_key, max_body_bytes=args.max_body_bytes,
                                 max_queue=args.max_queue, chat_template=template)
            app, state = build_app(engine, config, lockstep)
            tp_note = f" x {world.size} ranks (tensor parallel)" if tensor_parallel else ""
            where = "this process's engine thread" if isinstance(engine, Engine) else "an engine process"
            log.info("model %s (%s%s, %s, %d blocks of %d tokens, %d torch threads, in %s), served as %s; "
                     "chat template: %s; api key: %s", model_dir, facts.device, tp_note, facts.dtype,
                     facts.num_blocks, facts.block_size, facts.threads, where, ", ".join(names),
                     template.origin if template else "none", "required" if api_key else "none")
            return serve(app, state, sock, args.grace_period, args.log_level, args.access_log)
        finally:
            if state is not None:
                state.loop.stop()
            # the engine loop tells the other ranks when it ends; if it never ran (or the server never
            # started), they hear it here
            if lockstep is not None and (state is None or not state.loop.thread_alive):
                lockstep.close()
            if state is None and isinstance(engine, EngineProcess):
                engine.stop()
    finally:
        if sock is not None:
            sock.close()
        if tensor_parallel:
            parallel.destroy_process_group()
