"""Running the app: a socket bound before the model loads (a taken port fails at once), uvicorn on it, and
the signals handled here.

uvicorn re-raises the SIGTERM it caught once it has shut down, so a plain uvicorn process dies by the
signal (-15) instead of exiting 0. This server takes SIGTERM and SIGINT itself: the first one stops
taking requests (new /v1 requests get 503 while the listener closes), lets those in flight finish
within the grace period (uvicorn's timeout_graceful_shutdown; past it their tasks are cancelled, which
aborts their engine requests), stops the engine loop, and returns 0. A second signal stops waiting.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading

import uvicorn

log = logging.getLogger("fastgpt.serve")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, url: str):
        super().__init__(config)
        self.state, self.url = state, url

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.state.draining = True
        self.should_exit = True
        log.info("%s: draining (in-flight requests get %s s)", signal.Signals(sig).name,
                 self.config.timeout_graceful_shutdown)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"fastgpt serve: listening on {self.url}", flush=True)


def serve(app, state, sock: socket.socket, grace_s: float, log_level: str, access_log: bool) -> int:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=grace_s, timeout_keep_alive=5)
    server = Server(config, state, f"http://{shown}:{port}")
    server.run(sockets=[sock])
    if not server.started:
        print("fastgpt: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0
