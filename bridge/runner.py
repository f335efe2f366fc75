"""The delivery runner, written once for every sink.

One runner per sink per instance consumes ``P:{out:<sink>}`` in group ``runner``. For each delivery:

1. **claim** its idempotency marker: ``done:…`` → already sent, ack and skip; held by another live
   instance → wait. The read loop claims the markers of a whole batch in one Lua call (which also
   writes the acks so far); when the sink has a rate, one more call just before each send claims
   again and charges the rate limits (GCRA), so the rate holds at the moment of sending;
2. **send** through the sink, on one of ``concurrency`` workers;
3. on success set the marker to ``done:<remote id>`` and ack — batched: many acks in one Lua call;
   on :class:`RetryableError` back off exponentially with jitter (or the sink's retry-after) *in
   place*, so a conversation keeps its order; on :class:`PermanentError` or after ``max_attempts``
   write a dead letter with the reason, then ack.

Deliveries to one conversation run one after another (a conversation's queue is served by one worker
at a time); different conversations run concurrently. A stopped runner stops reading, lets queued
and in-flight sends finish within a bound, acks, and returns; what did not finish stays pending and
is taken up again by this instance's next life (it reads its own pending entries first) or, after
``claim_idle``, by another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from typing import Any

from bridge import logging as blog
from bridge.adapter import SendContext, Sink
from bridge.bus import RUNNER_GROUP, UNAVAILABLE, Bus, Entry
from bridge.config import OutboundConfig, Rate, parse_rates
from bridge.envelope import Delivery, Origin, decode_delivery, encode, make_envelope, stable_id
from bridge.errors import PermanentError, RetryableError
from bridge.ratelimit import GCRA_SNIPPET

# KEYS[1] marker, KEYS[2..] rate keys. ARGV[1] owner, ARGV[2] owner's instance prefix ("inst:"),
# ARGV[3] marker ttl ms, ARGV[4] '1' to charge the rates, ARGV[5..] (interval_ms, burst) per rate key.
_CLAIM = (
    """
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 5) == 'done:' then return {'done', v} end
  if v ~= ARGV[1] and string.sub(v, 1, #ARGV[2]) ~= ARGV[2] then
    return {'busy', tostring(redis.call('PTTL', KEYS[1]))}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if ARGV[4] ~= '1' then return {'ok', '0'} end
local kbase = 2
local base = 5
"""
    + GCRA_SNIPPET
    + """
if wait > 0 then return {'wait', tostring(wait)} end
return {'ok', '0'}
"""
)

# Claim one marker for ``owner`` (the same decision as _CLAIM's): its 'done:<remote id>' value when it
# was sent, 'busy' when another live instance holds it, else 'ok' — then it is ours for ``ttl`` ms.
_CLAIM_ONE = """
local function claim(mk, owner, prefix, ttl)
  local v = redis.call('GET', mk)
  if v and string.sub(v, 1, 5) == 'done:' then return v end
  if v and v ~= owner and string.sub(v, 1, #prefix) ~= prefix then return 'busy' end
  redis.call('SET', mk, owner, 'PX', ttl)
  return 'ok'
end
"""

# One round trip for a batch of bookkeeping: set done markers, ack entries, claim markers.
# KEYS[1] the sink's stream, KEYS[2 .. 1+nd] markers to set done, KEYS[2+nd ..] markers to claim.
# ARGV[1] group, ARGV[2] done ttl s, ARGV[3] nd, ARGV[4] na (ids to ack), ARGV[5] owner,
# ARGV[6] owner's instance prefix ("inst:"), ARGV[7] claim ttl ms, then nd done values, then na ids.
# Returns, per marker to claim: 'ok' (now ours), 'busy' (another live instance holds it) or its
# 'done:<remote id>' value. The claim is _CLAIM's without charging the rates.
_SYNC = (
    _CLAIM_ONE
    + """
local nd, na = tonumber(ARGV[3]), tonumber(ARGV[4])
local owner, prefix = ARGV[5], ARGV[6]
for i = 1, nd do
  redis.call('SET', KEYS[1 + i], ARGV[7 + i], 'EX', ARGV[2])
end
local a = 8 + nd
local i = 0
while i < na do
  local j = math.min(i + 500, na)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, a + i, a + j - 1))
  i = j
