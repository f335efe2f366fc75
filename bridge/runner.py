"""The delivery runner, written once for every sink.

One runner per sink per instance consumes ``P:{out:<sink>}`` in group ``runner``. For each delivery:

1. **claim** its idempotency marker (one Lua call that also charges the rate limits when it is time
   to send): ``done:…`` → already sent, ack and skip; held by another live instance → wait;
2. **send** through the sink, under the sink's concurrency bound;
3. on success set the marker to ``done:<remote id>`` and ack (batched in a pipeline);
   on :class:`RetryableError` back off exponentially with jitter (or the sink's retry-after) *in
   place*, so a conversation keeps its order; on :class:`PermanentError` or after ``max_attempts``
   write a dead letter with the reason, then ack.

Deliveries to one conversation run one after another; different conversations run concurrently.
A stopped runner stops reading, lets sends in flight finish within a bound, acks, and returns;
what did not finish stays pending and is taken up again by this instance's next life (it reads its
own pending entries first) or, after ``claim_idle``, by another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any

from bridge import logging as blog
from bridge.adapter import PermanentError, RetryableError, SendContext, Sink
from bridge.bus import RUNNER_GROUP, UNAVAILABLE, Bus, Entry
from bridge.config import OutboundConfig, Rate, parse_rates
from bridge.envelope import Delivery, Origin, decode_delivery, encode, make_envelope, stable_id
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

DONE_TTL = 7 * 86_400


class _Chain:
    """The tail of one conversation's queue."""

    __slots__ = ("count", "tail")

    def __init__(self) -> None:
        self.tail: asyncio.Future[None] | None = None
        self.count = 0


