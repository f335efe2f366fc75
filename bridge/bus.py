"""The bus on Redis Streams: key names, publish-with-dedupe, consumer groups, acks, dead letters.

Key layout (``P`` is ``[redis] prefix``, default ``wb``; ``{…}`` is a Redis Cluster hash tag, so
every key one script touches lives in one slot):

====================================  =========================================================
``P:{inbound}``                       stream: every envelope the inbound adapters accepted
``P:{inbound}:seen:<source>:<key>``   dedupe marker (platform message id), value = stream id
``P:{out:<sink>}``                    stream: deliveries for one sink (its partition 0)
``P:{out:<sink>}:p<n>``               stream: partition n ≥ 1 of the sink's deliveries (by conversation)
``P:{out:<sink>}:mark:<delivery>``    idempotency marker: ``owner`` while sending, ``done:<remote id>`` after
``P:{out:<sink>}:parts:<delivery>``   how many parts of a split delivery were sent
``P:{out:<sink>}:rl:<n>``             GCRA state of the sink's n-th rate
``P:{out:<sink>}:rl:<recipient>:<n>`` GCRA state of a per-recipient rate
``P:{dead}``                          stream: dead letters with the reason
``P:{state}:<adapter>:<key>``         small adapter state (tokens, cursors)
``P:{draft}:<envelope>``              the reply to an envelope so far (streamed answers), short TTL
``P:{lease:<name>}``                  a fenced lease ``<owner>|<fence>`` (``…:fence``: its counter)
``P:{instances}``                     set: instance names that sent a heartbeat (``bridge.status``)
``P:{instances}:<instance>``          an instance's heartbeat (JSON), with a TTL
``P:{members}``                       sorted set: live instances → last heartbeat (unix ms)
====================================  =========================================================

Consumer groups: ``router`` on the inbound stream, ``runner`` on each out stream; consumer names are
``<instance>`` so a restarted instance first drains its own pending entries. Entry fields:
:class:`Field`. The scripts the bus runs (``publish_many.lua``, ``add_deliveries.lua``) are wrapped in
:mod:`bridge.scripts`.
"""

from __future__ import annotations

import asyncio
import enum
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.envelope import Delivery, Envelope, encode
from bridge.errors import BusUnavailable
from bridge.metrics import DISCARD, Metrics
from bridge.scripts import NotReplicated, Publish, Scripts

T = TypeVar("T")


class Field(enum.StrEnum):
    """The fields of stream entries, named once (the Lua scripts write ``e``, ``d`` and ``i`` too).

    ``Field.X`` is the name to write (a str); ``Field.X.key`` the key of an entry redis-py read
    (bytes).
    """

    #: inbound stream: the envelope (JSON)
    ENVELOPE = "e"
    #: out streams and dead letters: the delivery (JSON) — in a dead letter, the undecodable payload
    DELIVERY = "d"
    #: out streams: the delivery's id (the runner finds its idempotency marker by it)
    DELIVERY_ID = "i"
    #: dead letters: why it was given up
    REASON = "reason"
    #: dead letters: the stream it came from (``inbound`` or ``out:<sink>``)
    FROM = "from"
    #: dead letters: how many sends were tried
    ATTEMPTS = "attempts"
    #: dead letters: the instance that gave up
    INSTANCE = "instance"
    #: dead letters: when (unix seconds)
    AT = "at"

    @property
    def key(self) -> bytes:
        return self.value.encode()


ROUTER_GROUP = "router"
RUNNER_GROUP = "runner"

#: Redis errors that mean "the bus is not reachable now": an inbound answers 503 so the platform retries
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def connect(url: str, socket_timeout: float = 3.0) -> Any:
    """A Redis client that fails fast: one quick retry of a dropped connection, then an error.

    redis-py's default (10 retries with back-off up to 10 s) would hold a WeChat callback past its
    5 s deadline; we would rather answer 503 at once and let the platform retry.

    The URL picks the client: ``redis://``, ``rediss://``, ``unix://`` one Redis;
    ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) a Redis Cluster, found from that
    node (redis-py's cluster client: every key lands on its slot's master; the bus's hash tags keep
    each script on one slot); ``redis+sentinel://host:port[,host:port…]/<service>[/<db>]`` the master
    Sentinel names for ``<service>``, found again after a fail-over (a password in the URL is the
    master's).
    """
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ConstantBackoff

    retry = Retry(ConstantBackoff(0.05), 1, supported_errors=(RedisConnectionError,))
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(
            url.replace("+cluster", "", 1),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=retry,
        )
    if url.startswith("redis+sentinel://"):
        return _sentinel(url, socket_timeout, retry)
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=retry,
    )
    pool = client.connection_pool
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return client


