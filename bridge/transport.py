"""How adapters POST: one interface, :class:`Poster`, and the two clients behind it.

Adapters get one from their context (``ctx.poster(url, headers)``, beside ``ctx.http()``, the
daemon's one aiohttp session), never by building a client of their own.

- :class:`~bridge.http1.Http1Pool`: a small keep-alive HTTP/1.1 client of our own, for
  plain ``http://`` URLs without credentials;
- :class:`AiohttpPoster`: aiohttp's client, through the daemon's one session (``Context.http``),
  for everything else (TLS, credentials in the URL).

Both answer the same way for the same bytes on the wire — the conformance tests
(tests/integration/test_http1.py) run every framing against both: a close-delimited body in
several segments, chunked with trailers, 1xx interim answers, a server closing a kept-alive
connection, a body over :data:`~bridge.http1.MAX_BODY` (cut there; the small client
then closes the connection, whose rest it never read).

Why two: measured side by side against a local receiver (``python -m bench.http_clients``,
figures in bench/RESULTS.md), aiohttp's client spends several times the CPU per request of the
small one (URL and header objects, cookie jar, tracing, timers, a task per body write), and on
the relay's hot path that cost is most of the sink's work. The small client stays for plain
``http://``; everything it does not do (TLS, proxies, redirects, compression, cookies,
credentials) goes to aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import aiohttp

from bridge.http1 import MAX_BODY, Http1Pool, Response, supports


class Poster(Protocol):
    """POSTs to one URL with fixed headers."""

    async def post(self, headers: Iterable[tuple[str, str]], body: bytes, timeout: float) -> Response:
        """One request. Raises ValueError for a header holding CR/LF; OSError, TimeoutError,
        EOFError, :class:`~bridge.http1.ProtocolError` or :class:`aiohttp.ClientError`
        when the receiver cannot be reached or answers something that is not HTTP."""
        ...

    async def close(self) -> None: ...


class AiohttpPoster:
    """POSTs through aiohttp's client on the daemon's session; bodies read up to MAX_BODY."""

    def __init__(
        self, url: str, headers: Iterable[tuple[str, str]], http: Callable[[], aiohttp.ClientSession]
    ) -> None:
        self.url = url
        self.headers = dict(headers)
        self._http = http

    async def post(self, headers: Iterable[tuple[str, str]], body: bytes, timeout: float) -> Response:
        extra = dict(headers)
        for name, value in extra.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name}: the value holds CR or LF")
        async with self._http().post(
            self.url,
            data=body,
            headers={**self.headers, **extra},
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # as the small client: a 3xx is answered as it is
        ) as resp:
            data = await read_at_most(resp.content, MAX_BODY)
            if not resp.content.at_eof():
                resp.close()  # cut at the cap: the rest is not read, the connection not reused
            found = {k.lower(): ", ".join(resp.headers.getall(k)) for k in resp.headers}
            return Response(resp.status, found, data)

    async def close(self) -> None:
        """Nothing to release: the session is the daemon's."""


async def read_at_most(content: aiohttp.StreamReader, n: int) -> bytes:
    """A response body up to ``n`` bytes: read until ``n`` or the end (one ``content.read(n)``
    returns only what is buffered, so a body that arrives in several segments would come back cut).
    Whether more followed: ``content.at_eof()``; a caller that must refuse an oversize body reads
    ``cap + 1``."""
    data = b""
    while len(data) < n and (more := await content.read(n - len(data))):
        data += more
    return data


def poster(url: str, headers: Iterable[tuple[str, str]], http: Callable[[], aiohttp.ClientSession]) -> Poster:
    """The client for ``url``: the small one for plain ``http://``, aiohttp's for the rest."""
    headers = list(headers)
    if supports(url):
        return Http1Pool(url, headers)
    return AiohttpPoster(url, headers, http)
