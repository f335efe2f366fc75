"""A small HTTP/1.1 client for the ``http`` sink's plain-``http://`` POSTs: keep-alive and nothing else.

Why it exists: aiohttp's client does much per request (URL and header objects, cookie jar,
tracing, timers, a task per body write), and on the relay's hot path that was most of the sink's
work. This client writes one buffer per request and parses a status line and headers. It sits
behind the same interface as aiohttp's (bridge/transport.py, which says why both stay;
the figures are in bench/RESULTS.md, ``python -m bench.http_clients``).

What it does: keep-alive connections per sink (idle ones are dropped before servers usually drop
them), Content-Length and chunked response bodies, bodies delimited by the connection's end,
interim 1xx responses skipped, one deadline per request covering connect, write and read.
What it does not: TLS (``https://`` goes through aiohttp), proxies, redirects (a 3xx is answered
as it is), compression (it asks for none), cookies, credentials in the URL (aiohttp handles those).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Iterable

#: a pooled connection idle this long is closed instead of reused (Node.js servers close after 5 s)
IDLE_TIMEOUT = 4.0
#: response bodies are read up to this size; a longer one is cut and its connection closed
MAX_BODY = 1_048_576
_HEAD_LIMIT = 65_536


class ProtocolError(Exception):
    """The peer's answer is not HTTP/1.x we understand."""


def supports(url: str) -> bool:
    """True for the URLs this client serves: ``http://host[:port]/…`` without credentials."""
    try:
        u = urllib.parse.urlsplit(url)
        _ = u.port
    except ValueError:
        return False
    return u.scheme == "http" and bool(u.hostname) and u.username is None and u.password is None


def _check_header(name: str, value: str) -> None:
    if not name or any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
        raise ValueError(f"header {name!r}: names and values must not hold CR, LF (or ':' in names)")


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        #: lower-case names; a repeated header's values joined with ", "
        self.headers = headers
        self.body = body


class _Conn:
    __slots__ = ("deadline", "expired", "reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = time.monotonic()
        #: loop time by which the request in flight must be answered
        self.deadline = 0.0
        self.expired = False

    def usable(self, now: float) -> bool:
        return (
            now - self.used < IDLE_TIMEOUT
            and not self.reader.at_eof()
            and not self.writer.is_closing()
            # stray bytes: not reusable. asyncio keeps no public way to see them: its private buffer,
            # pinned by tests/integration/test_http1.py::test_pin_the_private_streamreader_buffer_...
            and not self.reader._buffer  # type: ignore[attr-defined]
        )

    def close(self) -> None:
        self.writer.close()


class Http1Pool:
    """POSTs to one origin over reused connections. ``headers`` go on every request."""

    def __init__(self, url: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        if not supports(url):
            raise ValueError("url: only http:// URLs without credentials")
        u = urllib.parse.urlsplit(url)
        assert u.hostname is not None
        self.host = u.hostname
        self.port = u.port or 80
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if u.port is not None and u.port != 80:
            authority += f":{u.port}"
        lines = [f"POST {target} HTTP/1.1", f"Host: {authority}", "Accept: */*", "Accept-Encoding: identity"]
        for name, value in headers:
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        self._head = ("\r\n".join(lines) + "\r\n").encode()
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def post(self, headers: Iterable[tuple[str, str]], body: bytes, timeout: float) -> Response:
        """One request; raises OSError, TimeoutError, asyncio.IncompleteReadError or ProtocolError."""
        parts = []
        for n, v in headers:
            if "\r" in v or "\n" in v:
                raise ValueError(f"header {n}: the value holds CR or LF")
            parts.append(f"{n}: {v}\r\n")
        extra = "".join(parts)
        request = b"".join(
            (self._head, extra.encode(), b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._take()
        if conn is None:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=_HEAD_LIMIT)
            conn = _Conn(reader, writer)
        # one watchdog timer keeps the deadline of every request (cheaper than an asyncio.timeout each)
        conn.deadline = deadline
        self._busy.add(conn)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        try:
            conn.writer.write(request)
            resp, keep = await _read_response(conn.reader)
        except BaseException:
            conn.close()
            if conn.expired:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
            raise
        finally:
            self._busy.discard(conn)
        if keep and not self._closed:
            conn.used = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return resp

    def _expire(self) -> None:
        """Abort requests past their deadline (their read fails at once); re-arm for the next one."""
        self._watchdog = None
        if not self._busy:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn.expired = True
            self._busy.discard(conn)
            conn.writer.transport.abort()
        if self._busy:
            nxt = min(c.deadline for c in self._busy)
            self._watchdog = loop.call_at(max(nxt, now + 0.05), self._expire)

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()
        for c in idle:
            with contextlib.suppress(OSError):
                await c.writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[Response, bool]:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError("response headers too long") from None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError("not an HTTP/1.x status line")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError("malformed header line")
            key = name.strip().lower().decode("latin-1")
            val = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("unexpected protocol switch")
            continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        break
    http10 = parts[0] == b"HTTP/1.0"
    conn_tokens = headers.get("connection", "").lower()
    keep = ("keep-alive" in conn_tokens) if http10 else ("close" not in conn_tokens)
    te = headers.get("transfer-encoding", "").lower()
    if status in (204, 304):
        body, whole = b"", True
    elif te:
        if not te.endswith("chunked"):
            raise ProtocolError(f"unsupported transfer-encoding {te!r}")
        body, whole = await _read_chunked(reader)
    elif "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise ProtocolError("bad content-length") from None
        if n < 0:
            raise ProtocolError("bad content-length")
        body, whole = await reader.readexactly(min(n, MAX_BODY)), n <= MAX_BODY
    else:  # delimited by the end of the connection
        body, whole = await _read_to_end(reader, MAX_BODY)
        keep = False
    return Response(status, headers, body), keep and whole


async def _read_to_end(reader: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    """Everything up to the connection's end, however many segments it comes in; (at most ``cap``
    bytes, True when that was all of it)."""
    buf = bytearray()
    while len(buf) < cap:
        chunk = await reader.read(cap - len(buf))
        if not chunk:
            return bytes(buf), True
        buf += chunk
    return bytes(buf), reader.at_eof()


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body (extensions and trailers skipped); (at most MAX_BODY bytes, True when whole)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            n = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError("bad chunk size") from None
        if n == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(chunks), True
        if size + n > MAX_BODY:  # cut at the cap: the rest stays unread, the connection is closed
            chunks.append(await reader.readexactly(MAX_BODY - size))
            return b"".join(chunks), False
        size += n
        chunks.append(await reader.readexactly(n))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("bad chunk end")
