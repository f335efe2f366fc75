"""The http sink's small HTTP/1.1 client against a scripted local server: framing, reuse, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from bridge import http1
from bridge.bus import Field
from bridge.http1 import Http1Pool, ProtocolError, supports
from bridge.transport import AiohttpPoster, Poster

Script = Callable[[bytes], list[bytes | float | None] | None]


class Server:
    """Reads one request at a time; answers with ``script(request)``: the chunks to write, then
    ``None`` in the list closes the connection, a number sends what was written so far and pauses
    that many seconds (the next chunk arrives as a segment of its own); a None script result
    answers nothing."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(w)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                req = head + await r.readexactly(length)
                self.requests.append(req)
                answer = self.script(req)
                if answer is None:
                    await asyncio.sleep(3600)
                    return
                for chunk in answer:
                    if chunk is None:
                        await w.drain()
                        w.close()
                        return
                    if isinstance(chunk, float):
                        await w.drain()
                        await asyncio.sleep(chunk)
                        continue
                    w.write(chunk)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> Server:
        s = Server(script)
        srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        s.port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
        return s

    yield start
    for srv in servers:
        srv.close()


def ok(body: bytes = b'{"id":"r1"}', extra: bytes = b"") -> list[bytes | float | None]:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body]


def test_supports_only_plain_http_without_credentials() -> None:
    assert supports("http://127.0.0.1:8080/in?x=1")
    assert supports("http://[::1]/in")
    assert not supports("https://example.com/in")
    assert not supports("http://user:pw@example.com/in")
    assert not supports("http://example.com:99999/in")
    assert not supports("ftp://example.com/")


async def test_request_bytes_and_keep_alive_reuse(serve: Any) -> None:
    srv = await serve(lambda _: ok())
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/in?a=b", [("X-Static", "1")])
    for _ in range(3):
        resp = await pool.post([("X-Bridge-Delivery", "d1")], b'{"x":1}', 5)
        assert resp.status == 200 and resp.body == b'{"id":"r1"}'
    assert srv.connections == 1
    head, _, body = srv.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /in?a=b HTTP/1.1"
    assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
    assert b"X-Static: 1" in lines and b"X-Bridge-Delivery: d1" in lines and b"Content-Length: 7" in lines
    assert body == b'{"x":1}'
    await pool.close()


async def test_chunked_interim_and_empty_bodies(serve: Any) -> None:
    answers = [
        [b"HTTP/1.1 100 Continue\r\n\r\n", *ok(b"after-continue")],
        [
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{"id\r\n7\r\n":"c1"}\r\n0\r\nX-T: 1\r\n\r\n'
        ],
        [b"HTTP/1.1 204 No Content\r\n\r\n"],
        ok(b"last"),
    ]
    srv = await serve(lambda _: answers.pop(0))
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    assert (await pool.post([], b"", 5)).body == b"after-continue"
    assert (await pool.post([], b"", 5)).body == b'{"id":"c1"}'
    resp = await pool.post([], b"", 5)
    assert resp.status == 204 and resp.body == b""
    assert (await pool.post([], b"", 5)).body == b"last"
    assert srv.connections == 1  # every framing above leaves the connection reusable
    await pool.close()


async def test_connection_close_and_http10_are_not_reused(serve: Any) -> None:
    answers = [
        ok(b"a", b"Connection: close\r\n"),
        [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb"],
        [b"HTTP/1.1 200 OK\r\n\r\nread-until-close", None],
        ok(b"d"),
    ]
    srv = await serve(lambda _: answers.pop(0))
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    bodies = [(await pool.post([], b"", 5)).body for _ in range(4)]
    assert bodies == [b"a", b"b", b"read-until-close", b"d"]
    assert srv.connections == 4
    await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(serve: Any) -> None:
    srv = await serve(lambda _: ok())
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    await pool.post([], b"", 5)
    for w in srv.writers:
        w.close()  # the server drops the idle keep-alive connection
    await asyncio.sleep(0.1)
    assert (await pool.post([], b"", 5)).status == 200
    assert srv.connections == 2
    await pool.close()


async def test_idle_connections_expire(serve: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(http1, "IDLE_TIMEOUT", 0.05)
    srv = await serve(lambda _: ok())
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    await pool.post([], b"", 5)
    await asyncio.sleep(0.1)
    await pool.post([], b"", 5)
    assert srv.connections == 2
    await pool.close()


async def test_no_answer_times_out(serve: Any) -> None:
    srv = await serve(lambda _: None)
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await pool.post([], b"", 0.3)
    assert 0.25 < loop.time() - t0 < 2
    await pool.close()


async def test_refused_connection_and_garbage_answers(serve: Any) -> None:
    pool = Http1Pool("http://127.0.0.1:1/")
    with pytest.raises(OSError):
        await pool.post([], b"", 5)
    srv = await serve(lambda _: [b"SMTP ready\r\n\r\n"])
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    with pytest.raises(ProtocolError):
        await pool.post([], b"", 5)
    srv = await serve(lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None])
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    with pytest.raises(asyncio.IncompleteReadError):
        await pool.post([], b"", 5)


async def test_a_close_delimited_body_in_several_segments_comes_back_whole(serve: Any) -> None:
    srv = await serve(lambda _: [b"HTTP/1.1 200 OK\r\n\r\nfirst-", 0.05, b"second-", 0.05, b"third", None])
    pool = Http1Pool(f"http://127.0.0.1:{srv.port}/")
    assert (await pool.post([], b"", 5)).body == b"first-second-third"
    await pool.close()


async def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError):
        Http1Pool("http://127.0.0.1:1/", [("X-A", "1\r\nX-Evil: 2")])
    pool = Http1Pool("http://127.0.0.1:1/")
    with pytest.raises(ValueError):
        await pool.post([("X-Bridge-Delivery", "d\r\nX-Evil: 1")], b"", 5)


