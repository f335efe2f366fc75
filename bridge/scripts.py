"""Typed wrappers of the bus's and the runner's Redis scripts: one method per ``bridge/lua/*.lua``.

Every script a newcomer meets on the path of a message is wrapped here, in the order a message
meets them: ``publish_many`` (inbound), ``add_deliveries`` (router), ``claim_read``, ``sync`` and
``claim_send`` (runner). Each method takes typed arguments, lays out KEYS and ARGV as the script's
header says, and returns a dataclass or an enum. The two other families live beside their one user:
``gcra_acquire`` in :mod:`bridge.ratelimit` (``Limiter``) and ``lease_*`` in :mod:`bridge.lease`.

Three calls ride in a pipeline with a stream read, to cost no round trip of their own: for them
``queue_*`` adds the call to a pipeline (as EVAL: a pipeline cannot reload a script Redis lost in a
restart) and ``parse_*`` reads its answer from the pipeline's results.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.lua import source
from bridge.ratelimit import Limit, limit_args

PUBLISH_MANY = source("publish_many")
ADD_DELIVERIES = source("add_deliveries")
CLAIM_SEND = source("claim_send")
SYNC = source("sync")
CLAIM_READ = source("claim_read")


class ClaimStatus(enum.Enum):
    """What claiming a delivery's idempotency marker found."""

    #: the marker is ours now (and, for claim_send, every rate was charged)
    OK = "ok"
    #: another live instance holds the marker (``Claim.wait``: how long its hold lasts)
    BUSY = "busy"
    #: the delivery was sent (``Claim.remote_id``: the platform's id, ``"dead"`` for a dead letter)
    DONE = "done"
    #: the marker is ours, but a rate says wait ``Claim.wait`` seconds first (nothing charged)
    WAIT = "wait"
    #: the script did not claim it (an entry without its delivery id): claim it alone
    UNCLAIMED = ""


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    #: DONE: the remote id recorded when it was sent
    remote_id: str | None = None
    #: BUSY: seconds the other holder's claim lasts; WAIT: seconds the rates say wait
    wait: float = 0.0

    @classmethod
    def from_marker(cls, value: str) -> Claim:
        """A claim from claim.lua's answer: ``ok``, ``busy``, ``done:<remote id>`` or ``''``."""
        if value == "ok":
            return OK
        if value.startswith("done:"):
            return cls(ClaimStatus.DONE, remote_id=value[5:])
        if value == "busy":
            return cls(ClaimStatus.BUSY)
        if value == "":
            return UNCLAIMED
        raise ValueError(f"unexpected claim answer {value!r}")


