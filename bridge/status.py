"""What an operator asks during an incident, read from Redis: streams, lag, pending, dead letters,
live instances and lease holders (``wechat-bridge status`` prints it; ``/metrics`` gauges it).
Nothing here SCANs the keyspace unless asked (``status --scan``): a scrape costs a few round trips
per stream and per lease whatever the number of keys.

Instances announce themselves with a heartbeat (:class:`Heartbeat`): a key
``P:{instances}:<instance>`` with a TTL, renewed every third of it, and the instance's name in the
set ``P:{instances}`` (one hash tag, so one slot on a Redis Cluster: the set and every heartbeat are
read in one MGET). An instance whose key expired is not live; its name is pruned from the set when a
snapshot sees it gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from bridge import logging as blog
from bridge.bus import ROUTER_GROUP, RUNNER_GROUP, UNAVAILABLE, Keys
from bridge.metrics import Metrics

log = blog.get("status")

#: seconds an instance's heartbeat lives without renewal
HEARTBEAT_TTL = 15.0


@dataclass(frozen=True)
class ConsumerRow:
    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True)
class GroupRow:
    name: str
    #: entries not yet delivered to the group (None: Redis cannot tell, e.g. after an XDEL)
    lag: int | None
    pending: int
    consumers: list[ConsumerRow] = field(default_factory=list)


@dataclass(frozen=True)
class StreamRow:
    name: str
    length: int
    groups: list[GroupRow] = field(default_factory=list)


@dataclass(frozen=True)
class InstanceRow:
    name: str
    host: str
    pid: int
    started: float
    #: seconds since its last heartbeat
    seen_ago: float
    #: the leases it takes part in (held or wanted): how status finds every lease without a SCAN
    leases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseRow:
    name: str
    #: the holder (a process life: ``<instance>:<id>`` for the runner's and router's leases); None: free
    owner: str | None
    fence: int
    ttl_ms: int


@dataclass(frozen=True)
class StatusSnapshot:
    streams: list[StreamRow]
    dead_letters: int
    instances: list[InstanceRow]
    leases: list[LeaseRow]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _get(d: dict[Any, Any], name: str) -> Any:
    return d.get(name, d.get(name.encode()))


class Heartbeat:
    """This instance's heartbeat key, renewed until stopped, deleted at a graceful stop."""

    def __init__(
        self, redis: Any, keys: Keys, instance: str, *, ttl: float = HEARTBEAT_TTL,
        leases: Callable[[], list[str]] = list,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.keys = keys
        self.instance = instance
        self.ttl = ttl
        #: the names of the leases this instance takes part in now
        self.leases = leases
        self.started = time.time()
        self._stop = asyncio.Event()

    async def beat(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": round(self.started, 3),
                "at": round(time.time(), 3), "leases": sorted(set(self.leases()))}  # fmt: skip
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.instance(self.instance), json.dumps(info), px=int(self.ttl * 1000))
        pipe.sadd(self.keys.instances, self.instance)
        await pipe.execute()

    async def run(self) -> None:
        """Beat every third of the TTL until :meth:`stop`; Redis errors are logged and retried."""
        while not self._stop.is_set():
            try:
                await self.beat()
            except UNAVAILABLE as e:
                log.warning("heartbeat.failed", error=str(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.ttl / 3)

    async def stop(self) -> None:
        """Stop beating and say so at once (the instance leaves the live list now, not after the TTL)."""
        self._stop.set()
        with contextlib.suppress(*UNAVAILABLE):
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self.keys.instance(self.instance))
            pipe.srem(self.keys.instances, self.instance)
            await pipe.execute()


async def _stream(redis: Any, name: str, key: str, group: str | None) -> StreamRow:
    length = int(await redis.xlen(key))
    groups: list[GroupRow] = []
    if group is not None and length:
        try:
            infos = await redis.xinfo_groups(key)
        except Exception:  # no such key (trimmed to nothing meanwhile)
            infos = []
        for g in infos:
            gname = _s(_get(g, "name"))
            lag = _get(g, "lag")
            consumers = [
                ConsumerRow(_s(_get(c, "name")), int(_get(c, "pending")), int(_get(c, "idle")))
                for c in await redis.xinfo_consumers(key, gname)
            ]
            pending = int(_get(g, "pending"))
            groups.append(GroupRow(gname, None if lag is None else int(lag), pending, consumers))
    return StreamRow(name, length, groups)