end
local out = {}
for k = 2 + nd, #KEYS do
  out[#out + 1] = claim(KEYS[k], owner, prefix, ARGV[7])
end
return out
"""
)

# Run in the read's pipeline, just after its XREADGROUP: claims the markers of the entries that read
# gave us, found as this consumer's pending entries newer than the last one read before.
# KEYS[1] the sink's stream. ARGV[1] group, ARGV[2] consumer, ARGV[3] the id read last before ("0-0"),
# ARGV[4] how many at most, ARGV[5] owner, ARGV[6] owner's instance prefix, ARGV[7] claim ttl ms,
# ARGV[8] the markers' key prefix (under the sink's hash tag: the same slot as KEYS[1]).
# Returns (entry id, status) pairs; status as _SYNC's, or '' for an entry without its delivery id
# (written by an older version: its worker claims it alone, as before).
_CLAIM_READ = (
    _CLAIM_ONE
    + """
local out = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. ARGV[3], '+', ARGV[4], ARGV[2])) do
  local id, st = p[1], ''
  local e = redis.call('XRANGE', KEYS[1], id, id)[1]
  if e then
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'i' then st = claim(ARGV[8] .. f[i + 1], ARGV[5], ARGV[6], ARGV[7]) end
    end
  end
  out[#out + 1] = id
  out[#out + 1] = st
end
return out
"""
)

DONE_TTL = 7 * 86_400
#: acks (done markers + XACK) wait this long to be written together, in one round trip. It widens
#: the one window where a crash resends (after the platform accepted, before the marker is written)
#: by as much; a graceful stop writes them at once.
ACK_LINGER = 0.002


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
    in place); different conversations are served concurrently. The read loop reads a batch and
    claims the idempotency markers of the whole batch in the same round trip (a pipeline: the acks so
    far, XREADGROUP, then a Lua call claiming what it read), and queues the deliveries; a worker sends
    without another round trip when the sink has no rate to charge. Acks are batched (one Lua call
    for many) and ride on the next read when one comes within ``ACK_LINGER``.
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
    ) -> None:
        self.sink = sink
        self.ctx = sink.ctx
        self.cfg = cfg
        self.bus = bus
        self.keys = bus.keys
        self.instance = instance
        self.owner = f"{instance}:{uuid.uuid4().hex[:12]}"
        self.stream = bus.keys.out(cfg.name)
        self._mark_prefix = bus.keys.mark(cfg.name, "")  # + a delivery id: its marker
        self.batch = batch
        self.shutdown_timeout = shutdown_timeout
        self.log = blog.get("runner", sink=cfg.name)
        rates = parse_rates(cfg.rate) if cfg.rate is not None else parse_rates(sink.default_rate or "")
        self.rates: list[Rate] = rates
        self._claim = bus.redis.register_script(_CLAIM)
        self._sync = bus.redis.register_script(_SYNC)
        self._stopping = asyncio.Event()
        #: read-ahead: at most this many deliveries taken and not finished; read again below half
        self._limit = max(cfg.concurrency * 4, 64)
        self._queues: dict[str, deque[_Job]] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._inflight: dict[str, _Job] = {}
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._acks: list[tuple[str, str | None, str]] = []  # (entry id, marker key or None, value)
        self._ack_wake = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dead = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._room.set()

    async def run(self) -> None:
        await self.bus.ensure_group(self.stream, RUNNER_GROUP)
        self._ack_task = asyncio.create_task(self._acker(), name=f"acker:{self.cfg.name}")
        self._workers = [
            asyncio.create_task(self._worker(), name=f"send:{self.cfg.name}:{n}")
            for n in range(self.cfg.concurrency)
        ]
        try:
            await self._read_loop()
        finally:
            await self._drain()

    async def _read_loop(self) -> None:
        start = last_read = "0"
        next_claim = time.monotonic() + min(30.0, self.cfg.claim_idle / 2)
        claim_cursor = "0-0"
        low = self._limit // 2
        while not self._stopping.is_set():
            if len(self._inflight) > low:
                self._room.clear()
                await self._room.wait()
                continue
            count = min(self.batch, self._limit - len(self._inflight))
            statuses: dict[str, str] | None = None
            if start != ">":  # our own pending entries first (a previous life's), claimed in _admit
                entries = await self.bus.read(
                    self.stream, RUNNER_GROUP, self.instance, count=count, block_ms=None, start=start
                )
                if not entries:
                    start = ">"
                    continue
                start = last_read = entries[-1][0]
            else:
                got = await self._read_claiming(count, last_read)
                if got is None:
                    break
                entries, statuses = got
                if entries:
                    last_read = entries[-1][0]
            if entries:
                await self._admit(entries, statuses)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + min(30.0, self.cfg.claim_idle / 2)
                claim_cursor = await self._reclaim(claim_cursor)

    async def _reclaim(self, cursor: str) -> str:
        """Take over entries idle on vanished consumers (XAUTOCLAIM, keeping the cursor)."""
        res = await self.bus.redis.xautoclaim(
            self.stream, RUNNER_GROUP, self.instance, int(self.cfg.claim_idle * 1000), cursor, count=100
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
        if self._inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), self.shutdown_timeout)
            except TimeoutError:
                self.log.warning("runner.shutdown_unfinished", count=len(self._inflight))
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._ack_task is not None:
            self._ack_task.cancel()
            await asyncio.gather(self._ack_task, return_exceptions=True)
        await self._flush_acks()

    # -- scheduling --------------------------------------------------------------------------------

    async def _read_claiming(self, count: int, last_read: str) -> tuple[list[Entry], dict[str, str]] | None:
        """New entries and their markers claimed, in one round trip (None: stopped meanwhile).

        One pipeline: the acks so far (_SYNC), the blocking XREADGROUP, then _CLAIM_READ claiming
        the markers of what it read. Abandoned on stop: the acks go again (idempotent), and what was
        read and claimed stays pending under our name for our next life.
        """
        batch, self._acks = self._acks, []

        def before(pipe: Any) -> None:
            if batch:
                keys, args = self._sync_args(batch, [])
                pipe.eval(_SYNC, len(keys), *keys, *args)

        def after(pipe: Any) -> None:
            pipe.eval(
                _CLAIM_READ, 1, self.stream, RUNNER_GROUP, self.instance, last_read, count + 100,
                self.owner, f"{self.instance}:", int(self.cfg.claim_idle * 1000), self._mark_prefix,
            )  # fmt: skip

        try:
            got = await self.bus.or_stop(
                self._stopping,
                self.bus.read_around(
                    self.stream, RUNNER_GROUP, self.instance, count=count, block_ms=1000,
                    before=before, after=after,
                ),
            )  # fmt: skip
        except BaseException:
            self._acks[:0] = batch
            raise
        if got is None:
            self._acks[:0] = batch
            return None
        entries, results = got
        pairs = [x.decode() if isinstance(x, bytes) else str(x) for x in results[-1]]
        return entries, dict(zip(pairs[::2], pairs[1::2], strict=True))

    async def _admit(self, entries: list[Entry], statuses: dict[str, str] | None = None) -> None:
        """Decode a batch, claim all its markers (with the acks so far) in one call, queue the rest.

        ``statuses``: the markers were claimed with the read (entry id → status; '' = not claimed).
        """
        jobs: list[_Job] = []
        for eid, fields in entries:
            if eid in self._inflight:
                continue
            raw = fields.get(b"d", b"")
            try:
                d = decode_delivery(raw)
            except ValueError as e:
                await self._undecodable(eid, raw, str(e))
                continue
            jobs.append(_Job(eid, d, d.conversation or d.envelope.conversation.id))
        if not jobs:
            return
        mark = self.keys.mark
        if statuses is not None:
            claimed = [statuses.get(j.eid, "") for j in jobs]
        else:
            try:
                claimed = await self._sync_call([mark(self.cfg.name, j.d.id) for j in jobs])
            except UNAVAILABLE as e:  # the workers claim one by one, retrying until Redis is back
                self.log.warning("runner.claim_failed", error=str(e))
                claimed = [""] * len(jobs)
                if self._acks:
                    self._ack_wake.set()
        now = time.monotonic()
        for job, status in zip(jobs, claimed, strict=True):
            if status == "ok":
                job.claimed_at = now
            elif status.startswith("done:"):
                self.log.info("delivery.duplicate_skipped", delivery=job.d.id, entry=job.eid,
                              remote_id=status[5:])  # fmt: skip
                self._ack(job.eid, None, "")
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
            try:
                await self._attempts(job)
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
        self._ack(eid, None, "")

    # -- one delivery ------------------------------------------------------------------------------

    def _limits(self, d: Delivery) -> tuple[list[str], list[float | int]]:
        keys: list[str] = []
        args: list[float | int] = []
        burst = self.cfg.burst
        for n, r in enumerate(self.rates):
            keys.append(self.keys.rate(self.cfg.name, n))
            args += [r.interval * 1000.0, burst]
        for recipient, rates in self.sink.recipient_limits(d):
            for n, r in enumerate(rates):
                keys.append(self.keys.rate(self.cfg.name, n, recipient))
                args += [r.interval * 1000.0, 1]
        return keys, args

    async def _claim_marker(
        self, d: Delivery, charge: bool, limits: tuple[list[str], list[float | int]] | None = None
    ) -> tuple[str, str]:
        marker = self.keys.mark(self.cfg.name, d.id)
        rkeys, rargs = (limits or self._limits(d)) if charge else ([], [])
        res = await self._claim(
            keys=[marker, *rkeys],
            args=[
                self.owner,
                f"{self.instance}:",
                int(self.cfg.claim_idle * 1000),
                "1" if charge else "0",
                *rargs,
            ],
        )
        status, value = (x.decode() if isinstance(x, bytes) else str(x) for x in res)
        return status, value

    async def _attempts(self, job: _Job) -> None:
        eid, d = job.eid, job.d
        attempt = 0
        marker = self.keys.mark(self.cfg.name, d.id)
        limits = self._limits(d)
        # claimed with its batch, nothing to charge, and the claim is fresh: send without asking again
        claimed = (
            job.claimed_at is not None
            and not limits[0]
            and time.monotonic() - job.claimed_at < self.cfg.claim_idle / 2
        )
        while True:
            if claimed:
                status, value = "ok", "0"
                claimed = False
            else:
                try:
                    status, value = await self._claim_marker(d, True, limits)
                except UNAVAILABLE as e:
                    self._log(job).warning("delivery.redis_unavailable", error=str(e))
                    await asyncio.sleep(1.0)
                    continue
            if status == "done":
                self._log(job).info("delivery.duplicate_skipped", remote_id=value[5:])
                self._ack(eid, None, "")
                return
            if status == "busy":  # another live instance is sending this delivery now
                await asyncio.sleep(min(max(int(value), 100) / 1000.0, 5.0))
                continue
            if status == "wait":
                await asyncio.sleep(float(value) / 1000.0)
                continue
            attempt += 1
            try:
                remote_id = await self.sink.send(d, SendContext(d, self))
            except PermanentError as e:
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
                self._ack(eid, marker, f"done:{remote_id}")
                return
            log = self._log(job)
            if attempt >= self.cfg.max_attempts:
                await self._dead(eid, d, f"gave up after {attempt} attempts: {reason}", attempt, log)
                return
            delay = self.backoff(attempt) if retry_after is None else max(retry_after, 0.0)
            log.warning("delivery.retry", attempt=attempt, delay=round(delay, 3), reason=reason)
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
                    await self._claim_marker(d, charge=False)

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
        self._ack(eid, self.keys.mark(self.cfg.name, d.id), "done:dead")

    # -- acks --------------------------------------------------------------------------------------

    def _ack(self, eid: str, marker: str | None, value: str) -> None:
        self._acks.append((eid, marker, value))
        self._ack_wake.set()

    async def _acker(self) -> None:
        while True:
            await self._ack_wake.wait()
            # linger a moment: more acks come, and the read loop's next claim call may carry them all
            await asyncio.sleep(ACK_LINGER)
            self._ack_wake.clear()
            try:
                await self._flush_acks()
            except UNAVAILABLE as e:
                self.log.warning("runner.ack_failed", error=str(e))
                await asyncio.sleep(1.0)
                self._ack_wake.set()

    async def _flush_acks(self) -> None:
        if self._acks:
            await self._sync_call([])

    async def _sync_call(self, claim: list[str]) -> list[str]:
        """Write the acks so far and claim ``claim`` markers, in one round trip."""
        batch, self._acks = self._acks, []
        if not batch and not claim:
            return []
        keys, args = self._sync_args(batch, claim)
        try:
            res = await self._sync(keys=keys, args=args)
        except BaseException:
            self._acks[:0] = batch
            raise
        return [x.decode() if isinstance(x, bytes) else str(x) for x in res]

    def _sync_args(
        self, batch: list[tuple[str, str | None, str]], claim: list[str]
    ) -> tuple[list[str], list[Any]]:
        """_SYNC's keys and arguments: write the acks of ``batch``, claim the ``claim`` markers."""
        done = [(m, v) for _, m, v in batch if m is not None]
        keys = [self.stream, *(m for m, _ in done), *claim]
        args: list[Any] = [
            RUNNER_GROUP, DONE_TTL, len(done), len(batch), self.owner, f"{self.instance}:",
            int(self.cfg.claim_idle * 1000), *(v for _, v in done), *(b[0] for b in batch),
        ]  # fmt: skip
        return keys, args

    # -- SendContext's backend ---------------------------------------------------------------------

    async def parts_sent(self, d: Delivery) -> int:
        v = await self.bus.redis.get(self.keys.parts(self.cfg.name, d.id))
        return int(v or 0)

    async def part_sent(self, d: Delivery, n: int) -> None:
        await self.bus.redis.set(self.keys.parts(self.cfg.name, d.id), n, ex=DONE_TTL)

    async def reply(self, d: Delivery, text: str, *, seq: int, format: str, **fields: Any) -> bool:
        env = d.envelope
        origin = env.origin if env.kind == "reply" and env.origin else Origin(
            source=env.source, conversation=env.conversation, envelope_id=env.id, sender=env.sender
        )  # fmt: skip
        reply = make_envelope(
            self.cfg.name,
            origin.conversation,
            text,
            id=stable_id("reply", d.id, str(seq)),
            kind="reply",
            reply_to=env.id,
            origin=origin,
            hops=env.hops + 1,
            format=format,
            **fields,
        )
        return await self.bus.publish(reply, dedupe_key=reply.id)
