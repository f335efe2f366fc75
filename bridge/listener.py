"""Listening sockets that a slow or greedy client cannot starve.

aiohttp alone waits as long as a client likes for a request's headers and keeps any number of
connections open. :class:`Listener` serves an :class:`aiohttp.web.AppRunner`'s server through a thin
protocol of its own (:class:`_Guarded`) that adds:

* a **header deadline**: a connection that has no request in a handler ``header_timeout`` seconds
  after it opened (or after its last answer) is closed — a client trickling its headers, or holding
  an idle connection open past the deadline, loses it. (aiohttp's ``keepalive_timeout``, kept short,
  closes idle connections sooner.)
* a **connection cap** per listener: past ``max_connections`` open at once, a new connection is
  closed as it arrives, counted and logged at most once per interval (:mod:`bridge.refusals`).
* **accept failures** (EMFILE and its kin: out of file descriptors) counted and logged once per
  interval through the loop's exception handler (:func:`install_accept_guard`), instead of a
  traceback per failed ``accept``; the loop itself retries a second later.

The body deadline is :func:`bridge.limits.read_capped`'s, set per app (``BODY_TIMEOUT_KEY``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bridge import logging as blog
from bridge import refusals

log = blog.get("http")


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a header deadline, counted by its listener."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        server = listener.runner.server
        assert server is not None  # the runner is set up before the listener starts
        self.inner: Any = server()  # aiohttp's RequestHandler
        self.transport: Any = None
        self.busy = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- the deadline ------------------------------------------------------------------------------
    def arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.listener.header_timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        refusals.note(log, "http.header_timeout", self.listener.name, "no request in time")
        self.transport.abort()

    # -- asyncio.Protocol, passed on -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods
        self.transport = transport
        lst = self.listener
        if len(lst.open) >= lst.max_connections:
            refusals.note(log, "http.connection_refused", lst.name, "too many connections")
            self.transport.abort()
            return
        lst.open.add(self)
        self.arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in self.listener.open:
            self.listener.open.discard(self)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self in self.listener.open:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self in self.listener.open:
            result: bool | None = self.inner.eof_received()
            return result
        return None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


@web.middleware
async def request_in_progress(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Marks the connection busy while a handler runs (the header deadline does not apply then) and
    restarts its deadline once the handler is done."""
    transport = request.transport
    proto = transport.get_protocol() if transport is not None else None
    if not isinstance(proto, _Guarded):
        return await handler(request)
    proto.busy += 1
    try:
        return await handler(request)
    finally:
        proto.busy -= 1
        if not proto.busy:
            proto.arm()


#: connections the kernel queues before the daemon accepts them. aiohttp's default is 128: under a
#: flood of short connections the queue fills, and a SYN that finds it full waits for the client's
#: 1 s retransmission — a second added to a legitimate callback (bench/abuse measures it).
BACKLOG = 1024


class Listener:
    """One listening socket for ``runner`` (set up) with the guards above."""

    def __init__(
        self,
        runner: web.AppRunner,
        name: str,
        *,
        header_timeout: float,
        max_connections: int,
    ) -> None:
        self.runner = runner
        self.name = name
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open: set[_Guarded] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; the bound port (``port`` 0 picks one)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Guarded(self), host, port, reuse_address=True, backlog=BACKLOG
        )
        sock = self.server.sockets[0]
        bound: int = sock.getsockname()[1] if sock.family in (socket.AF_INET, socket.AF_INET6) else port
        return bound

    async def stop(self) -> None:
        """Stop accepting (open connections are finished by the runner's cleanup)."""
        if self.server is not None:
            self.server.close()
            self.server = None


#: the message asyncio's loop gives its exception handler when accept() runs out of descriptors
_ACCEPT_FAILED = "socket.accept() out of system resource"


def install_accept_guard(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Count accept failures (EMFILE, ENFILE, ENOBUFS, ENOMEM) and log them once per interval; every
    other exception goes to the handler that was there. Returns the undo."""
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        msg = str(context.get("message", ""))
        exc = context.get("exception")
        if msg.startswith(_ACCEPT_FAILED) or ("accept" in msg and isinstance(exc, OSError)):
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            refusals.note(log, "http.accept_failed", "listener", str(reason))
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)
