"""Fenced leases against real Redis: one holder, take-over after expiry, fencing of an old holder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.bus import Keys
from bridge.lease import Lease
from bridge.lua import source


def make(redis: Any, prefix: str, owner: str, ttl: float = 1.0) -> Lease:
    return Lease(redis, Keys(prefix), "res", owner, ttl=ttl)


async def test_one_holder_at_a_time(redis: Any, prefix: str) -> None:
    a, b = make(redis, prefix, "a"), make(redis, prefix, "b")
    assert await a.acquire()
    assert a.held and a.fence == 1
    assert not await b.acquire()
    assert not b.held and b.fence == 0
    assert await a.acquire()  # keeping it: same fence, ttl renewed
    assert a.fence == 1


async def test_takeover_after_expiry_gets_a_larger_fence(redis: Any, prefix: str) -> None:
    a, b = make(redis, prefix, "a", ttl=0.4), make(redis, prefix, "b", ttl=0.4)
    assert await a.acquire()
    await asyncio.sleep(0.5)  # a paused: its lease expired in Redis
    assert not a.held  # and locally a no longer trusts it
    assert await b.acquire()
    assert b.fence == 2
    # a wakes up: its renewal, release and guarded writes are refused
    a.fence = 1
    a._valid_until = float("inf")  # pretend a's clock did not notice the pause
    assert not await a.guarded_set(f"{prefix}:cursor", "old")
    assert await redis.get(f"{prefix}:cursor") is None
    a.fence = 1
    assert not await a.renew()
    assert a.fence == 0
    a.fence = 1
    assert not await a.release()
    assert await redis.get(Keys(prefix).lease("res")) == b"b|2"


async def test_guarded_set_writes_while_held(redis: Any, prefix: str) -> None:
    a = make(redis, prefix, "a")
    assert not await a.guarded_set(f"{prefix}:k", "v")  # not held: nothing written
    assert await a.acquire()
    assert await a.guarded_set(f"{prefix}:k", "v", ttl=60)
    assert await redis.get(f"{prefix}:k") == b"v"
    assert 0 < await redis.ttl(f"{prefix}:k") <= 60


async def test_release_lets_another_take_at_once(redis: Any, prefix: str) -> None:
    a, b = make(redis, prefix, "a"), make(redis, prefix, "b")
    assert await a.acquire()
    assert await a.release()
    assert not a.held
    assert await b.acquire()


async def test_run_keeps_and_hands_over(redis: Any, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make(redis, prefix, "a", ttl=0.6), make(redis, prefix, "b", ttl=0.6)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    ta = asyncio.create_task(a.run(stop_a))
    await asyncio.wait_for(a.wait_held(), 2)
    tb = asyncio.create_task(b.run(stop_b, retry=0.05))
    await asyncio.sleep(1.5)  # several ttls: a keeps renewing, b never gets it
    assert a.held and not b.held

    async def vanish() -> bool:  # kill -9: nothing is released
        return False

    monkeypatch.setattr(a, "release", vanish)
    ta.cancel()  # a dies without releasing: b takes over within ttl + retry
    await asyncio.gather(ta, return_exceptions=True)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(b.wait_held(), 2)
    assert loop.time() - t0 <= 0.6 + 0.2
    stop_b.set()
    await tb
    assert not b.held
    assert await redis.get(Keys(prefix).lease("res")) is None  # released on stop


def test_lease_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Lease(None, Keys("x"), "n", "o", ttl=0)


def test_includes_are_resolved() -> None:
    text = source("lease_renew")
    assert "--!include" not in text
    assert "local function lease_held" in text