def _sentinel(url: str, socket_timeout: float, retry: Any) -> Any:
    """The master of ``redis+sentinel://[:password@]host:port[,host:port…]/<service>[/<db>]``."""
    from urllib.parse import unquote, urlsplit

    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for hp in hosts.split(","):
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis.url: {hp!r} is not host:port (redis+sentinel://host:port/<service>)")
        nodes.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("redis.url: redis+sentinel://host:port[,host:port]/<service>[/<db>]: no service")
    opts: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
                            "retry": retry, "db": int(path[1]) if len(path) == 2 else 0}  # fmt: skip
    if parts.password:
        opts["password"] = unquote(parts.password)
    if parts.username:
        opts["username"] = unquote(parts.username)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
    )
    client = sentinel.master_for(path[0], redis_class=_SentinelMaster, **opts)
    client.sentinels = list(sentinel.sentinels)
    return client


def _sentinel_master_class() -> type:
    import redis.asyncio as aioredis

    class SentinelMaster(aioredis.Redis):
        """The master's client; closing it also closes the clients of the Sentinels it asked."""

        sentinels: list[Any] = []  # noqa: RUF012 - set per instance by _sentinel

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            await super().aclose(close_connection_pool)
            for s in self.sentinels:
                await s.aclose()

    return SentinelMaster


def is_cluster(redis: Any) -> bool:
    """True when ``redis`` is a Redis Cluster client (``redis+cluster://``)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(redis, RedisCluster)


_SentinelMaster = _sentinel_master_class()

_PACKING: dict[type, type] = {}


def hiredis_pack(self: Any, *args: Any) -> list[bytes]:
    """A connection's ``pack_command`` by hiredis (C): the bytes redis-py's own Python loop makes.

    A speed hack on a private redis-py API, fenced: redis-py's ``pack_command`` stays the
    reference, tests/unit/test_hiredis_packing.py checks both give the same bytes for many argument
    shapes (hypothesis) and fails loudly when redis-py's connection class no longer has the method
    this overrides or no longer packs pipelines through it. Kept because the relay's Lua calls
    carry hundreds of arguments each (the figures are in bench/RESULTS.md).
    """
    from hiredis import pack_command

    head = args[0]  # "CONFIG GET": separate words, split exactly as redis-py splits them
    if isinstance(head, str):
        args = (*head.encode().split(), *args[1:])
    elif b" " in head:
        args = (*head.split(), *args[1:])
    return [pack_command(args)]


def _hiredis_packing(cls: type) -> type:
    """``cls`` packing commands with :func:`hiredis_pack` (``cls`` itself without hiredis)."""
    try:
        import hiredis  # noqa: F401
    except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
        return cls
    if cls not in _PACKING:
        _PACKING[cls] = type(f"HiredisPacking{cls.__name__}", (cls,), {"pack_command": hiredis_pack})
    return _PACKING[cls]


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

    def partition(self, sink: str, n: int) -> str:
        """Partition ``n`` of a sink's stream; partition 0 is :meth:`out` itself (bridge/partitions.py)."""
        return self.out(sink) if n == 0 else f"{self.prefix}:{{out:{sink}}}:p{n}"

    @property
    def members(self) -> str:
        """Live instances: a sorted set, instance → last heartbeat (unix ms)."""
        return f"{self.prefix}:{{members}}"

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

    def lease(self, name: str) -> str:
        """A fenced lease (``bridge.lease``); its fence counter is ``lease(name) + ":fence"``."""
        return f"{self.prefix}:{{lease:{name}}}"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:{{instances}}"

    def instance(self, name: str) -> str:
        """An instance's heartbeat (``bridge.status.Heartbeat``), in the slot of :attr:`instances`."""
        return f"{self.prefix}:{{instances}}:{name}"

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


