from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from bridge.config import Rate
from bridge.ratelimit import Limit, Limiter
from tests.conftest import REDIS_URL


async def test_first_allowed_then_told_how_long_to_wait(redis: Any, prefix: str) -> None:
    lim = Limiter(redis)
    limit = Limit(f"{prefix}:rl", Rate(10, 1.0))  # one every 100 ms
    assert await lim.acquire([limit]) == 0.0
    wait = await lim.acquire([limit])
    assert 0.05 < wait <= 0.1
    await asyncio.sleep(wait)
    assert await lim.acquire([limit]) == 0.0


async def test_burst(redis: Any, prefix: str) -> None:
    lim = Limiter(redis)
    limit = Limit(f"{prefix}:rl", Rate(1, 60.0), burst=3)
    assert [await lim.acquire([limit]) == 0.0 for _ in range(4)] == [True, True, True, False]


async def test_all_keys_must_allow_and_only_then_are_charged(redis: Any, prefix: str) -> None:
    lim = Limiter(redis)
    sink = Limit(f"{prefix}:sink", Rate(100, 1.0))
    alice = Limit(f"{prefix}:alice", Rate(1, 60.0))
    bob = Limit(f"{prefix}:bob", Rate(1, 60.0))
    assert await lim.acquire([sink, alice]) == 0.0
    assert await lim.acquire([sink, alice]) > 50  # alice's quota is spent: about a minute
    await asyncio.sleep(0.011)
    assert await lim.acquire([sink, bob]) == 0.0  # the refused call did not charge the sink key


async def test_two_clients_share_the_rate_and_get_no_more(prefix: str) -> None:
    """Two processes' worth of clients hammer one key for 1.5 s: the total allowed is the rate."""
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(2)]
    rate = Rate(20, 1.0)  # 50 ms apart
    key = f"{prefix}:shared"
    allowed: list[float] = []

    async def hammer(c: Any) -> None:
        lim = Limiter(c)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            wait = await lim.acquire([Limit(key, rate)])
            if wait == 0.0:
                allowed.append(time.monotonic())
            else:
                await asyncio.sleep(min(wait, 0.005))

    await asyncio.gather(*(hammer(c) for c in clients for _ in range(3)))
    for c in clients:
        await c.delete(key)
        await c.aclose()
    # 1.5 s at 20/s: 30 slots (+1 for the one at t=0); never more. Allow a little slack below for a busy machine.
    assert 24 <= len(allowed) <= 31, len(allowed)
    allowed.sort()
    # no one-second window holds more than 20 (+2: grants on the edge, client-side timestamps)
    for i, t in enumerate(allowed):
        assert sum(1 for u in allowed[i:] if u - t < 1.0) <= 22
