"""Reading an aiohttp client response up to a cap: the whole body when it arrives in several
segments (one ``content.read(n)`` returns only what is buffered), cut or refused past the cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bridge.poller import TransientFeedError, read_body
from bridge.transport import read_at_most

BODY = b'{"data": [' + b",".join(b'{"id": %d}' % i for i in range(2000)) + b"]}"


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async def segmented(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(BODY), 4096):  # several writes, apart in time
            await resp.write(BODY[i : i + 4096])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", segmented)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/"
    await runner.cleanup()


async def test_a_segmented_body_comes_back_whole(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_at_most(r.content, len(BODY) + 10) == BODY


async def test_read_at_most_stops_at_the_cap(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_at_most(r.content, 5000) == BODY[:5000]


async def test_a_feed_reads_a_segmented_body_whole_and_refuses_one_over_its_cap(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert await read_body(r, len(BODY)) == BODY
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        with pytest.raises(TransientFeedError, match="over max_response"):
            await read_body(r, len(BODY) - 1)