def partition_of(conversation: str, n: int) -> int:
    """The partition (0 ≤ p < n) a conversation's deliveries go to: stable across processes."""
    return zlib.crc32(conversation.encode()) % n if n > 1 else 0


#: seconds a publish waits after the previous publish call went out, so that close ones go together
PUBLISH_LINGER = 0.001


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
        self.scripts = Scripts(redis)
        #: ``[redis] wait_replicas``: (replicas, timeout ms) a publish waits for (WAIT), or None
        self.wait: tuple[int, int] | None = None
        #: published / deduplicated per source are counted here (the daemon sets its own)
        self.metrics: Metrics = DISCARD
        #: partitions per sink (bridge/partitions.py); a sink not named here has one, its stream
        self.partitions: dict[str, int] = {}
        #: publishes waiting for the batch on the wire to come back: (marker, payload, ttl, future)
        self._queue: list[tuple[str, bytes, int, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: loop time the last publish call went out (see PUBLISH_LINGER)
        self._last_flush = -1.0

    async def publish(
        self, env: Envelope, dedupe_key: str | None = None, dedupe_ttl: int | None = None
    ) -> bool:
        """Store an envelope on the inbound stream; False if ``dedupe_key`` was seen within its TTL.

        Raises :class:`BusUnavailable` when Redis is unreachable: then nothing was stored and the
        caller must not answer success. Group commit: a publish goes out at once in one Lua call
        when none is on the wire; publishes made while one is on the wire go together in the next
        call (one round trip for all of them, in order), so under load a callback costs a fraction
        of a round trip and alone it costs one. Publishes following each other closely wait until
        :data:`PUBLISH_LINGER` after the previous call went out, to go together: under a steady
        stream of callbacks each then costs a fraction of a round trip, for at most the linger in
        added latency (measured in bench/RESULTS.md); an occasional publish goes out at once.
        """
        ttl = self.dedupe_ttl if dedupe_ttl is None else dedupe_ttl
        marker = self.keys.seen(env.source, dedupe_key) if dedupe_key else self.keys.inbound
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((marker, encode(env), ttl if dedupe_key else 0, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_publishes())
        stored = await fut
        (self.metrics.published if stored else self.metrics.deduplicated).labels(env.source).inc()
        return stored

    async def _flush_publishes(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch: list[tuple[str, bytes, int, asyncio.Future[bool]]] = []
                try:
                    wait = self._last_flush + PUBLISH_LINGER - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    batch, self._queue = self._queue, []
                    self._last_flush = loop.time()
                    flags = await self.scripts.publish_many(
                        self.keys.inbound, self.maxlen, [Publish(m, p, ttl) for m, p, ttl, _ in batch],
                        wait=self.wait,
                    )  # fmt: skip
                except asyncio.CancelledError:
                    for *_, fut in batch + self._queue:
                        fut.cancel()
                    self._queue = []
                    raise
                except Exception as e:
                    for *_, fut in batch:
                        if not fut.done():
                            gone = isinstance(e, (*UNAVAILABLE, NotReplicated))
                            fut.set_exception(BusUnavailable(str(e)) if gone else e)
                    continue
                for (*_, fut), flag in zip(batch, flags, strict=True):
                    if not fut.done():
                        fut.set_result(flag)
        finally:
            self._flusher = None

    async def ensure_group(self, stream: str, group: str) -> None:
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int | None,
        start: str = ">",
        ack: Sequence[str] = (),
        write: Sequence[Delivery] = (),
    ) -> list[Entry]:
        """XREADGROUP, in one round trip with what must happen first: ``write`` (deliveries appended
        to their sinks' streams, in order, one Lua call per sink) and ``ack`` (XACK of those ids).
        It is one pipeline: Redis applies the writes and the XACK at once, even while the read then
        blocks; an error in any of them raises after the read returned."""
        if not (ack or write):
            return self._entries(
                await self.redis.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
            )

        def before(pipe: Any) -> None:
            for stream_key, pairs in self._by_stream(write).items():
                Scripts.queue_add_deliveries(pipe, stream_key, self.maxlen, pairs)
            if ack:
                pipe.xack(stream, group, *ack)

        entries, _ = await self.read_around(
            stream, group, consumer, count=count, block_ms=block_ms, start=start, before=before
        )
        return entries

    @staticmethod
    def _entries(res: Any) -> list[Entry]:
        if not res:
            return []
        out: list[Entry] = []
        for _name, entries in res:
            for eid, fields in entries:
                if fields is None:  # a pending entry trimmed away
                    continue
                out.append((eid.decode() if isinstance(eid, bytes) else eid, fields))
        return out

    async def read_around(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int | None,
        start: str = ">",
        before: Callable[[Any], None] | None = None,
        after: Callable[[Any], None] | None = None,
    ) -> tuple[list[Entry], list[Any]]:
        """XREADGROUP in one pipeline between the commands ``before(pipe)`` and ``after(pipe)`` add:
        one round trip. Redis runs them in order — ``before``'s at once, even while the read then
        blocks, ``after``'s once it has returned; an error in any raises after the read returned.
        Returns the entries and the other commands' results, in order."""
        pipe: Any = self.redis.pipeline(transaction=False)
        if before is not None:
            before(pipe)
        n = len(pipe)
        pipe.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
        if after is not None:
            after(pipe)
        res = await pipe.execute()
        return self._entries(res[n]), res[:n] + res[n + 1 :]

    async def or_stop(self, stop: asyncio.Event, call: Awaitable[T]) -> T | None:
        """``call`` (a read), abandoned as soon as ``stop`` is set: then None, and whether the writes and
        acks that went with the read were applied is unknown (write and ack again: deliveries dedupe,
        XACK is idempotent)."""
        read = asyncio.ensure_future(call)
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
        return None

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xack(stream, group, *ids)

    def out_streams(self, sink: str) -> list[str]:
        """Every partition stream of ``sink`` (one, its stream, when it is not partitioned)."""
        return [self.keys.partition(sink, n) for n in range(self.partitions.get(sink, 1))]

    async def out_pending(self, sink: str, redis: Any = None) -> int:
        """Entries of ``sink`` read and not yet acked, over all its partitions."""
        r = redis or self.redis
        total = 0
        for s in self.out_streams(sink):
            total += int((await r.xpending(s, RUNNER_GROUP))["pending"])
        return total

    def stream_of(self, d: Delivery) -> str:
        """The stream ``d`` goes to: its sink's partition of its conversation."""
        n = self.partitions.get(d.sink, 1)
        if n <= 1:
            return self.keys.out(d.sink)
        return self.keys.partition(d.sink, partition_of(d.conversation or d.envelope.conversation.id, n))

    def _by_stream(self, deliveries: Sequence[Delivery]) -> dict[str, list[tuple[str, bytes]]]:
        """Per stream, in order, the (delivery id, encoded delivery) pairs add_deliveries.lua takes."""
        by_stream: dict[str, list[tuple[str, bytes]]] = {}
        for d in deliveries:
            by_stream.setdefault(self.stream_of(d), []).append((d.id, encode(d)))
        return by_stream

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Append deliveries to their sinks' streams, in order: one Lua call per sink (one slot each).

        Packing one call with many payloads costs a few microseconds a delivery; a pipeline of XADDs
        costs redis-py tens of microseconds a command.
        """
        for stream_key, pairs in self._by_stream(deliveries).items():
            await self.scripts.add_deliveries(stream_key, self.maxlen, pairs)

    async def dead_letter(
        self, payload: bytes, *, reason: str, origin: str, attempts: int, instance: str, pipe: Any = None
    ) -> None:
        fields: dict[str, Any] = {
            Field.DELIVERY: payload,
            Field.REASON: reason,
            Field.FROM: origin,
            Field.ATTEMPTS: attempts,
            Field.INSTANCE: instance,
            Field.AT: f"{time.time():.3f}",
        }
        if pipe is not None:
            pipe.xadd(self.keys.dead, fields, maxlen=self.dead_maxlen, approximate=True)
        else:
            await self.redis.xadd(self.keys.dead, fields, maxlen=self.dead_maxlen, approximate=True)
        self.metrics.dead_lettered.labels(origin[4:] if origin.startswith("out:") else "router").inc()
