"""The minimum durable relay, the floor the bridge's relay is compared with (its own process).

    XREADGROUP a batch → POST each entry (same HTTP client, same concurrency) → XACK the batch

The client is the ``http`` sink's own (bridge/http1.py) unless ``--client aiohttp``
(the daemon's aiohttp session settings: what a user would write with aiohttp).

Durable (an entry is acked only after its POST succeeded; a crash re-reads the pending ones) and
nothing else: no routing, no per-conversation order, no idempotency marker, no rate limit, no retry,
no dead letters. It POSTs the stored envelope bytes as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bridge.bus import Field
from bridge.http1 import Http1Pool


async def relay(
    redis_url: str, stream: str, url: str, concurrency: int, batch: int, go: str | None, client: str
) -> None:
    r = aioredis.Redis.from_url(redis_url)
    while go and not await r.exists(go):  # the harness measures our CPU from here  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    try:
        await r.xgroup_create(stream, "base", id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30, connect=10), connector=aiohttp.TCPConnector(limit=256)
    )
    sem = asyncio.Semaphore(concurrency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    pool = Http1Pool(url, [("Content-Type", "application/json")])

    async def post_aiohttp(body: bytes) -> None:
        async with (
            sem,
            session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            await resp.read()
            resp.raise_for_status()

    async def post_http1(body: bytes) -> None:
        async with sem:
            resp = await pool.post((), body, 30.0)
            if resp.status >= 300:
                raise RuntimeError(f"HTTP {resp.status}")

    post = post_aiohttp if client == "aiohttp" else post_http1

    try:
        while not stop.is_set():
            res: Any = await r.xreadgroup("base", "b1", {stream: ">"}, count=batch, block=1000)
            if not res:
                continue
            entries = res[0][1]
            await asyncio.gather(*(post(f[Field.ENVELOPE.key]) for _, f in entries))
            await r.xack(stream, "base", *[eid for eid, _ in entries])
    finally:
        await session.close()
        await pool.close()
        with contextlib.suppress(Exception):
            await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--go-key", help="start once this Redis key exists")
    ap.add_argument("--client", choices=("http1", "aiohttp"), default="http1")
    a = ap.parse_args()
    coro = relay(a.redis_url, a.stream, a.url, a.concurrency, a.batch, a.go_key, a.client)
    if a.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
