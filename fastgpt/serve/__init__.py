"""``fastgpt serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn).

    fastgpt serve [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

One request's way through:
    middleware.py   count the status; 503 while draining; 401 without the key; 413 past the body limit
    app.py          the routes; parse the body (protocol.py: pydantic models, OpenAI's ranges)
    inputs.py       tokens and SamplingParams, refusing with a 400 what the engine could not run
    engine_loop.py  one thread owns the engine: add / abort / step; outputs back to the event loop
    generation.py   deltas -> OpenAI's JSON or SSE chunks (responses.py); abort on disconnect
    chat.py         chat templates, sandboxed Jinja2;   metrics.py   /metrics (prometheus-client)
    server.py       uvicorn with SIGTERM drained here, exit 0;   cli.py   the command's arguments

Nothing in fastgpt's core imports this package, and this file imports nothing, so ``fastgpt --help`` works
without the ``serve`` extra (pip install 'fastgpt[serve]'); the app itself is ``fastgpt.serve.app.build_app``.
"""
