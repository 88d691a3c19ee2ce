"""The ASGI layers in front of the routes, outermost first:

  CountStatus  counts every answer in fastgpt_http_requests_total{endpoint, status}
  Gate         for /v1/*: 503 while draining; 401 without the right Bearer key (compared in constant
               time, before the body is read); 413 for a body over the limit (by Content-Length, or
               counted while it streams in); then hands the buffered body on.

/health and /metrics stay open with a key set (as vLLM's /health does): probes carry no secrets.
"""

from __future__ import annotations

import hashlib
import hmac

from fastgpt.serve.errors import error_bytes


async def send_error(send, status: int, message: str, code: str | None = None, headers: list | None = None):
    body = error_bytes(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class CountStatus:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_http(scope["path"], status[0] if status else 499)  # 499: the client left first


class Gate:
    def __init__(self, app, state):
        self.app, self.state = app, state
        key = state.config.api_key
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # hash both sides: compare_digest then compares equal lengths, so not even the key's length leaks
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                   self._key_digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.state.draining:
            return await send_error(send, 503, "the server is shutting down", code="shutting_down",
                                    headers=[(b"retry-after", b"5"), (b"connection", b"close")])
        headers = dict(scope["headers"])
        if self._key_digest is not None and not self._authorized(headers):
            return await send_error(send, 401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                                    code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        limit = self.state.config.max_body_bytes
        too_big = (f"the request body exceeds the server's limit of {limit} bytes (--max-body-bytes)")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit():
                return await send_error(send, 413, too_big, code="body_too_large", headers=[(b"connection", b"close")])
            return await send_error(send, 400, "Content-Length is not a number")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await send_error(send, 413, too_big, code="body_too_large", headers=[(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)
