"""The delivery runner, written once for every sink: read → claim → send → ack.

In a daemon, one runner per *partition* of a sink's stream (``P:{out:<sink>}`` and
``P:{out:<sink>}:p<n>``, group ``runner``) runs on the one instance holding that partition's lease
(:mod:`bridge.partitions`); it first takes over what the previous holder left pending
(:mod:`bridge.recovery`), reads it first, and reads and sends only while its lease is held.
:meth:`Runner.run` polls (:meth:`Runner.poll_iteration`) until stopped:

1. **read** a batch of entries (:class:`ReadClaim`: one round trip that also writes the acks so far
   and claims what it read);
2. **claim** each delivery's idempotency marker (``lua/claim.lua``): ``done:…`` → already sent, ack
   and skip; held by another live instance → wait. When the sink has a rate, one more call just
   before each send claims again and charges the rate limits (``lua/claim_send.lua``, GCRA), so the
   rate holds at the moment of sending;
3. **send** through the sink, on one of ``concurrency`` workers (:meth:`Runner.deliver`);
4. **ack**: on success set the marker to ``done:<remote id>`` and ack as soon as the send returned
   (:class:`AckBatch`: acks that come meanwhile go in the same Lua call). On
   :class:`RetryableError` back off exponentially with jitter (or the sink's retry-after) *in
   place*, so a conversation keeps its order; on :class:`PermanentError` or after
   ``max_attempts`` write a dead letter with the reason, then ack.

Deliveries to one conversation run one after another (a conversation's queue is served by one worker
at a time); different conversations run concurrently. A stopped runner stops reading, lets queued
and in-flight sends finish within a bound, acks, and returns; what did not finish stays pending —
every queued job is dropped at once, so a conversation's later job never goes before an unfinished
earlier one — and is read again, in stream order, by the next run (ours or the next lease holder's).
An aborted runner (its lease ended) cancels its sends at once. A runner without a lease (tests)
takes over entries idle ``claim_idle`` on vanished consumers. :meth:`Runner.run_until_idle` drives
a runner without a daemon: it returns once the stream has nothing left for it (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from bridge import logging as blog
from bridge.adapter import SendContext, Sink
from bridge.bus import RUNNER_GROUP, UNAVAILABLE, Bus, Entry, Field
from bridge.config import OutboundConfig, Rate, parse_rates
from bridge.envelope import Delivery, decode_delivery, encode
from bridge.errors import NoWayBack, PermanentError, RetryableError
from bridge.fallback import fallback_delivery
from bridge.lease import Lease
from bridge.ratelimit import Limit, Limiter
from bridge.recovery import Recovery
from bridge.router import reply_envelope
from bridge.scripts import OK, UNCLAIMED, Ack, Claim, ClaimStatus, Owner, Scripts

DONE_TTL = 7 * 86_400
#: acks (done markers + XACK) wait this long to be written together. 0: a done marker is written as
#: soon as its send returned (group commit: acks that come while one write is on the wire go in the
#: next one), which keeps the one window where a crash resends (after the platform accepted, before
#: the marker is written) as small as one round trip; a graceful stop writes them at once.
ACK_LINGER = 0.0


#: delivery ids a runner remembers having sent (see Runner._recent)
RECENT = 4096

#: seconds a stop past shutdown_timeout still waits for the sends on the wire (the daemon's
#: supervisor cancels what is left 5 s after shutdown_timeout)
SEND_GRACE = 4.0


def _raise_if_cancelled() -> None:
    """Raise CancelledError when this task was asked to stop: a redis-py call that was cancelled in
    mid-command may return normally (or raise a connection error) instead, and a loop that goes
    on would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


#: background writes of a finished runner's last acks (a reference keeps each task alive)
_LATER: set[asyncio.Task[None]] = set()