SINK = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "out"
type = "http"
url = "{url}"
retry_base = 0.05
max_attempts = 2
[[routes]]
from = "in"
to = "out"
"""


async def test_the_sink_uses_it_for_http_and_a_redirect_is_permanent(
    serve: Any, write_config: Any, start_daemon: Any
) -> None:
    from bridge.envelope import Conversation, make_envelope
    from tests.conftest import wait_for

    srv = await serve(lambda _: [b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"])
    d = await start_daemon(write_config(SINK.format(url=f"http://127.0.0.1:{srv.port}/in")))
    assert d.sinks["out"]._pool is not None
    await d.bus.publish(make_envelope("in", Conversation("g1"), "x"))
    await wait_for(lambda: d.redis.xlen(d.bus.keys.dead))
    [(_, fields)] = await d.redis.xrange(d.bus.keys.dead)
    assert fields[Field.REASON.key].startswith(b"permanent: HTTP 302 from the receiver")
    assert len(srv.requests) == 1


async def test_https_goes_through_aiohttp(write_config: Any, start_daemon: Any) -> None:
    d = await start_daemon(write_config(SINK.format(url="https://127.0.0.1:1/in")))
    assert d.sinks["out"]._pool is None


# -- conformance: the small client and aiohttp's answer alike (bridge/transport.py) ------


@pytest.fixture(params=["http1", "aiohttp"])
async def client(request: Any) -> AsyncIterator[Callable[[str], Poster]]:
    """A factory of the ``http`` sink's clients for a URL: each test runs against both."""
    session = aiohttp.ClientSession()
    made: list[Poster] = []

    def make(url: str) -> Poster:
        p: Poster = Http1Pool(url) if request.param == "http1" else AiohttpPoster(url, [], lambda: session)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()
    await session.close()


async def test_conformance_close_delimited_body_in_segments(serve: Any, client: Any) -> None:
    srv = await serve(
        lambda _: [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst-", 0.05, b"second", None]
    )
    resp = await client(f"http://127.0.0.1:{srv.port}/").post([], b"x", 5)
    assert (resp.status, resp.body) == (200, b"first-second")


async def test_conformance_chunked_with_trailers(serve: Any, client: Any) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n"
    srv = await serve(lambda _: [chunked, 0.02, b"3\r\nefg\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"])
    post = client(f"http://127.0.0.1:{srv.port}/").post
    assert (await post([], b"", 5)).body == b"abcdefg"
    assert (await post([], b"", 5)).body == b"abcdefg"
    assert srv.connections == 1  # trailers read to their end: the connection is reusable


async def test_conformance_interim_answers(serve: Any, client: Any) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    srv = await serve(lambda _: [interim, *ok(b"final", b"X-Final: yes\r\n")])
    resp = await client(f"http://127.0.0.1:{srv.port}/").post([], b"", 5)
    assert (resp.status, resp.body, resp.headers.get("x-final"), "link" in resp.headers) == (
        200,
        b"final",
        "yes",
        False,
    )


async def test_conformance_server_closes_a_kept_alive_connection(serve: Any, client: Any) -> None:
    srv = await serve(lambda _: ok())
    post = client(f"http://127.0.0.1:{srv.port}/").post
    assert (await post([], b"", 5)).status == 200
    for w in srv.writers:
        w.close()
    await asyncio.sleep(0.1)
    assert (await post([], b"", 5)).body == b'{"id":"r1"}'
    assert srv.connections == 2


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
async def test_conformance_a_body_over_the_cap_is_cut_and_not_reused(
    serve: Any, client: Any, framing: str
) -> None:
    big = b"x" * (http1.MAX_BODY + 10)
    if framing == "content-length":
        first: list[bytes | float | None] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
        ]
    elif framing == "chunked":
        first = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
        ]
    else:
        first = [b"HTTP/1.1 200 OK\r\n\r\n" + big, None]
    answers = [first, ok(b"next")]
    srv = await serve(lambda _: answers.pop(0))
    poster = client(f"http://127.0.0.1:{srv.port}/")
    resp = await poster.post([], b"", 5)
    assert (resp.status, len(resp.body)) == (200, http1.MAX_BODY)
    assert (await poster.post([], b"", 5)).body == b"next"
    if isinstance(poster, Http1Pool) or framing == "close":
        # the small client leaves the rest unread, so it cannot reuse the connection; aiohttp
        # reuses one whose whole body arrived (it released it before we cut)
        assert srv.connections == 2


async def test_pin_the_private_streamreader_buffer_the_reuse_check_reads() -> None:
    """``_Conn.usable`` reads asyncio's private ``StreamReader._buffer`` to refuse reusing a connection
    with stray bytes after a response: fail loudly here if asyncio changes it."""
    reader = asyncio.StreamReader()
    assert hasattr(reader, "_buffer") and not reader._buffer
    reader.feed_data(b"stray")
    assert bytes(reader._buffer) == b"stray"
    await reader.readexactly(5)
    assert not reader._buffer