OK = Claim(ClaimStatus.OK)
UNCLAIMED = Claim(ClaimStatus.UNCLAIMED)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who claims markers: one process life (``id``) of an instance (``instance``)."""

    instance: str
    id: str
    #: True for a partition's lease holder: every unfinished claim is ours to take over (its
    #: previous holder stopped sending when its lease ended; bridge/partitions.py)
    takes_any: bool = False

    @property
    def prefix(self) -> str:
        """Markers whose value starts with this belong to a life of our instance: ours to take over
        (every marker, for a lease holder)."""
        return "" if self.takes_any else f"{self.instance}:"


@dataclass(frozen=True, slots=True)
class Ack:
    """A stream entry to acknowledge, and the marker to set ``done`` with it (None: just the ack)."""

    entry: str
    marker: str | None = None
    #: the marker's value: ``done:<remote id>``
    value: str = ""


@dataclass(frozen=True, slots=True)
class Publish:
    """One envelope to publish: its dedupe marker (``ttl`` 0: no dedupe) and encoded payload."""

    marker: str
    payload: bytes
    ttl: int


class NotReplicated(Exception):
    """``[redis] wait_replicas``: the write reached the master but not enough replicas in time."""


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Scripts:
    """The scripts registered on one Redis client (EVALSHA, reloaded by redis-py when Redis lost them)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._publish_many = redis.register_script(PUBLISH_MANY)
        self._add_deliveries = redis.register_script(ADD_DELIVERIES)
        self._claim_send = redis.register_script(CLAIM_SEND)
        self._sync = redis.register_script(SYNC)

    # -- publish_many.lua ------------------------------------------------------------------------

    async def publish_many(
        self, stream: str, maxlen: int, items: Sequence[Publish], *, wait: tuple[int, int] | None = None
    ) -> list[bool]:
        """Store ``items`` on ``stream`` in order; per item True when stored, False for a duplicate.

        ``wait`` (replicas, timeout ms): then the call is followed, on the same connection, by
        ``WAIT`` for that many replicas to confirm it; fewer within the timeout raises
        :class:`NotReplicated` (the items are stored on the master, maybe not on a replica)."""
        keys = [stream]
        args: list[Any] = [maxlen]
        for it in items:
            keys.append(it.marker)
            args += [it.payload, it.ttl]
        if wait is None:
            res = await self._publish_many(keys=keys, args=args)
        else:
            pipe = self._redis.pipeline(transaction=False)
            pipe.eval(PUBLISH_MANY, len(keys), *keys, *args)
            pipe.wait(*wait)
            res, replicas = await pipe.execute()
            if int(replicas) < wait[0]:
                raise NotReplicated(f"{replicas} of {wait[0]} replicas confirmed within {wait[1]} ms")
        flags = [bool(int(x)) for x in res]
        if len(flags) != len(items):
            raise RuntimeError(f"publish: {len(flags)} answers for {len(items)} envelopes")
        return flags

    # -- add_deliveries.lua ----------------------------------------------------------------------

    @staticmethod
    def _add_args(maxlen: int, deliveries: Sequence[tuple[str, bytes]]) -> list[Any]:
        args: list[Any] = [maxlen]
        for did, payload in deliveries:
            args += [did, payload]
        return args

    async def add_deliveries(self, stream: str, maxlen: int, deliveries: Sequence[tuple[str, bytes]]) -> int:
        """Append (delivery id, encoded delivery) pairs to a sink's stream, in order; how many."""
        return int(await self._add_deliveries(keys=[stream], args=self._add_args(maxlen, deliveries)))

    @classmethod
    def queue_add_deliveries(
        cls, pipe: Any, stream: str, maxlen: int, deliveries: Sequence[tuple[str, bytes]]
    ) -> None:
        """:meth:`add_deliveries` as a command of ``pipe``."""
        pipe.eval(ADD_DELIVERIES, 1, stream, *cls._add_args(maxlen, deliveries))

    # -- claim_send.lua --------------------------------------------------------------------------

    async def claim_send(
        self, marker: str, owner: Owner, ttl_ms: int, limits: Sequence[Limit] | None
    ) -> Claim:
        """Claim ``marker`` for ``owner`` and charge ``limits`` (None: only keep the claim alive)."""
        args: list[Any] = [owner.id, owner.prefix, ttl_ms, "0" if limits is None else "1"]
        keys = [marker]
        if limits:
            keys += [lim.key for lim in limits]
            args += limit_args(limits)
        status, value = (_str(x) for x in await self._claim_send(keys=keys, args=args))
        if status == "ok":
            return OK
        if status == "done":
            return Claim(ClaimStatus.DONE, remote_id=value[5:])
        if status == "busy":
            return Claim(ClaimStatus.BUSY, wait=int(value) / 1000.0)
        if status == "wait":
            return Claim(ClaimStatus.WAIT, wait=float(value) / 1000.0)
        raise ValueError(f"claim_send: unexpected answer {status!r}")

    # -- sync.lua --------------------------------------------------------------------------------

    @staticmethod
    def _sync_layout(
        stream: str, group: str, acks: Sequence[Ack], claim: Sequence[str], owner: Owner, ttl_ms: int,
        done_ttl: int,
    ) -> tuple[list[str], list[Any]]:  # fmt: skip
        done = [a for a in acks if a.marker is not None]
        keys = [stream, *(a.marker for a in done if a.marker is not None), *claim]
        args: list[Any] = [
            group, done_ttl, len(done), len(acks), owner.id, owner.prefix, ttl_ms,
            *(a.value for a in done), *(a.entry for a in acks),
        ]  # fmt: skip
        return keys, args

    async def sync(
        self, stream: str, group: str, acks: Sequence[Ack], claim: Sequence[str], owner: Owner, *,
        ttl_ms: int, done_ttl: int,
    ) -> list[Claim]:  # fmt: skip
        """Set the done markers of ``acks``, XACK their entries, then claim the ``claim`` markers."""
        keys, args = self._sync_layout(stream, group, acks, claim, owner, ttl_ms, done_ttl)
        return self.parse_sync(await self._sync(keys=keys, args=args))

    @classmethod
    def queue_sync(
        cls, pipe: Any, stream: str, group: str, acks: Sequence[Ack], owner: Owner, *, ttl_ms: int,
        done_ttl: int,
    ) -> None:  # fmt: skip
        """:meth:`sync` (acks only) as a command of ``pipe``."""
        keys, args = cls._sync_layout(stream, group, acks, (), owner, ttl_ms, done_ttl)
        pipe.eval(SYNC, len(keys), *keys, *args)

    @staticmethod
    def parse_sync(res: Sequence[Any]) -> list[Claim]:
        return [Claim.from_marker(_str(x)) for x in res]

    # -- claim_read.lua --------------------------------------------------------------------------

    @staticmethod
    def queue_claim_read(
        pipe: Any, stream: str, group: str, consumer: str, *, after: str, count: int, owner: Owner,
        ttl_ms: int, marker_prefix: str,
    ) -> None:  # fmt: skip
        """Claim the markers of the entries ``consumer`` read after ``after``, as a command of ``pipe``
        (right after its XREADGROUP)."""
        pipe.eval(
            CLAIM_READ, 1, stream, group, consumer, after, count, owner.id, owner.prefix, ttl_ms,
            marker_prefix,
        )  # fmt: skip

    @staticmethod
    def parse_claim_read(res: Sequence[Any]) -> dict[str, Claim]:
        """Entry id → its claim."""
        flat = [_str(x) for x in res]
        return {eid: Claim.from_marker(v) for eid, v in zip(flat[::2], flat[1::2], strict=True)}