class AckBatch:
    """Acks waiting to be written together: their done markers and XACKs in one ``sync.lua`` call.

    :meth:`add` queues an ack and wakes :meth:`run`, which writes them at once (after
    :data:`ACK_LINGER`, when set); a read going out meanwhile takes them along instead (:meth:`take`, and
    :meth:`put_back` when that read failed). :meth:`sync` writes them with a claim of markers.
    """

    def __init__(
        self, scripts: Scripts, stream: str, owner: Owner, claim_ttl_ms: int, log: Any, *,
        linger: float = ACK_LINGER,
    ) -> None:  # fmt: skip
        self.scripts = scripts
        self.stream = stream
        self.owner = owner
        self.claim_ttl_ms = claim_ttl_ms
        self.linger = linger
        self.log = log
        self._pending: list[Ack] = []
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, ack: Ack) -> None:
        self._pending.append(ack)
        self._wake.set()

    def take(self) -> list[Ack]:
        """The acks so far, to be written by the caller (then no longer here)."""
        batch, self._pending = self._pending, []
        return batch

    def put_back(self, batch: Sequence[Ack]) -> None:
        """Acks a caller took and could not write: they go first next time."""
        self._pending[:0] = batch
        if self._pending:
            self._wake.set()

    def queue(self, pipe: Any) -> list[Ack]:
        """Add the acks so far to ``pipe`` (one sync.lua call); returns them (put back on failure)."""
        batch = self.take()
        if batch:
            Scripts.queue_sync(
                pipe, self.stream, RUNNER_GROUP, batch, self.owner, ttl_ms=self.claim_ttl_ms,
                done_ttl=DONE_TTL,
            )  # fmt: skip
        return batch

    async def sync(self, claim: Sequence[str] = ()) -> list[Claim]:
        """Write the acks so far and claim the ``claim`` markers, in one round trip."""
        batch = self.take()
        if not batch and not claim:
            return []
        try:
            return await self.scripts.sync(
                self.stream, RUNNER_GROUP, batch, claim, self.owner, ttl_ms=self.claim_ttl_ms,
                done_ttl=DONE_TTL,
            )  # fmt: skip
        except BaseException:
            self.put_back(batch)
            raise

    async def flush(self) -> None:
        if self._pending:
            await self.sync()

    def flush_later(self, every: float = 0.1, give_up: float = 3600.0) -> None:
        """Keep trying :meth:`flush` in the background (the runner is gone; Redis is down)."""
        if not self._pending:
            return

        async def retry() -> None:
            end = time.monotonic() + give_up
            while self._pending and time.monotonic() < end:
                try:
                    await self.flush()
                except UNAVAILABLE:
                    await asyncio.sleep(every)
            if self._pending:
                self.log.error("runner.acks_abandoned", count=len(self._pending))

        task = asyncio.create_task(retry(), name=f"acks-later:{self.stream}")
        _LATER.add(task)
        task.add_done_callback(_LATER.discard)

    async def run(self) -> None:
        """Write acks shortly after they come, until cancelled."""
        while True:
            await self._wake.wait()
            if self.linger > 0:  # more acks come meanwhile, or a read carries them all
                await asyncio.sleep(self.linger)
            self._wake.clear()
            _raise_if_cancelled()
            try:
                await self.flush()
            except UNAVAILABLE as e:
                _raise_if_cancelled()
                self.log.warning("runner.ack_failed", error=str(e))
                await asyncio.sleep(1.0)
                self._wake.set()
            _raise_if_cancelled()


class ReadClaim:
    """Read new entries and claim their markers, in one round trip (a pipeline).

    The pipeline: the acks so far (:class:`AckBatch`), the blocking XREADGROUP, then
    ``claim_read.lua`` claiming the markers of what the read gave. A read abandoned on stop puts
    the acks back (XACK is idempotent); what it read and claimed stays pending under our consumer
    name for our next life.
    """

    def __init__(
        self, bus: Bus, stream: str, consumer: str, owner: Owner, acks: AckBatch, *, claim_ttl_ms: int,
        marker_prefix: str, block_ms: int | None = 1000,
    ) -> None:  # fmt: skip
        self.bus = bus
        self.stream = stream
        self.consumer = consumer
        self.owner = owner
        self.acks = acks
        self.claim_ttl_ms = claim_ttl_ms
        self.marker_prefix = marker_prefix
        self.block_ms = block_ms
        #: the id read last: claim_read claims this consumer's pending entries after it
        self.last_read = "0"

    async def __call__(self, count: int, stop: asyncio.Event) -> tuple[list[Entry], dict[str, Claim]] | None:
        """Up to ``count`` new entries and their claims (entry id → claim); None: stopped meanwhile."""
        batch: list[Ack] = []

        def before(pipe: Any) -> None:
            batch.extend(self.acks.queue(pipe))

        def after(pipe: Any) -> None:
            Scripts.queue_claim_read(
                pipe, self.stream, RUNNER_GROUP, self.consumer, after=self.last_read, count=count + 100,
                owner=self.owner, ttl_ms=self.claim_ttl_ms, marker_prefix=self.marker_prefix,
            )  # fmt: skip

        read = self.bus.read_around(
            self.stream, RUNNER_GROUP, self.consumer, count=count, block_ms=self.block_ms, before=before,
            after=after,
        )  # fmt: skip
        try:
            got = await self.bus.or_stop(stop, read)
        except BaseException:
            self.acks.put_back(batch)
            raise
        if got is None:
            self.acks.put_back(batch)
            return None
        entries, results = got
        if entries:
            self.last_read = entries[-1][0]
        return entries, Scripts.parse_claim_read(results[-1])


