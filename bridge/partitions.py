"""Order per conversation whichever instances run: partitions owned through fenced leases.

The design, in four rules:

1. **One router at a time.** The inbound stream is routed by the instance holding the lease
   ``router``; the others stand by. Two routers reading one stream would write a conversation's
   deliveries in the order their reads finished, not in the order the messages came.
2. **A sink's deliveries are split by conversation** into ``[[outbound]] partitions`` streams
   (``bridge.bus.partition_of``: CRC-32 of the conversation, modulo the count; partition 0 is the
   sink's historic stream ``P:{out:<sink>}``, the others ``P:{out:<sink>}:p<n>``). All of a
   conversation's deliveries go to one partition, in the order the router wrote them.
3. **A partition is sent by the one instance holding its lease** (``out:<sink>:p<n>``,
   :class:`bridge.lease.Lease`: renewed every ``ttl/3``, fenced). Inside, the runner keeps a
   conversation on one worker at a time, and a delivery that backs off *holds its conversation*
   (later ones wait behind it). Throughput scales across conversations: partitions spread over
   instances, conversations over a runner's workers.
4. **A holder stops before anyone else can start.** A holder trusts its lease only until the
   earliest moment Redis could expire it (``Lease.held``); it checks before every read and every
   send, and a watcher aborts its runner — cancelling sends in flight — the moment that trust ends.
   A new holder gets the lease only after Redis expired it (or it was released after a drain),
   claims every entry still pending on the old holder's consumer (:mod:`bridge.recovery`) and
   reads those first, in stream order; it may take over their unfinished idempotency markers
   (``Owner.takes_any``), because the old holder no longer sends. So two instances never send for
   one conversation at once, and a take-over resumes each conversation where the old holder left
   it (the one delivery that was on the wire when it died is sent again with the same delivery id:
   the crash window of the README's guarantees).

**Rebalancing.** Every instance writes a heartbeat into ``P:{members}`` (:class:`Members`); each
manager (:class:`Partitions`) aims at ``ceil(partitions / live instances)`` leases. Above its share,
it drains partitions (a graceful stop: in-flight sends finish within ``shutdown_timeout``) and then
releases them; below, it takes free ones. A dead instance's leases expire after ``lease_ttl`` and
its heartbeat ages out within the same time, so its share moves within about ``lease_ttl`` + 0.5 s.
A graceful stop releases at once.

**What it assumes.** Clocks may differ between hosts (nothing compares them) but run at about the
same rate; a process paused longer than ``lease_ttl * 0.1`` between checking its lease and its
command reaching Redis could act once more after its lease ended (the window every lease-based
design has; the fence in ``lua/lease_check.lua`` closes it for guarded writes).

The hot path is unchanged: a partition's runner reads, claims and acks as before (no extra round
trip per message); the leases cost a few Redis calls per partition per ``ttl/3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge import logging as blog
from bridge.adapter import Sink
from bridge.bus import UNAVAILABLE, Bus, Keys, partition_of
from bridge.config import OutboundConfig
from bridge.lease import Lease
from bridge.runner import Runner


class Worker(Protocol):
    """What runs under a lease: the router, or a runner of one partition."""

    async def run(self) -> None: ...

    def stop(self) -> None:
        """Finish gracefully (in-flight work within a bound)."""

    def abort(self) -> None:
        """Stop at once: the lease is no longer ours. Nothing unfinished is acked."""


class Members:
    """This instance's heartbeat in ``P:{members}``, and how many instances are live."""

    def __init__(self, redis: Any, keys: Keys, instance: str, *, ttl: float) -> None:
        self.redis = redis
        self.key = keys.members
        self.instance = instance
        self.ttl = ttl
        #: live instances at the last heartbeat (us included)
        self.live = 1
        self.log = blog.get("members")

    async def beat(self) -> int:
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.key, {self.instance: now})
        pipe.zremrangebyscore(self.key, "-inf", now - int(self.ttl * 1000))
        pipe.zcard(self.key)
        res = await pipe.execute()
        self.live = max(int(res[2]), 1)
        return self.live

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every ``ttl/4`` (at most every second) until ``stop``; then leave."""
        every = min(self.ttl / 4, 1.0)
        try:
            while not stop.is_set():
                try:
                    await self.beat()
                except UNAVAILABLE as e:
                    self.log.warning("members.redis_unavailable", error=str(e))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
        finally:
            with contextlib.suppress(*UNAVAILABLE):
                await self.redis.zrem(self.key, self.instance)


#: seconds a worker told to stop may take before it is aborted, then cancelled (its runner's drain
#: is bounded by shutdown_timeout and SEND_GRACE; this bounds the rest, whatever hangs)
LEAVE_LIMIT = 30.0


@dataclass
class _Held:
    lease: Lease
    worker: Worker
    task: asyncio.Task[None]
    watch: asyncio.Task[None]
    #: monotonic time it was told to stop (None: it runs)
    leaving: float | None = None


class Partitions:
    """Holds this instance's share of ``count`` leases named ``<name>:p<n>`` (``name`` alone when
    ``count`` is 1) and runs ``make(n, lease)``'s worker for each lease while it is held."""

    def __init__(
        self, redis: Any, keys: Keys, members: Members, name: str, count: int, instance: str,
        make: Callable[[int, Lease], Worker], *, ttl: float, on_done: Callable[[Worker], None] | None = None,
    ) -> None:  # fmt: skip
        self.members = members
        self.name = name
        self.count = count
        self.ttl = ttl
        self.make = make
        self.on_done = on_done
        owner = f"{instance}:{uuid.uuid4().hex[:12]}"
        names = [name] if count == 1 else [f"{name}:p{n}" for n in range(count)]
        self.leases = [Lease(redis, keys, nm, owner, ttl=ttl) for nm in names]
        self.held: dict[int, _Held] = {}
        # instances start their search at different partitions, so they rarely race for one
        first = partition_of(instance, count)
        self._order = [(first + i) % count for i in range(count)]
        self.log = blog.get("partitions", lease=name)

    @property
    def owned(self) -> list[int]:
        """The partitions held now (for status and tests)."""
        return sorted(n for n, h in self.held.items() if h.lease.held)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep our share until ``stop``; then drain and release every partition."""
        tick = min(self.ttl / 6, 0.5)
        try:
            while not stop.is_set():
                try:
                    await self._turn()
                except UNAVAILABLE as e:
                    self.log.warning("partitions.redis_unavailable", error=str(e))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick)
        finally:
            await self._leave_all()

    async def _turn(self) -> None:
        for n, h in list(self.held.items()):
            if h.task.done():
                await self._finished(n, h)
        for n, h in list(self.held.items()):
            await self._renew(n, h)
        target = math.ceil(self.count / max(self.members.live, 1))
        active = [n for n, h in self.held.items() if h.leaving is None]
        for n, h in self.held.items():
            self._bound_leave(n, h)
        while len(active) > target:
            n = active.pop()
            self.log.info("partitions.giving_up", partition=n, target=target)
            self.held[n].leaving = time.monotonic()
            self.held[n].worker.stop()
        for n in self._order:
            if len(active) >= target:
                break
            if n not in self.held and await self.leases[n].acquire():
                self._start(n)
                active.append(n)

    def _start(self, n: int) -> None:
        lease = self.leases[n]
        worker = self.make(n, lease)
        task = asyncio.create_task(worker.run(), name=f"{self.name}:p{n}")
        h = _Held(lease, worker, task, asyncio.create_task(self._watch(lease, worker)))
        self.held[n] = h
        self.log.info("partitions.took", partition=n, fence=lease.fence)

    @staticmethod
    async def _watch(lease: Lease, worker: Worker) -> None:
        """Abort ``worker`` the moment its lease stops being trusted (even while Redis hangs)."""
        while True:
            left = lease.valid_for
            if left <= 0:
                worker.abort()
                return
            await asyncio.sleep(left)

    def _bound_leave(self, n: int, h: _Held) -> None:
        """A worker still stopping LEAVE_LIMIT after it was told: abort it; twice that: cancel it."""
        if h.leaving is None or h.task.done():
            return
        late = time.monotonic() - h.leaving
        if late > 2 * LEAVE_LIMIT:
            self.log.error("partitions.stop_cancelled", partition=n)
            h.task.cancel()
        elif late > LEAVE_LIMIT:
            self.log.warning("partitions.stop_overdue", partition=n)
            h.worker.abort()

    async def _renew(self, n: int, h: _Held) -> None:
        if h.lease.valid_for > self.ttl * 0.9 - self.ttl / 3:
            return  # renewed less than ttl/3 ago
        try:
            ok = await h.lease.renew()
        except UNAVAILABLE as e:
            self.log.warning("partitions.renew_failed", partition=n, error=str(e))
            ok = h.lease.held
        if not ok:
            self.log.warning("partitions.lost", partition=n)
            h.worker.abort()
            await self._close(n, h, release=False)

    async def _finished(self, n: int, h: _Held) -> None:
        """A worker returned or crashed: released when it was leaving, else started again."""
        exc = h.task.exception() if not h.task.cancelled() else None
        if exc is not None and not isinstance(exc, UNAVAILABLE):
            self.log.error("partitions.worker_crashed", partition=n, error=repr(exc))
        if h.leaving is not None or not h.lease.held:
            await self._close(n, h, release=True)
            return
        if self.on_done is not None:
            self.on_done(h.worker)
        h.worker = self.make(n, h.lease)
        h.task = asyncio.create_task(h.worker.run(), name=f"{self.name}:p{n}")
        h.watch.cancel()
        h.watch = asyncio.create_task(self._watch(h.lease, h.worker))

    async def _close(self, n: int, h: _Held, *, release: bool) -> None:
        del self.held[n]
        h.watch.cancel()
        if not h.task.done():
            h.worker.abort()
        await asyncio.gather(h.task, h.watch, return_exceptions=True)
        if self.on_done is not None:
            self.on_done(h.worker)
        if release:
            with contextlib.suppress(*UNAVAILABLE):
                await h.lease.release()
            self.log.info("partitions.released", partition=n)

    async def _leave_all(self) -> None:
        """Stop every worker gracefully (renewing meanwhile), then release the leases."""
        for h in self.held.values():
            h.leaving = time.monotonic()
            h.worker.stop()
        while running := [h.task for h in self.held.values() if not h.task.done()]:
            await asyncio.wait(running, timeout=self.ttl / 3)
            for n, h in list(self.held.items()):
                if not h.task.done():
                    self._bound_leave(n, h)
                    await self._renew(n, h)
        for n, h in list(self.held.items()):
            await self._close(n, h, release=True)


class SinkRunners:
    """A sink's runners on this instance: one per partition whose lease it holds (what the daemon
    keeps as ``runners[<sink>]``). Counters add up every runner it ran."""

    def __init__(
        self, sink: Sink, cfg: OutboundConfig, bus: Bus, instance: str, members: Members, *, ttl: float,
        shutdown_timeout: float, max_deliveries: int,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self._stop = asyncio.Event()
        self._finished_sent = 0
        self._finished_dead = 0
        self._live: dict[int, Runner] = {}
        per = math.ceil(cfg.concurrency / cfg.partitions)

        def make(n: int, lease: Lease) -> Worker:
            r = Runner(
                sink, cfg, bus, instance, shutdown_timeout=shutdown_timeout, lease=lease,
                stream=bus.keys.partition(cfg.name, n), concurrency=per, max_deliveries=max_deliveries,
            )  # fmt: skip
            self._live[id(r)] = r
            return r

        def done(w: Worker) -> None:
            r = self._live.pop(id(w), None)
            if r is not None:
                self._finished_sent += r.sent
                self._finished_dead += r.dead

        self.partitions = Partitions(
            bus.redis, bus.keys, members, f"out:{cfg.name}", cfg.partitions, instance, make,
            ttl=ttl, on_done=done,
        )  # fmt: skip
        self.rates = Runner.sink_rates(sink, cfg)

    @property
    def sent(self) -> int:
        return self._finished_sent + sum(r.sent for r in self._live.values())

    @property
    def dead(self) -> int:
        return self._finished_dead + sum(r.dead for r in self._live.values())

    async def run(self) -> None:
        await self.partitions.run(self._stop)

    def stop(self) -> None:
        self._stop.set()