async def instances(redis: Any, keys: Keys) -> list[InstanceRow]:
    """Instances with a live heartbeat, by name; names whose heartbeat expired are pruned."""
    names = sorted(_s(n) for n in await redis.smembers(keys.instances))
    if not names:
        return []
    values = await redis.mget([keys.instance(n) for n in names])
    now = time.time()
    out: list[InstanceRow] = []
    gone: list[str] = []
    for name, raw in zip(names, values, strict=True):
        if raw is None:
            gone.append(name)
            continue
        try:
            info = json.loads(raw)
            out.append(InstanceRow(name, str(info["host"]), int(info["pid"]), float(info["started"]),
                                   round(max(0.0, now - float(info["at"])), 3),
                                   [str(x) for x in info.get("leases", [])]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            out.append(InstanceRow(name, "?", 0, 0.0, 0.0))
    if gone:
        await redis.srem(keys.instances, *gone)
    return out


async def leases(redis: Any, keys: Keys, known: Iterable[str] = (), *, scan: bool = False) -> list[LeaseRow]:
    """The leases named ``known`` (held or not: a free one's row has no owner) and, with ``scan``,
    every other lease Redis holds now (a SCAN of the whole keyspace, on every primary of a cluster:
    for a person asking, never for a scrape)."""
    found: set[str] = set(known)
    if scan:
        head = keys.lease("")[:-1]  # "P:{lease:"
        async for k in redis.scan_iter(match=head.replace("[", "\\[") + "*", count=1000):
            key = _s(k)
            if key.endswith("}"):
                found.add(key[len(head) : -1])
    rows: list[LeaseRow] = []
    for name in sorted(found):
        key = keys.lease(name)
        pipe = redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        value, ttl = await pipe.execute()
        if value is None:
            rows.append(LeaseRow(name, None, 0, 0))
            continue
        owner, _, fence = _s(value).rpartition("|")
        fence_n = int(fence) if fence.isdigit() else 0
        rows.append(LeaseRow(name, owner or _s(value), fence_n, max(int(ttl), 0)))
    return rows


async def snapshot(
    redis: Any,
    keys: Keys,
    sinks: Iterable[str],
    known_leases: Iterable[str] = (),
    *,
    scan: bool = False,
    partitions: Mapping[str, int] | None = None,
) -> StatusSnapshot:
    """Streams (inbound, each sink's, dead), their groups, live instances and leases, now. The leases
    are those ``known_leases`` and the live instances' heartbeats name (every other one too with
    ``scan``)."""
    plan: list[tuple[str, str, str | None]] = [("inbound", keys.inbound, ROUTER_GROUP)]
    parts = partitions or {}
    plan += [
        (f"out:{s}" + (f":p{n}" if n else ""), keys.partition(s, n), RUNNER_GROUP)
        for s in sinks
        for n in range(max(parts.get(s, 1), 1))
    ]
    plan.append(("dead", keys.dead, None))
    streams = [await _stream(redis, name, key, group) for name, key, group in plan]
    dead = next(s.length for s in streams if s.name == "dead")
    live = await instances(redis, keys)
    named = {*known_leases, *(n for i in live for n in i.leases)}
    return StatusSnapshot(streams, dead, live, await leases(redis, keys, named, scan=scan))


def gauge(m: Metrics, snap: StatusSnapshot | None, held: Iterable[tuple[str, bool]] = ()) -> None:
    """Set ``m``'s Redis gauges from ``snap`` (None: Redis did not answer) and this instance's
    leases (name, held now)."""
    for name, mine in held:
        m.lease_held.labels(name).set(1 if mine else 0)
    if snap is None:
        m.redis_up.set(0)
        return
    m.redis_up.set(1)
    for s in snap.streams:
        m.stream_length.labels(s.name).set(s.length)
        for g in s.groups:
            if g.lag is not None:
                m.stream_lag.labels(s.name, g.name).set(g.lag)
            m.stream_pending.labels(s.name, g.name).set(g.pending)
    m.dead_letters.set(snap.dead_letters)
    m.instances_live.set(len(snap.instances))
    for lease in snap.leases:
        m.lease_has_holder.labels(lease.name).set(1 if lease.owner else 0)


def table(snap: StatusSnapshot) -> str:
    """The snapshot as plain-text tables, for a person at a terminal."""

    def grid(head: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return [fmt.format(*head), *(fmt.format(*r) for r in rows)]

    out: list[str] = []
    rows = []
    for s in snap.streams:
        if not s.groups:
            rows.append([s.name, str(s.length), "-", "-", "-", "-"])
        for g in s.groups:
            consumers = ", ".join(f"{c.name}({c.pending})" for c in g.consumers) or "-"
            lag = "?" if g.lag is None else str(g.lag)
            rows.append([s.name, str(s.length), g.name, lag, str(g.pending), consumers])
    out += ["STREAMS", *grid(["stream", "length", "group", "lag", "pending", "consumers(pending)"], rows)]
    out += ["", f"DEAD LETTERS  {snap.dead_letters}", ""]
    rows = [[i.name, i.host, str(i.pid), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.started)),
             f"{i.seen_ago:.1f}s"] for i in snap.instances]  # fmt: skip
    out += ["INSTANCES (live)", *grid(["instance", "host", "pid", "started (UTC)", "last beat"], rows), ""]
    rows = [[le.name, le.owner or "NONE", str(le.fence), f"{le.ttl_ms / 1000:.1f}s"] for le in snap.leases]
    out += ["LEASES", *grid(["lease", "holder", "fence", "expires in"], rows)]
    return "\n".join(out)
