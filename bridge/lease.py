"""Fenced leases in Redis: exactly one process at a time acts for a named resource.

A lease is held by one *owner* (a process life) for ``ttl`` and renewed every ``ttl/3``. Each time it
changes hands it gets a new, larger *fence*; a write made under the lease goes through a script that
checks owner and fence (``lua/lease_check.lua``), so an old holder that was paused (GC, a stopped
VM, a lost network) and woke up after the lease moved on cannot act: its renewal and its guarded
writes are refused. Locally, a holder also stops acting when it could not renew before its lease's
earliest possible expiry (``held`` turns false then, without asking Redis).

Used by everything that must run on one instance at a time: a socket the platform allows once per
bot, one poll in flight per feed. Take-over time after a holder dies is at most ``ttl`` plus one
retry interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import Any

from bridge import logging as blog
from bridge.bus import UNAVAILABLE, Keys
from bridge.lua import source

#: a holder stops trusting its lease this long before the earliest moment Redis may expire it
SAFETY = 0.1


#: every Lease object alive in this process (/metrics shows which ones this instance holds)
LIVE: weakref.WeakSet[Lease] = weakref.WeakSet()


class Lease:
    """One named lease, as seen by one owner. ``run()`` keeps trying to hold it until stopped."""

    def __init__(self, redis: Any, keys: Keys, name: str, owner: str, *, ttl: float = 10.0) -> None:
        if ttl <= 0.3:
            raise ValueError("lease ttl must be more than 0.3 s")
        self.redis = redis
        self.name = name
        self.key = keys.lease(name)
        self.fence_key = f"{self.key}:fence"
        self.owner = owner
        self.ttl = ttl
        #: the fence of our current holding (0: not held)
        self.fence = 0
        self._valid_until = 0.0
        self._held = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost.set()
        self._acquire = redis.register_script(source("lease_acquire"))
        self._renew = redis.register_script(source("lease_renew"))
        self._release = redis.register_script(source("lease_release"))
        self._guarded_set = redis.register_script(source("lease_guarded_set"))
        self.log = blog.get("lease", lease=name)
        LIVE.add(self)

    @property
    def held(self) -> bool:
        """True while the lease is ours and cannot have expired in Redis yet."""
        return self.fence > 0 and time.monotonic() < self._valid_until

    @property
    def valid_for(self) -> float:
        """Seconds our holding stays trusted without another renewal (0 when not held)."""
        return max(self._valid_until - time.monotonic(), 0.0) if self.fence else 0.0

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def acquire(self) -> bool:
        """Try once: True when the lease is ours now (taken or kept)."""
        sent = time.monotonic()
        fence, _left = await self._acquire(keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms])
        if int(fence) > 0:
            self._set_held(int(fence), sent)
            return True
        self._set_lost("taken")
        return False

    async def renew(self) -> bool:
        """Extend our holding; False (and ``held`` false) when it was lost meanwhile."""
        if self.fence == 0:
            return False
        sent = time.monotonic()
        ok = await self._renew(keys=[self.key], args=[self.owner, self.fence, self.ttl_ms])
        if int(ok) == 1:
            self._valid_until = sent + self.ttl * (1 - SAFETY)
            return True
        self._set_lost("lost")
        return False

    async def release(self) -> bool:
        """Give the lease up now (another instance may take it at once); True if it was ours."""
        if self.fence == 0:
            return False
        fence = self.fence
        self._set_lost("released")
        ok = await self._release(keys=[self.key], args=[self.owner, fence])
        return int(ok) == 1

    async def guarded_set(self, key: str, value: str | bytes, ttl: int = 0) -> bool:
        """SET ``key`` only while Redis still says the lease is ours under our fence."""
        if not self.held:
            return False
        ok = await self._guarded_set(keys=[self.key, key], args=[self.owner, self.fence, value, ttl])
        return int(ok) == 1

    async def wait_held(self) -> None:
        await self._held.wait()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def run(self, stop: asyncio.Event, *, retry: float | None = None) -> None:
        """Hold the lease whenever we can until ``stop``; then release it.

        Renews every ``ttl/3``; when not held, tries again every ``retry`` seconds (default ``ttl/3``),
        so a dead holder's lease is taken within ``ttl + retry``. Redis errors never raise: the
        lease is kept while its local validity lasts and given up after.
        """
        every = self.ttl / 3
        retry = every if retry is None else retry
        try:
            while not stop.is_set():
                try:
                    if self.fence and self.held:
                        await self.renew()
                    else:
                        if self.fence:  # could not renew in time: no longer trust it
                            self._set_lost("expired")
                        await self.acquire()
                except UNAVAILABLE as e:
                    self.log.warning("lease.redis_unavailable", error=str(e))
                    if self.fence and not self.held:
                        self._set_lost("expired")
                wait = every if self.held else retry
                if self.fence:  # never sleep past the moment our holding stops being trusted
                    wait = min(wait, max(self._valid_until - time.monotonic(), 0.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(wait, 0.01))
        finally:
            if self.fence:
                try:
                    await self.release()
                except UNAVAILABLE:
                    self._set_lost("released")

    def _set_held(self, fence: int, sent: float) -> None:
        if fence != self.fence:
            self.log.info("lease.acquired", fence=fence)
        self.fence = fence
        self._valid_until = sent + self.ttl * (1 - SAFETY)
        self._lost.clear()
        self._held.set()

    def _set_lost(self, why: str) -> None:
        if self.fence:
            self.log.info("lease.lost", fence=self.fence, why=why)
        self.fence = 0
        self._valid_until = 0.0
        self._held.clear()
        self._lost.set()
