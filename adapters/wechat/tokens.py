"""The access token of a WeChat API, kept in Redis and shared by every instance.

One process fetches (a Redis lock, ``SET NX PX``); the others wait for its result, so any number of
concurrent sends on any number of instances make one ``gettoken``. A token is refreshed early (at
``refresh_ratio`` of its life) by one process while the others keep using the old one. The token
never goes into an error message or a log line.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bridge import logging as blog
from bridge.errors import RetryableError, SendError
from bridge.lua import source

#: where the cache's scripts live (``adapters/wechat/lua/``)
LUA = "adapters.wechat.lua"

log = blog.get("wechat.api")


Fetch = Callable[[], Awaitable[tuple[str, int]]]


class TokenCache:
    """An access token in Redis (``key``), fetched by one process at a time.

    The value is ``"<refresh-at, unix seconds> <token>"`` with a Redis TTL a little shorter than
    the token's life. ``redis=None`` keeps the token in this process only (the CLI without Redis).
    """

    def __init__(
        self,
        redis: Any | None,
        key: str,
        fetch: Fetch,
        *,
        refresh_ratio: float = 0.8,
        lock_ttl: float = 20.0,
        wait: float = 20.0,
        poll: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.lock_key = key + ":lock"
        self.refresh_ratio = refresh_ratio
        self.lock_ttl = lock_ttl
        self.wait = wait
        self.poll = poll
        self.clock = clock
        self._fetch = fetch
        self._redis = redis
        self._local: tuple[str, float, float] | None = None  # token, refresh at, expires at
        self._local_lock = asyncio.Lock()
        if redis is not None:
            self._store = redis.register_script(source("token_store", LUA))
            self._release = redis.register_script(source("lock_release", LUA))
            self._drop = redis.register_script(source("token_drop", LUA))

    async def get(self) -> str:
        if self._redis is None:
            return await self._get_local()
        deadline = time.monotonic() + self.wait
        while True:
            cached = await self._read()
            if cached is not None:
                token, refresh_at = cached
                if self.clock() < refresh_at:
                    return token
                # due for an early refresh: one process refreshes, the others go on with this one
                owner = await self._lock()
                if owner is None:
                    return token
                try:
                    return await self._refresh(owner)
                except SendError as e:  # the cached token is still valid: use it, refresh later
                    log.warning("wechat.token_refresh_failed", cache=self.key, error=str(e))
                    return token
            owner = await self._lock()
            if owner is not None:
                return await self._refresh(owner)
            if time.monotonic() >= deadline:
                raise RetryableError("timed out waiting for another instance to fetch the access token")
            await asyncio.sleep(self.poll)

    async def invalidate(self, token: str) -> None:
        """Forget ``token`` (WeChat rejected it) unless a newer one replaced it already."""
        if self._redis is None:
            if self._local is not None and self._local[0] == token:
                self._local = None
            return
        await self._drop(keys=[self.key], args=[token])

    async def _read(self) -> tuple[str, float] | None:
        raw = await self._redis.get(self.key) if self._redis is not None else None
        if not raw:
            return None
        at, _, token = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")
        try:
            return token, float(at)
        except ValueError:
            return None

    async def _lock(self) -> str | None:
        assert self._redis is not None
        owner = uuid.uuid4().hex
        ok = await self._redis.set(self.lock_key, owner, nx=True, px=int(self.lock_ttl * 1000))
        return owner if ok else None

    async def _refresh(self, owner: str) -> str:
        try:
            cached = await self._read()  # another process may have stored one since we looked
            if cached is not None and self.clock() < cached[1]:
                return cached[0]
            token, expires_in = await self._fetch()
            ttl, refresh_at = self._times(token, expires_in, cached[0] if cached else None)
            await self._store(
                keys=[self.key, self.lock_key], args=[f"{refresh_at:.3f} {token}", int(ttl * 1000), owner]
            )
            log.info("wechat.token_fetched", cache=self.key, expires_in=expires_in)
            return token
        finally:
            await self._release(keys=[self.lock_key], args=[owner])

    def _times(self, token: str, expires_in: int, previous: str | None) -> tuple[float, float]:
        """(seconds to keep the token, unix time of its early refresh)."""
        ttl = max(1.0, expires_in - min(60.0, expires_in * 0.05))
        # WeCom answers the same token until it expires: refreshing that one early gains nothing
        early = ttl if token == previous else expires_in * self.refresh_ratio
        return ttl, self.clock() + early

    async def _get_local(self) -> str:
        async with self._local_lock:
            now = self.clock()
            if self._local is not None and now < self._local[1] and now < self._local[2]:
                return self._local[0]
            token, expires_in = await self._fetch()
            ttl, refresh_at = self._times(token, expires_in, self._local[0] if self._local else None)
            self._local = (token, refresh_at, self.clock() + ttl)
            return token
