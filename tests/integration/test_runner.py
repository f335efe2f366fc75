"""The delivery runner against real Redis: retries, dead letters, idempotency, order, rate."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.bus import RUNNER_GROUP, Field
from bridge.envelope import Conversation, Delivery, encode, make_envelope
from bridge.errors import PermanentError, RetryableError
from tests.conftest import CollectSink, wait_for

SINK = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "c"
type = "collect"
retry_base = 0.05
retry_max = 0.4
max_attempts = {attempts}
rate = "{rate}"
[[routes]]
from = "in"
to = "c"
"""


async def start(write_config: Any, start_daemon: Any, *, attempts: int = 5, rate: str = "none") -> Any:
    d = await start_daemon(write_config(SINK.format(attempts=attempts, rate=rate)))
    return d, CollectSink.instances["c"]


async def publish(d: Any, text: str, conv: str = "g1") -> str:
    env = make_envelope("in", Conversation(conv, "group"), text)
    await d.bus.publish(env)
    return env.id


async def dead_letters(d: Any) -> list[dict[bytes, bytes]]:
    return [f for _, f in await d.redis.xrange(d.bus.keys.dead)]


async def test_retryable_errors_back_off_then_succeed(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.script = [RetryableError("busy"), RetryableError("busy"), RetryableError("busy")]
    await publish(d, "hello")
    await wait_for(lambda: len(sink.sent) == 1)
    assert len(sink.attempts) == 4
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    # base 0.05 s doubling, jitter between half and the whole step: 25-50, 50-100, 100-200 ms
    assert 0.02 <= gaps[0] <= 0.2 and gaps[1] >= 0.045 and gaps[2] >= 0.09, gaps
    assert gaps[2] > gaps[0]
    assert await dead_letters(d) == []
    await wait_for(lambda: _drained(d))  # acks are written in batches, a few ms after the send


async def test_retry_after_is_honoured(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.script = [RetryableError("slow down", retry_after=0.5)]
    await publish(d, "hello")
    await wait_for(lambda: len(sink.sent) == 1)
    assert sink.attempts[1] - sink.attempts[0] >= 0.45


async def test_permanent_error_lands_in_dead_with_the_reason(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.script = [PermanentError("81013 no valid recipient: check the user id")]
    await publish(d, "hello")
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    assert dead[Field.REASON.key] == b"permanent: 81013 no valid recipient: check the user id"
    assert dead[b"from"] == b"out:c" and dead[b"attempts"] == b"1"
    assert b'"text":"hello"' in dead[Field.DELIVERY.key]
    assert sink.sent == [] and len(sink.attempts) == 1
    await wait_for(lambda: _drained(d))


async def _drained(d: Any) -> bool:
    return bool(await d.bus.out_pending("c") == 0)


async def test_exhausted_retries_land_in_dead(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon, attempts=3)
    sink.script = [RetryableError("HTTP 502")] * 5
    await publish(d, "hello")
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    assert dead[Field.REASON.key] == b"gave up after 3 attempts: HTTP 502"
    assert len(sink.attempts) == 3


async def test_a_redelivered_entry_is_not_sent_twice(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    await publish(d, "once")
    await wait_for(lambda: len(sink.sent) == 1)
    delivery = sink.sent[0]
    # the same delivery arrives again (a router that crashed before its ack routes the batch again)
    await d.redis.xadd(d.bus.keys.out("c"), {Field.DELIVERY: encode(delivery)})
    await d.redis.xadd(d.bus.keys.out("c"), {Field.DELIVERY: encode(delivery)})
    await wait_for(lambda: _drained(d))
    await asyncio.sleep(0.2)
    assert len(sink.sent) == 1
    assert await d.redis.get(d.bus.keys.mark("c", delivery.id)) == b"done:c1"


async def test_unacked_entry_of_a_previous_life_is_sent_on_restart(
    write_config: Any, start_daemon: Any
) -> None:
    """A crash between send and ack leaves the entry pending: the next life of the instance finishes it,
    and a delivery marked done by the previous life is acked without sending."""
    cfg = write_config(SINK.format(attempts=5, rate="none"))
    d = await start_daemon(cfg)
    await d.stop()  # groups exist; now play a crashed previous life by hand
    bus = d.bus
    env_a = make_envelope("in", Conversation("g1"), "sent before the crash")
    env_b = make_envelope("in", Conversation("g1"), "not sent before the crash")
    da, db = (Delivery(f"d-{e.text[:3]}-{e.id}", "c", e) for e in (env_a, env_b))
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(cfg.redis.url)
    for x in (da, db):
        await r.xadd(bus.keys.out("c"), {Field.DELIVERY: encode(x)})
    await r.xreadgroup(RUNNER_GROUP, "t1", {bus.keys.out("c"): ">"}, count=10)  # the old life took both
    await r.set(bus.keys.mark("c", da.id), "done:remote-1")  # ... and had sent the first
    await r.set(bus.keys.mark("c", db.id), "t1:oldlife")  # ... and was sending the second
    d2 = await start_daemon(cfg)
    sink = CollectSink.instances["c"]
    await wait_for(lambda: len(sink.sent) == 1)
    await wait_for(lambda: _drained(d2))
    assert [x.envelope.text for x in sink.sent] == ["not sent before the crash"]
    await r.aclose()


async def test_one_conversation_keeps_its_order_under_retries(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.script = [RetryableError("busy")]
    for i in range(5):
        await publish(d, f"m{i}", conv="g1")
    await wait_for(lambda: len(sink.sent) == 5)
    assert [x.envelope.text for x in sink.sent] == [f"m{i}" for i in range(5)]


async def test_conversations_run_concurrently(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.delay = 0.3
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(8):
        await publish(d, "x", conv=f"g{i}")
    await wait_for(lambda: len(sink.sent) == 8)
    assert loop.time() - t0 < 1.5  # 8 sequential sends would take 2.4 s


async def test_runner_respects_the_sink_rate(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon, rate="10/second")
    for i in range(6):
        await publish(d, f"m{i}", conv=f"g{i}")
    await wait_for(lambda: len(sink.sent) == 6)
    span = sink.attempts[-1] - sink.attempts[0]
    assert span >= 0.45, span  # 6 sends at 10/s need at least 0.5 s


async def test_a_crashing_sink_is_retried_not_lost(write_config: Any, start_daemon: Any) -> None:
    d, sink = await start(write_config, start_daemon)
    sink.script = [ZeroDivisionError("bug in a sink")]
    await publish(d, "hello")
    await wait_for(lambda: len(sink.sent) == 1)


async def test_the_read_claims_the_markers_of_what_it_read(
    write_config: Any, start_daemon: Any, monkeypatch: Any
) -> None:
    """Entries written with their delivery id are claimed in the read's own round trip: the runner's
    separate claim call is never used for them (only for acks)."""
    from bridge.runner import AckBatch, ReadClaim

    claims: list[list[str]] = []
    read: dict[str, str] = {}
    original, original_read = AckBatch.sync, ReadClaim.__call__

    async def spy(self: AckBatch, claim: Any = ()) -> Any:
        claims.append(list(claim))
        return await original(self, claim)

    async def spy_read(self: ReadClaim, count: int, stop: asyncio.Event) -> Any:
        got = await original_read(self, count, stop)
        if got is not None:
            read.update({f"{self.stream} {eid}": c.status.value for eid, c in got[1].items()})
        return got

    monkeypatch.setattr(AckBatch, "sync", spy)
    monkeypatch.setattr(ReadClaim, "__call__", spy_read)
    d, sink = await start(write_config, start_daemon)
    for i in range(5):
        await publish(d, f"m{i}", conv=f"g{i}")
    await wait_for(lambda: len(sink.sent) == 5)
    await wait_for(lambda: _drained(d))
    assert all(not c for c in claims)
    assert len(read) == 5 and set(read.values()) == {"ok"}
    for x in sink.sent:
        assert await d.redis.get(d.bus.keys.mark("c", x.id)) == f"done:c{sink.sent.index(x) + 1}".encode()


async def test_a_redelivered_entry_with_its_id_is_not_sent_twice(
    write_config: Any, start_daemon: Any
) -> None:
    d, sink = await start(write_config, start_daemon)
    await publish(d, "once")
    await wait_for(lambda: len(sink.sent) == 1)
    delivery = sink.sent[0]
    for _ in range(2):
        await d.redis.xadd(
            d.bus.keys.out("c"), {Field.DELIVERY: encode(delivery), Field.DELIVERY_ID: delivery.id}
        )
    await wait_for(lambda: _drained(d))
    await asyncio.sleep(0.2)
    assert len(sink.sent) == 1


async def test_a_marker_another_instance_left_is_taken_over_by_the_partition_holder(
    write_config: Any, start_daemon: Any
) -> None:
    """The partition's lease holder is its only sender (bridge/partitions.py): a marker another
    instance left unfinished (it lost the lease, so it stopped sending) is taken over at once, the
    delivery is sent exactly once and marked done under the new owner."""
    d, sink = await start(write_config, start_daemon)
    env = make_envelope("in", Conversation("g9"), "held elsewhere")
    x = Delivery(f"d-held-{env.id}", "c", env)
    await d.redis.set(d.bus.keys.mark("c", x.id), "other-instance:abc", px=60_000)
    await d.redis.xadd(d.bus.keys.out("c"), {Field.DELIVERY: encode(x), Field.DELIVERY_ID: x.id})
    await wait_for(lambda: len(sink.sent) == 1)
    await wait_for(lambda: _drained(d))
    assert (await d.redis.get(d.bus.keys.mark("c", x.id))).startswith(b"done:")
    await asyncio.sleep(0.2)
    assert len(sink.sent) == 1
