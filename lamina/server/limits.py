"""Bounded work before trust: what a client can make the server hold before its request is
even looked at (authenticated, parsed, tokenized).

`LimitsMiddleware` wraps the whole app:

- a declared Content-Length over `max_body_bytes` is answered 413 at once, without reading;
- the body is read with a per-read timeout (`body_read_timeout`) and a total one
  (`body_timeout`): a client that stops sending, or trickles, gets 408 and its connection is
  closed, so half-sent bodies cannot pile up in memory; a body growing past the limit is 413;
- at most `max_in_flight_requests` HTTP requests are read or answered at once; beyond it, 429
  with `Retry-After`. `/health` and `/metrics` are exempt from all of it, so they answer
  whatever else is in flight.

The other bounds live where the request is understood: the prompt's character count and the
caps on stop strings, logit_bias and prompts x n in serving.py, the per-request deadline in
async_engine.py, the connection cap in uvicorn's config (cli.py).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.server.errors import APIError
from lamina.server.settings import ServerSettings

EXEMPT_PATHS = frozenset({"/health", "/metrics"})
RETRY_AFTER_SECONDS = 1


class LimitsMiddleware:
    """See the module docstring. One instance per app; the in-flight count is per app."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        s = self.settings
        if self.in_flight >= s.max_in_flight_requests:
            busy = APIError(
                f"the server is answering {self.in_flight} requests (limit "
                f"{s.max_in_flight_requests}); retry later",
                429,
                type="rate_limit_error",
                code="too_many_requests",
            )
            await _respond(busy, scope, receive, send, retry_after=True)
            return
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # afterwards: http.disconnect when the client leaves

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when a 408 / 413 went out instead (or the client left)."""
        s = self.settings
        too_large = APIError(f"the request body exceeds {s.max_body_bytes} bytes", 413)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > s.max_body_bytes:
            await _respond(too_large, scope, receive, send)
            return None
        deadline = time.monotonic() + s.body_timeout
        body, more = bytearray(), True
        while more:
            wait = min(s.body_read_timeout, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout=wait)
            except asyncio.TimeoutError:
                slow = APIError(
                    f"the request body did not arrive in time (each read may wait "
                    f"{s.body_read_timeout:g} s, the whole body {s.body_timeout:g} s)",
                    408,
                    type="invalid_request_error",
                    code="request_timeout",
                )
                await _respond(slow, scope, receive, send)
                return None
            if message["type"] != "http.request":
                return None  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > s.max_body_bytes:
                await _respond(too_large, scope, receive, send)
                return None
        return bytes(body)


async def _respond(
    error: APIError, scope: Scope, receive: Receive, send: Send, *, retry_after: bool = False
) -> None:
    """Send `error` and close the connection: the body was not (wholly) read, so the
    connection cannot carry another request."""
    response = error.response()
    response.headers["Connection"] = "close"
    if retry_after:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    await response(scope, receive, send)


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, but a request head (request line and headers) must arrive
    within `seconds` of its first byte, or of the connection opening; otherwise the connection
    is closed. uvicorn has no such bound of its own: a client sending its headers a byte at a
    time would hold a connection forever, and enough of them would fill --max-connections.
    (The body is bounded by LimitsMiddleware; an idle kept-alive connection by uvicorn's
    timeout_keep_alive.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _reading_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._reading_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._reading_head():
                self._arm()
            super().data_received(data)
            if not self._reading_head():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