class _Job:
    """One delivery taken from the stream and not finished yet."""

    __slots__ = ("claimed_at", "conv", "d", "eid")

    def __init__(self, eid: str, d: Delivery, conv: str) -> None:
        self.eid = eid
        self.d = d
        self.conv = conv
        #: monotonic time its marker was claimed with the batch it came in (None: not claimed)
        self.claimed_at: float | None = None


class Runner:
    """Sends a sink's deliveries: ``concurrency`` workers over per-conversation FIFO queues.

    A conversation's queue is served by one worker at a time (so it stays in order, retries back off
    in place); different conversations are served concurrently. Each poll reads a batch and claims
    the idempotency markers of the whole batch in the same round trip (:class:`ReadClaim`) and
    queues the deliveries; a worker sends without another round trip when the sink has no rate to
    charge. Acks are written as soon as the send returned (:class:`AckBatch`: the ones that come
    while a write is on the wire go together, or ride on a read going out). Implements
    :class:`bridge.adapter.DeliveryServices` for its sink.
    """

    def __init__(
        self,
        sink: Sink,
        cfg: OutboundConfig,
        bus: Bus,
        instance: str,
        *,
        batch: int = 128,
        shutdown_timeout: float = 10.0,
        stream: str | None = None,
        lease: Lease | None = None,
        concurrency: int | None = None,
        max_deliveries: int = 20,
    ) -> None:
        self.sink = sink
        self.ctx = sink.ctx
        self.cfg = cfg
        self.bus = bus
        self.keys = bus.keys
        self.instance = instance
        #: the partition's lease (bridge/partitions.py): read and send only while it is held; None:
        #: the runner reads the whole stream alone (tests, one-off drains)
        self.lease = lease
        self.owner = Owner(instance, f"{instance}:{uuid.uuid4().hex[:12]}", takes_any=lease is not None)
        self.stream = stream or bus.keys.out(cfg.name)
        self.concurrency = concurrency or cfg.concurrency
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.shutdown_timeout = shutdown_timeout
        self.log = blog.get("runner", sink=cfg.name)
        self.rates: list[Rate] = self.sink_rates(sink, cfg)
        self._claim_ttl_ms = int(cfg.claim_idle * 1000)
        self.scripts = bus.scripts
        self._limiter = Limiter(bus.redis)
        self.acks = AckBatch(self.scripts, self.stream, self.owner, self._claim_ttl_ms, self.log)
        self.read_claim = ReadClaim(
            bus, self.stream, instance, self.owner, self.acks, claim_ttl_ms=self._claim_ttl_ms,
            marker_prefix=bus.keys.mark(cfg.name, ""),
        )  # fmt: skip
        self._stopping = asyncio.Event()
        #: stopping because the lease ended: no drain, sends in flight are cancelled
        self._aborting = False
        #: a stop ran past shutdown_timeout: no new send starts; the ones on the wire finish
        self._draining = False
        #: sends on the wire now (inside the sink's send)
        self._sending = 0
        self._sends_idle = asyncio.Event()
        self._sends_idle.set()
        #: read-ahead: at most this many deliveries taken and not finished; read again below half
        self._limit = max(self.concurrency * 4, 64)
        self._queues: dict[str, deque[_Job]] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._inflight: dict[str, _Job] = {}
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._ack_task: asyncio.Task[None] | None = None
        #: where the next read starts: "0" our own pending entries first (a previous life's), then ">"
        self._start = "0"
        self._next_reclaim = 0.0
        self._reclaim_cursor = "0-0"
        #: run_until_idle: reads do not block, and an empty read with nothing in flight ends the run
        self._burst = False
        self.sent = 0
        self.dead = 0
        #: delivery ids this runner sent lately → remote id (a duplicate entry right behind its
        #: original finds it here: the original's done marker may still be on its way to Redis)
        self._recent: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def sink_rates(sink: Sink, cfg: OutboundConfig) -> list[Rate]:
        """The sink's rates: ``rate`` from the config, else the adapter's default."""
        return parse_rates(cfg.rate) if cfg.rate is not None else parse_rates(sink.default_rate or "")

    # -- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._room.set()

    def abort(self) -> None:
        """Stop at once (the partition's lease ended): cancel the sends in flight, ack nothing more
        of what is unfinished; it stays pending for the next holder."""
        self._aborting = True
        self._sends_idle.set()
        self.stop()

    def _may_send(self) -> bool:
        if self.lease is not None and not self.lease.held:
            self.abort()
        return not (self._aborting or self._draining)

    async def run(self) -> None:
        """Poll until stopped, then finish what is in flight (within ``shutdown_timeout``)."""
        # every run starts with our own pending entries, in stream order (a previous run's, or
        # the ones a take-over just made ours)
        self._start = "0"
        self.read_claim.last_read = "0"
        await self.bus.ensure_group(self.stream, RUNNER_GROUP)
        if self.lease is not None:
            rec = Recovery(
                self.bus, self.stream, RUNNER_GROUP, self.instance,
                max_deliveries=self.max_deliveries, origin=f"out:{self.cfg.name}",
            )  # fmt: skip
            self.dead += (await rec.take_over()).dead
            await rec.drop_consumers(max(60.0, self.lease.ttl * 3))
        self._ack_task = asyncio.create_task(self.acks.run(), name=f"acker:{self.cfg.name}")
        self._workers = [
            asyncio.create_task(self._worker(), name=f"send:{self.cfg.name}:{n}")
            for n in range(self.concurrency)
        ]
        self._next_reclaim = time.monotonic() + self._reclaim_every()
        try:
            while not self._stopping.is_set() and await self.poll_iteration():
                pass
        finally:
            await self._drain()

    async def run_until_idle(self) -> None:
        """Send everything the stream holds for this runner now, then return (arq's ``burst``).

        Reads do not block; the run ends when a read finds nothing new and nothing is in flight
        (retries included). For tests and one-off drains: a daemon calls :meth:`run`.
        """
        self._burst = True
        self.read_claim.block_ms = None
        await self.run()

    async def poll_iteration(self) -> bool:
        """One turn of the loop: read a batch (claiming it) and queue it for the workers; now and
        then take over entries idle on vanished consumers. False when the run should end."""
        if not await self._wait_for_room():
            return True
        if not self._may_send():
            return False
        count = min(self.batch, self._limit - len(self._inflight))
        claims: dict[str, Claim] | None = None
        if self._start != ">":  # our own pending entries first, claimed in _admit
            entries = await self.bus.read(
                self.stream, RUNNER_GROUP, self.instance, count=count, block_ms=None, start=self._start
            )
            if not entries:
                self._start = ">"
                return True
            self._start = self.read_claim.last_read = entries[-1][0]
        else:
            got = await self.read_claim(count, self._stopping)
            if got is None:
                return False
            entries, claims = got
        if entries:
            await self._admit(entries, claims)
        elif self._burst:
            await self._idle.wait()
            if not self._inflight and not len(self.acks):
                return False
        if self.lease is None and time.monotonic() >= self._next_reclaim:
            # a lease holder is the partition's only reader: what others left, it took over at start
            self._next_reclaim = time.monotonic() + self._reclaim_every()
            self._reclaim_cursor = await self._reclaim(self._reclaim_cursor)
        return True

    async def _wait_for_room(self) -> bool:
        """True when the read-ahead has room for a read (else waited for it, or for a stop)."""
        if len(self._inflight) > self._limit // 2:
            self._room.clear()
            await self._room.wait()
            return False
        return True

    def _reclaim_every(self) -> float:
        return min(30.0, self.cfg.claim_idle / 2)

    async def _reclaim(self, cursor: str) -> str:
        """Take over entries idle on vanished consumers (XAUTOCLAIM, keeping the cursor)."""
        res = await self.bus.redis.xautoclaim(
            self.stream, RUNNER_GROUP, self.instance, self._claim_ttl_ms, cursor, count=100
        )
        nxt, claimed = res[0], res[1]
        entries: list[Entry] = []
        for eid, fields in claimed:
            eid = eid.decode() if isinstance(eid, bytes) else eid
            if fields is not None and eid not in self._inflight:
                self.log.info("delivery.reclaimed", entry=eid)
                entries.append((eid, fields))
        if entries:
            await self._admit(entries)
        return str(nxt.decode() if isinstance(nxt, bytes) else nxt)

    async def _drain(self) -> None:
        """Let in-flight sends finish (within ``shutdown_timeout``; not at all on abort), then drop
        every queued job at once: they stay pending, and the next run (ours or the next holder's)
        reads them again in stream order. Dropping only the job a cancelled worker held would let
        a later job of its conversation go first."""
        if self._inflight and not self._aborting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout)
            # past the bound: start no new send (retries sleeping are dropped, unsent), but let
            # the sends on the wire finish, within SEND_GRACE: cancelling one the receiver already
            # took would have it sent again
            self._draining = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sends_idle.wait(), SEND_GRACE)
        if self._inflight:
            self.log.warning("runner.shutdown_unfinished", count=len(self._inflight), aborted=self._aborting)
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._queues.clear()
        self._inflight.clear()
        self._ready = asyncio.Queue()
        self._idle.set()
        self._room.set()
        if self._ack_task is not None:
            self._ack_task.cancel()
            await asyncio.gather(self._ack_task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.acks.flush(), 5.0)
        except (*UNAVAILABLE, TimeoutError):
            # done markers of sends that happened stay true whoever holds the lease now: keep
            # writing them until Redis is back, so the next holder does not send them again
            self.acks.flush_later()
        self.log.info("runner.stopped", stream=self.stream, aborted=self._aborting)

    # -- claim: a batch at once --------------------------------------------------------------------

    async def _admit(self, entries: list[Entry], claims: dict[str, Claim] | None = None) -> None:
        """Decode a batch, claim all its markers (with the acks so far) in one call, queue the rest.

        ``claims``: the markers were claimed with the read (entry id → claim).
        """
        jobs: list[_Job] = []
        for eid, fields in entries:
            if eid in self._inflight:
                continue
            raw = fields.get(Field.DELIVERY.key, b"")
            try:
                d = decode_delivery(raw)
            except ValueError as e:
                await self._undecodable(eid, raw, str(e))
                continue
            jobs.append(_Job(eid, d, d.conversation or d.envelope.conversation.id))
        if not jobs:
            return
        if claims is not None:
            claimed = [claims.get(j.eid, UNCLAIMED) for j in jobs]
        else:
            try:
                claimed = await self.acks.sync([self.keys.mark(self.cfg.name, j.d.id) for j in jobs])
            except UNAVAILABLE as e:  # the workers claim one by one, retrying until Redis is back
                self.log.warning("runner.claim_failed", error=str(e))
                claimed = [UNCLAIMED] * len(jobs)
        now = time.monotonic()
        for job, claim in zip(jobs, claimed, strict=True):
            if claim.status is ClaimStatus.OK:
                job.claimed_at = now
            elif claim.status is ClaimStatus.DONE:
                self.log.info("delivery.duplicate_skipped", delivery=job.d.id, entry=job.eid,
                              remote_id=claim.remote_id)  # fmt: skip
                self.bus.metrics.duplicate_skipped.labels(self.cfg.name).inc()
                self.acks.add(Ack(job.eid))
                continue
            self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        self._inflight[job.eid] = job
        self._idle.clear()
        q = self._queues.get(job.conv)
        if q is None:
            self._queues[job.conv] = deque((job,))
            self._ready.put_nowait(job.conv)
        else:
            q.append(job)

    async def _worker(self) -> None:
        """Serve ready conversations, one delivery at a time; a conversation is never on two workers."""
        while True:
            conv = await self._ready.get()
            q = self._queues[conv]
            job = q[0]
            _raise_if_cancelled()
            if not self._may_send():  # the lease ended: leave the rest pending, in order
                return
            try:
                await self.deliver(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: the entry stays pending and is taken up again after claim_idle
                self.log.exception("delivery.crashed", delivery=job.d.id, entry=job.eid)
            finally:
                q.popleft()
                self._inflight.pop(job.eid, None)
                if q:
                    self._ready.put_nowait(conv)
                else:
                    del self._queues[conv]
                if len(self._inflight) <= self._limit // 2:
                    self._room.set()
                if not self._inflight:
                    self._idle.set()

    async def _undecodable(self, eid: str, raw: bytes, err: str) -> None:
        self.log.error("delivery.bad_entry", entry=eid, error=err)
        await self.bus.dead_letter(
            raw, reason=f"undecodable delivery: {err}", origin=f"out:{self.cfg.name}",
            attempts=0, instance=self.instance,
        )  # fmt: skip
        self.acks.add(Ack(eid))

    # -- one delivery: claim → send → ack ----------------------------------------------------------

    def limits(self, d: Delivery) -> list[Limit]:
        """The rate limits a message of ``d`` is charged to: the sink's rates, then the recipient's.

        The one place that says what a sink's rate is: the claim before a send charges these, and
        so does each further part of a split delivery (:meth:`charge_part`).
        """
        burst = self.cfg.burst
        out = [Limit(self.keys.rate(self.cfg.name, n), r, burst) for n, r in enumerate(self.rates)]
        for recipient, rates in self.sink.recipient_limits(d):
            out += [Limit(self.keys.rate(self.cfg.name, n, recipient), r, 1) for n, r in enumerate(rates)]
        return out

    async def _claim(self, d: Delivery, limits: Sequence[Limit] | None) -> Claim:
        """Claim ``d``'s marker and charge ``limits`` (None: only keep the claim alive)."""
        return await self.scripts.claim_send(
            self.keys.mark(self.cfg.name, d.id), self.owner, self._claim_ttl_ms, limits
        )

    async def deliver(self, job: _Job) -> None:
        """Claim, send and ack one delivery, retrying in place until it is sent or dead."""
        eid, d = job.eid, job.d
        attempt = 0
        marker = self.keys.mark(self.cfg.name, d.id)
        sent = self._recent.get(d.id)
        if sent is not None:  # the same delivery twice in the stream (routed again), just sent:
            # its done marker may not be in Redis yet, so the claim would not say so
            self._log(job).info("delivery.duplicate_skipped", remote_id=sent)
            self.acks.add(Ack(eid, marker, f"done:{sent}"))
            return
        limits = self.limits(d)
        # claimed with its batch, nothing to charge, and the claim is fresh: send without asking again
        fresh = (
            job.claimed_at is not None
            and not limits
            and time.monotonic() - job.claimed_at < self.cfg.claim_idle / 2
        )
        while True:
            if fresh:
                claim, fresh = OK, False
            else:
                try:
                    claim = await self._claim(d, limits)
                except UNAVAILABLE as e:
                    self._log(job).warning("delivery.redis_unavailable", error=str(e))
                    await asyncio.sleep(1.0)
                    continue
            if claim.status is ClaimStatus.DONE:
                self._log(job).info("delivery.duplicate_skipped", remote_id=claim.remote_id)
                self.bus.metrics.duplicate_skipped.labels(self.cfg.name).inc()
                self.acks.add(Ack(eid))
                return
            if claim.status is ClaimStatus.BUSY:  # another live instance is sending this delivery now
                await asyncio.sleep(min(max(claim.wait, 0.1), 5.0))
                continue
            if claim.status is ClaimStatus.WAIT:
                self.bus.metrics.rate_limit_wait.labels(self.cfg.name).inc(claim.wait)
                await asyncio.sleep(claim.wait)
                continue
            _raise_if_cancelled()
            if not self._may_send():  # the lease ended while we waited: the next holder sends it
                raise asyncio.CancelledError
            attempt += 1
            started, t0 = time.time(), time.monotonic()
            try:
                self._sending += 1
                self._sends_idle.clear()
                try:
                    remote_id = await self.sink.send(d, SendContext(d, self, budget=self.cfg.claim_idle / 2))
                finally:
                    self._sending -= 1
                    if not self._sending:
                        self._sends_idle.set()
            except PermanentError as e:
                if isinstance(e, NoWayBack) and await self._fallback(eid, d, e):
                    return
                await self._dead(eid, d, f"permanent: {e}", attempt, self._log(job))
                return
            except (RetryableError, *UNAVAILABLE, TimeoutError) as e:
                reason = str(e) or type(e).__name__
                retry_after = e.retry_after if isinstance(e, RetryableError) else None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._log(job).exception("delivery.sink_error", attempt=attempt)
                reason = f"{type(e).__name__}: {e}"
                retry_after = None
            else:
                self.sent += 1
                self.bus.metrics.count_sent(self.cfg.name, d, started, time.monotonic() - t0)
                self.acks.add(Ack(eid, marker, f"done:{remote_id}"))
                self._recent[d.id] = remote_id
                if len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
                return
            log = self._log(job)
            if attempt >= self.cfg.max_attempts:
                await self._dead(eid, d, f"gave up after {attempt} attempts: {reason}", attempt, log)
                return
            delay = self.backoff(attempt) if retry_after is None else max(retry_after, 0.0)
            log.warning("delivery.retry", attempt=attempt, delay=round(delay, 3), reason=reason)
            self.bus.metrics.retried.labels(self.cfg.name).inc()
            await self._sleep(delay, d)

    def _log(self, job: _Job) -> Any:
        return self.log.bind(delivery=job.d.id, entry=job.eid)

    def backoff(self, attempt: int) -> float:
        """Exponential with full jitter between half and the whole step."""
        step = min(self.cfg.retry_max, self.cfg.retry_base * (2 ** (attempt - 1)))
        return float(step * (0.5 + random.random() / 2))

    async def _sleep(self, delay: float, d: Delivery) -> None:
        """Sleep, keeping the marker (and so our claim on the delivery) alive."""
        end = time.monotonic() + delay
        step = max(self.cfg.claim_idle / 3, 0.05)
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, step))
            if end - time.monotonic() > 0:
                with contextlib.suppress(*UNAVAILABLE):
                    await self._claim(d, None)

    async def _fallback(self, eid: str, d: Delivery, e: NoWayBack) -> bool:
        """Hand an answer this sink cannot carry back to its ``fallback`` (bridge/fallback.py)."""
        fd = fallback_delivery(self.cfg, d, e)
        if fd is None:
            return False
        while True:
            try:
                await self.bus.add_deliveries([fd])
                break
            except UNAVAILABLE:
                await asyncio.sleep(1.0)
        self.log.warning(
            "delivery.fallback", delivery=d.id, fallback=fd.sink, conversation=fd.conversation, reason=str(e)
        )
        self.acks.add(Ack(eid, self.keys.mark(self.cfg.name, d.id), f"done:fallback:{fd.id}"))
        return True

    async def _dead(self, eid: str, d: Delivery, reason: str, attempts: int, log: Any) -> None:
        self.dead += 1
        log.error("delivery.dead", reason=reason, attempts=attempts)
        while True:
            try:
                await self.bus.dead_letter(
                    encode(d), reason=reason, origin=f"out:{self.cfg.name}", attempts=attempts,
                    instance=self.instance,
                )  # fmt: skip
                break
            except UNAVAILABLE:
                await asyncio.sleep(1.0)
        self.acks.add(Ack(eid, self.keys.mark(self.cfg.name, d.id), "done:dead"))

    # -- DeliveryServices: what the sink may ask while sending -------------------------------------

    async def parts_sent(self, d: Delivery) -> int:
        v = await self.bus.redis.get(self.keys.parts(self.cfg.name, d.id))
        return int(v or 0)

    async def part_sent(self, d: Delivery, n: int) -> None:
        await self.bus.redis.set(self.keys.parts(self.cfg.name, d.id), n, ex=DONE_TTL)

    async def charge_part(self, d: Delivery, deadline: float, progress: str) -> None:
        """Charge one more part of ``d`` to :meth:`limits`, waiting for quota until ``deadline``
        (monotonic); past it raise RetryableError so the runner retries (from the parts recorded)."""
        limits = self.limits(d)
        while True:
            if time.monotonic() > deadline:
                raise RetryableError(f"{progress}; this attempt ran long, the next one goes on", 0.0)
            wait = await self._limiter.acquire(limits)
            if wait <= 0:
                return
            if time.monotonic() + wait > deadline:
                raise RetryableError(f"{progress}; waiting for quota before the next part", wait)
            self.bus.metrics.rate_limit_wait.labels(self.cfg.name).inc(wait)
            await asyncio.sleep(wait)

    async def draft(self, envelope_id: str, text: str) -> None:
        await self.ctx.set_draft(envelope_id, text)

    async def reply(self, d: Delivery, text: str, *, seq: int, format: str, **fields: Any) -> bool:
        env = reply_envelope(d, self.cfg.name, text, seq=seq, format=format, **fields)
        return await self.bus.publish(env, dedupe_key=env.id)
