"""The bus on Redis Streams: key names, publish-with-dedupe, consumer groups, acks, dead letters.

Key layout (``P`` is ``[redis] prefix``, default ``wb``; ``{…}`` is a Redis Cluster hash tag, so
every key one script touches lives in one slot):

====================================  =========================================================
``P:{inbound}``                       stream: every envelope the inbound adapters accepted
``P:{inbound}:seen:<source>:<key>``   dedupe marker (platform message id), value = stream id
``P:{out:<sink>}``                    stream: deliveries for one sink
``P:{out:<sink>}:mark:<delivery>``    idempotency marker: ``owner`` while sending, ``done:<remote id>`` after
``P:{out:<sink>}:parts:<delivery>``   how many parts of a split delivery were sent
``P:{out:<sink>}:rl:<n>``             GCRA state of the sink's n-th rate
``P:{out:<sink>}:rl:<recipient>:<n>`` GCRA state of a per-recipient rate
``P:{dead}``                          stream: dead letters with the reason
``P:{state}:<adapter>:<key>``         small adapter state (tokens, cursors)
``P:{draft}:<envelope>``              the reply to an envelope so far (streamed answers), short TTL
====================================  =========================================================

Consumer groups: ``router`` on the inbound stream, ``runner`` on each out stream; consumer names are
``<instance>`` so a restarted instance first drains its own pending entries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.envelope import Delivery, Envelope, encode

ROUTER_GROUP = "router"
RUNNER_GROUP = "runner"

#: Redis errors that mean "the bus is not reachable now": an inbound answers 503 so the platform retries
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def connect(url: str, socket_timeout: float = 3.0) -> Any:
    """A Redis client that fails fast: one quick retry of a dropped connection, then an error.

    redis-py's default (10 retries with back-off up to 10 s) would hold a WeChat callback past its
    5 s deadline; we would rather answer 503 at once and let the platform retry.
    """
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ConstantBackoff

    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(ConstantBackoff(0.05), 1, supported_errors=(RedisConnectionError,)),
    )


class BusUnavailable(Exception):
    """Redis did not take the write; nothing was accepted."""


_PUBLISH = """
-- KEYS[1] stream, KEYS[2] dedupe marker (ignored when ARGV[2] == '0')
-- ARGV[1] payload, ARGV[2] dedupe ttl seconds, ARGV[3] maxlen
if ARGV[2] ~= '0' then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {0, seen} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
if ARGV[2] ~= '0' then redis.call('SET', KEYS[2], id, 'EX', ARGV[2]) end
return {1, id}
"""


@dataclass(frozen=True)
class Keys:
    prefix: str = "wb"

    @property
    def inbound(self) -> str:
        return f"{self.prefix}:{{inbound}}"

    def seen(self, source: str, key: str) -> str:
        return f"{self.prefix}:{{inbound}}:seen:{source}:{key}"

    def out(self, sink: str) -> str:
        return f"{self.prefix}:{{out:{sink}}}"

    def mark(self, sink: str, delivery_id: str) -> str:
        return f"{self.prefix}:{{out:{sink}}}:mark:{delivery_id}"

    def parts(self, sink: str, delivery_id: str) -> str:
        return f"{self.prefix}:{{out:{sink}}}:parts:{delivery_id}"

    def rate(self, sink: str, n: int, recipient: str | None = None) -> str:
        if recipient is None:
            return f"{self.prefix}:{{out:{sink}}}:rl:{n}"
        return f"{self.prefix}:{{out:{sink}}}:rl:{recipient}:{n}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:{{dead}}"

    def state(self, adapter: str, key: str) -> str:
        return f"{self.prefix}:{{state}}:{adapter}:{key}"

    def draft(self, envelope_id: str) -> str:
        return f"{self.prefix}:{{draft}}:{envelope_id}"

    def stream(self, name: str) -> str:
        """The stream a person names: ``inbound``, ``out:<sink>`` or ``dead``."""
        if name == "inbound":
            return self.inbound
        if name == "dead":
            return self.dead
        if name.startswith("out:") and len(name) > 4:
            return self.out(name[4:])
        raise ValueError(f"unknown stream {name!r}: expected inbound, out:<sink> or dead")


Entry = tuple[str, dict[bytes, bytes]]


class Bus:
    def __init__(
        self,
        redis: Any,
        keys: Keys,
        *,
        maxlen: int = 1_000_000,
        dead_maxlen: int = 100_000,
        dedupe_ttl: int = 86_400,
    ) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.maxlen = maxlen
        self.dead_maxlen = dead_maxlen
        self.dedupe_ttl = dedupe_ttl
        self._publish = redis.register_script(_PUBLISH)

    async def publish(
        self, env: Envelope, dedupe_key: str | None = None, dedupe_ttl: int | None = None
    ) -> bool:
        """Store an envelope on the inbound stream; False if ``dedupe_key`` was seen within its TTL.

        One round trip (one Lua call). Raises :class:`BusUnavailable` when Redis is unreachable:
        then nothing was stored and the caller must not answer success.
        """
        ttl = self.dedupe_ttl if dedupe_ttl is None else dedupe_ttl
        marker = self.keys.seen(env.source, dedupe_key) if dedupe_key else self.keys.inbound
        try:
            res = await self._publish(
                keys=[self.keys.inbound, marker],
                args=[encode(env), ttl if dedupe_key else 0, self.maxlen],
            )
        except UNAVAILABLE as e:
            raise BusUnavailable(str(e)) from e
        return bool(res[0])

    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(
        self, stream: str, group: str, consumer: str, *, count: int, block_ms: int | None, start: str = ">"
    ) -> list[Entry]:
        res = await self.redis.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
        if not res:
            return []
        out: list[Entry] = []
        for _name, entries in res:
            for eid, fields in entries:
                if fields is None:  # a pending entry trimmed away
                    continue
                out.append((eid.decode() if isinstance(eid, bytes) else eid, fields))
        return out

    async def read_or_stop(
        self,
        stop: asyncio.Event,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int | None,
        start: str = ">",
    ) -> list[Entry]:
        """:meth:`read`, abandoned (with no entries) as soon as ``stop`` is set."""
        if block_ms is None:
            return await self.read(stream, group, consumer, count=count, block_ms=None, start=start)
        read = asyncio.ensure_future(
            self.read(stream, group, consumer, count=count, block_ms=block_ms, start=start)
        )
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if read.done():
            return read.result()
        # Cancelled mid-read, Redis may already have handed us entries: they stay pending under our
        # consumer name, and our next life reads its own pending entries first. Nothing is lost.
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)
        return []

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xack(stream, group, *ids)

    def deliveries_pipeline(self, deliveries: Sequence[Delivery], pipe: Any) -> None:
        for d in deliveries:
            pipe.xadd(self.keys.out(d.sink), {"d": encode(d)}, maxlen=self.maxlen, approximate=True)

    async def dead_letter(
        self, payload: bytes, *, reason: str, origin: str, attempts: int, instance: str, pipe: Any = None
    ) -> None:
        fields: dict[str, Any] = {
            "d": payload,
            "reason": reason,
            "from": origin,
            "attempts": attempts,
            "instance": instance,
            "at": f"{time.time():.3f}",
        }
        if pipe is not None:
            pipe.xadd(self.keys.dead, fields, maxlen=self.dead_maxlen, approximate=True)
        else:
            await self.redis.xadd(self.keys.dead, fields, maxlen=self.dead_maxlen, approximate=True)