class Runner:
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
        self.batch = batch
        self.shutdown_timeout = shutdown_timeout
        self.log = blog.get("runner", sink=cfg.name)
        rates = parse_rates(cfg.rate) if cfg.rate is not None else parse_rates(sink.default_rate or "")
        self.rates: list[Rate] = rates
        self._claim = bus.redis.register_script(_CLAIM)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._stopping = asyncio.Event()
        self._chains: dict[str, _Chain] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._acks: list[tuple[str, str | None, str]] = []  # (entry id, marker key or None, value)
        self._ack_wake = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dead = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self.bus.ensure_group(self.stream, RUNNER_GROUP)
        self._ack_task = asyncio.create_task(self._acker(), name=f"acker:{self.cfg.name}")
        try:
            await self._read_loop()
        finally:
            await self._drain()

    async def _read_loop(self) -> None:
        start = "0"
        next_claim = time.monotonic() + min(30.0, self.cfg.claim_idle / 2)
        claim_cursor = "0-0"
        limit = self.cfg.concurrency * 4
        while not self._stopping.is_set():
            if len(self._inflight) >= limit:
                await asyncio.wait(list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED)
                continue
            entries = await self.bus.read_or_stop(
                self._stopping,
                self.stream, RUNNER_GROUP, self.instance,
                count=min(self.batch, limit - len(self._inflight)),
                block_ms=None if start != ">" else 1000, start=start,
            )  # fmt: skip
            if start != ">":
                if not entries:
                    start = ">"
                    continue
                start = entries[-1][0]
            for entry in entries:
                self._schedule(entry)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + min(30.0, self.cfg.claim_idle / 2)
                claim_cursor = await self._reclaim(claim_cursor)

    async def _reclaim(self, cursor: str) -> str:
        """Take over entries idle on vanished consumers (XAUTOCLAIM, keeping the cursor)."""
        res = await self.bus.redis.xautoclaim(
            self.stream, RUNNER_GROUP, self.instance, int(self.cfg.claim_idle * 1000), cursor, count=100
        )
        nxt, claimed = res[0], res[1]
        for eid, fields in claimed:
            eid = eid.decode() if isinstance(eid, bytes) else eid
            if fields is not None and eid not in self._inflight:
                self.log.info("delivery.reclaimed", entry=eid)
                self._schedule((eid, fields))
        return str(nxt.decode() if isinstance(nxt, bytes) else nxt)

    async def _drain(self) -> None:
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight.values()), timeout=self.shutdown_timeout)
            for t in pending:
                t.cancel()
            if pending:
                self.log.warning("runner.shutdown_unfinished", count=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self._ack_task is not None:
            self._ack_task.cancel()
            await asyncio.gather(self._ack_task, return_exceptions=True)
        await self._flush_acks()

    # -- scheduling --------------------------------------------------------------------------------

    def _schedule(self, entry: Entry) -> None:
        eid, fields = entry
        if eid in self._inflight:
            return
        raw = fields.get(b"d", b"")
        try:
            d = decode_delivery(raw)
        except ValueError as e:
            self._track(eid, asyncio.create_task(self._undecodable(eid, raw, str(e))))
            return
        conv = d.conversation or d.envelope.conversation.id
        chain = self._chains.get(conv)
        if chain is None:
            chain = self._chains[conv] = _Chain()
        prev = chain.tail
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        chain.tail = done
        chain.count += 1
        self._track(eid, asyncio.create_task(self._deliver(eid, d, prev, done, conv)))

    def _track(self, eid: str, task: asyncio.Task[None]) -> None:
        self._inflight[eid] = task

        def forget(_: asyncio.Task[None]) -> None:
            self._inflight.pop(eid, None)

        task.add_done_callback(forget)

    async def _undecodable(self, eid: str, raw: bytes, err: str) -> None:
        self.log.error("delivery.bad_entry", entry=eid, error=err)
        await self.bus.dead_letter(
            raw, reason=f"undecodable delivery: {err}", origin=f"out:{self.cfg.name}",
            attempts=0, instance=self.instance,
        )  # fmt: skip
        self._ack(eid, None, "")

    async def _deliver(
        self, eid: str, d: Delivery, prev: asyncio.Future[None] | None, done: asyncio.Future[None], conv: str
    ) -> None:
        try:
            if prev is not None:
                await asyncio.shield(prev)
            async with self._sem:
                await self._attempts(eid, d)
        finally:
            if not done.done():
                done.set_result(None)
            chain = self._chains.get(conv)
            if chain is not None:
                chain.count -= 1
                if chain.count == 0:
                    del self._chains[conv]

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

    async def _claim_marker(self, d: Delivery, charge: bool) -> tuple[str, str]:
        marker = self.keys.mark(self.cfg.name, d.id)
        rkeys, rargs = self._limits(d) if charge else ([], [])
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

    async def _attempts(self, eid: str, d: Delivery) -> None:
        attempt = 0
        log = self.log.bind(delivery=d.id, entry=eid)
        marker = self.keys.mark(self.cfg.name, d.id)
        while True:
            try:
                status, value = await self._claim_marker(d, charge=True)
            except UNAVAILABLE as e:
                log.warning("delivery.redis_unavailable", error=str(e))
                await asyncio.sleep(1.0)
                continue
            if status == "done":
                log.info("delivery.duplicate_skipped", remote_id=value[5:])
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
                await self._dead(eid, d, f"permanent: {e}", attempt, log)
                return
            except (RetryableError, *UNAVAILABLE, TimeoutError) as e:
                reason = str(e) or type(e).__name__
                retry_after = e.retry_after if isinstance(e, RetryableError) else None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("delivery.sink_error", attempt=attempt)
                reason = f"{type(e).__name__}: {e}"
                retry_after = None
            else:
                self.sent += 1
                log.debug("delivery.sent", remote_id=remote_id, attempt=attempt)
                self._ack(eid, marker, f"done:{remote_id}")
                return
            if attempt >= self.cfg.max_attempts:
                await self._dead(eid, d, f"gave up after {attempt} attempts: {reason}", attempt, log)
                return
            delay = self.backoff(attempt) if retry_after is None else max(retry_after, 0.0)
            log.warning("delivery.retry", attempt=attempt, delay=round(delay, 3), reason=reason)
            await self._sleep(delay, d)

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
            self._ack_wake.clear()
            try:
                await self._flush_acks()
            except UNAVAILABLE as e:
                self.log.warning("runner.ack_failed", error=str(e))
                await asyncio.sleep(1.0)
                self._ack_wake.set()

    async def _flush_acks(self) -> None:
        if not self._acks:
            return
        batch, self._acks = self._acks, []
        try:
            pipe: Any = self.bus.redis.pipeline(transaction=False)
            for _eid, marker, value in batch:
                if marker is not None:
                    pipe.set(marker, value, ex=DONE_TTL)
            pipe.xack(self.stream, RUNNER_GROUP, *[b[0] for b in batch])
            await pipe.execute()
        except BaseException:
            self._acks[:0] = batch
            raise

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
