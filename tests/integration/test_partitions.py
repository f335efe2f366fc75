"""Order across instances (bridge/partitions.py) and crash recovery (bridge/recovery.py), against the
real Redis: take-over of another consumer's pending entries, poison entries to the dead letters,
stale consumers dropped; two daemons sharing a sink's partitions, one conversation on one instance,
a stopped instance's share taken over in order; the supervisor's back-off."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from bridge.bus import RUNNER_GROUP, Bus, Field, Keys, partition_of
from bridge.daemon import Supervisor
from bridge.envelope import Conversation, make_envelope
from bridge.recovery import Recovery
from tests.conftest import wait_for

ROUTE = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "c"
type = "collect"
[[routes]]
from = "in"
to = "c"
"""


async def test_take_over_claims_what_others_left_and_dead_letters_poison(redis: Any, prefix: str) -> None:
    bus = Bus(redis, Keys(prefix))
    stream = bus.keys.out("c")
    await bus.ensure_group(stream, RUNNER_GROUP)
    ids = [await redis.xadd(stream, {Field.DELIVERY: f"d{i}".encode()}) for i in range(3)]
    await redis.xreadgroup(RUNNER_GROUP, "old", {stream: ">"}, count=3)
    for _ in range(3):  # the first entry crashed its readers again and again
        await redis.xreadgroup(RUNNER_GROUP, "old", {stream: "0"}, count=1)
    rec = Recovery(bus, stream, RUNNER_GROUP, "new", max_deliveries=4, origin="out:c")
    took = await rec.take_over()
    assert (took.claimed, took.dead) == (2, 1)
    pending = await redis.xpending_range(stream, RUNNER_GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], b"new"), (ids[2], b"new")]
    [(_, dead)] = await redis.xrange(bus.keys.dead)
    assert dead[Field.DELIVERY.key] == b"d0" and dead[Field.FROM.key] == b"out:c"
    assert dead[Field.REASON.key].startswith(b"handed out 4 times")
    assert await rec.drop_consumers(0) == ["old"]  # nothing pending on it any more
    assert [c["name"] for c in await redis.xinfo_consumers(stream, RUNNER_GROUP)] == [b"new"]
    assert (await rec.take_over()) == type(took)(0, 0)  # nothing left to take


async def test_a_consumer_with_pending_entries_is_never_dropped(redis: Any, prefix: str) -> None:
    bus = Bus(redis, Keys(prefix))
    stream = bus.keys.inbound
    await bus.ensure_group(stream, "router")
    await redis.xadd(stream, {Field.ENVELOPE: b"{}"})
    await redis.xreadgroup("router", "busy", {stream: ">"}, count=1)
    rec = Recovery(bus, stream, "router", "me", max_deliveries=10, origin="inbound")
    assert await rec.drop_consumers(0) == []


def _second(write_config: Any, instance: str, ttl: float = 1.5) -> Any:
    cfg = write_config(ROUTE, name=f"{instance}.toml")
    cfg.bridge.instance = instance
    cfg.bridge.lease_ttl = ttl
    return cfg


async def test_two_daemons_share_partitions_and_keep_each_conversation_in_order(
    write_config: Any, start_daemon: Any
) -> None:
    a = await start_daemon(_second(write_config, "a"))
    b = await start_daemon(_second(write_config, "b"))
    pa, pb = a.runners["c"].partitions, b.runners["c"].partitions
    await wait_for(lambda: len(pa.owned) == 2 and len(pb.owned) == 2, timeout=15)
    assert set(pa.owned) | set(pb.owned) == {0, 1, 2, 3}
    convs = [f"g{i}" for i in range(12)]
    for seq in range(5):
        for c in convs:
            await a.bus.publish(make_envelope("in", Conversation(c), f"{c}:{seq}"))
    sa, sb = a.sinks["c"], b.sinks["c"]
    await wait_for(lambda: len(sa.sent) + len(sb.sent) == 60, timeout=15)
    for c in convs:
        on_a = [x.envelope.text for x in sa.sent if x.envelope.conversation.id == c]
        on_b = [x.envelope.text for x in sb.sent if x.envelope.conversation.id == c]
        assert not (on_a and on_b), f"{c} was sent by both instances"
        assert (on_a or on_b) == [f"{c}:{s}" for s in range(5)]
        owner = pa if on_a else pb
        assert partition_of(c, 4) in owner.owned
    assert sa.sent and sb.sent  # both did work

    # a stops (drains, releases): b takes its share over and goes on in order
    await a.stop()
    await wait_for(lambda: len(pb.owned) == 4, timeout=15)
    for c in convs:
        await b.bus.publish(make_envelope("in", Conversation(c), f"{c}:5"))
    await wait_for(lambda: len(sa.sent) + len(sb.sent) == 72, timeout=15)
    for c in convs:
        texts = [x.envelope.text for x in [*sa.sent, *sb.sent] if x.envelope.conversation.id == c]
        assert texts == [f"{c}:{s}" for s in range(6)]


async def test_a_delivery_backing_off_holds_its_conversation_across_a_rebalance(
    write_config: Any, start_daemon: Any
) -> None:
    """A retry in progress when its partition moves: nothing later of its conversation overtakes it,
    on either instance."""
    from bridge.errors import RetryableError

    a = await start_daemon(_second(write_config, "a"))
    sa = a.sinks["c"]
    sa.script = [RetryableError("HTTP 503")] * 2
    await a.bus.publish(make_envelope("in", Conversation("g1"), "first"))
    await wait_for(lambda: len(sa.attempts) >= 1)
    await a.bus.publish(make_envelope("in", Conversation("g1"), "second"))
    b = await start_daemon(_second(write_config, "b"))  # the partitions move while "first" retries
    sb = b.sinks["c"]
    await wait_for(lambda: len(sa.sent) + len(sb.sent) >= 2, timeout=20)
    texts = [x.envelope.text for x in sorted([*sa.sent, *sb.sent], key=lambda x: x.created_at)]
    got = [x.envelope.text for x in sa.sent] + [x.envelope.text for x in sb.sent]
    assert texts == ["first", "second"]
    # each one once; where both went, "first" went before "second" on its instance
    assert sorted(got) == ["first", "second"]
    for s in (sa, sb):
        mine = [x.envelope.text for x in s.sent]
        assert mine in ([], ["first"], ["second"], ["first", "second"])


async def test_the_supervisor_retries_redis_within_a_second_and_resets_its_back_off(monkeypatch: Any) -> None:
    import bridge.daemon as daemon

    monkeypatch.setattr(daemon, "BACKOFF_RESET", 0.2)
    runs: list[str] = []

    async def flaky() -> None:
        runs.append("x")
        if len(runs) == 4:
            await asyncio.sleep(0.3)  # ran well for a while, then failed: a new failure
        if len(runs) < 6:
            raise ValueError("boom") if len(runs) in (2, 3) else ConnectionError("redis down")
        await asyncio.sleep(3600)

    sup = Supervisor()
    with structlog.testing.capture_logs() as logs:
        sup.spawn("t", flaky)
        await wait_for(lambda: len(runs) == 6, timeout=10)
        await sup.stop(1.0)
    waits = [
        (e["event"], e.get("retry_in", e.get("restart_in"))) for e in logs if e["event"].startswith("task.")
    ]
    assert waits == [
        ("task.redis_unavailable", 0.25),
        ("task.crashed", 0.5),
        ("task.crashed", 1.0),
        ("task.redis_unavailable", 0.25),  # reset: the 4th run lasted past BACKOFF_RESET
        ("task.redis_unavailable", 0.5),
    ]


async def test_a_sinks_rate_holds_over_two_instances_together(write_config: Any, start_daemon: Any) -> None:
    """Two instances, each sending its own partitions: their sends together never exceed the rate."""
    route = ROUTE.replace('type = "collect"\n', 'type = "collect"\nrate = "10/second"\n', 1)

    def cfg(name: str) -> Any:
        c = write_config(route, name=f"{name}.toml")
        c.bridge.instance = name
        c.bridge.lease_ttl = 1.5
        return c

    a = await start_daemon(cfg("a"))
    b = await start_daemon(cfg("b"))
    pa, pb = a.runners["c"].partitions, b.runners["c"].partitions
    await wait_for(lambda: len(pa.owned) == 2 and len(pb.owned) == 2, timeout=15)
    for i in range(30):
        await a.bus.publish(make_envelope("in", Conversation(f"g{i % 10}"), f"m{i}"))
    sa, sb = a.sinks["c"], b.sinks["c"]
    await wait_for(lambda: len(sa.sent) + len(sb.sent) == 30, timeout=20)
    assert sa.sent and sb.sent
    times = sorted(sa.attempts + sb.attempts)  # one event loop: one clock for both
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert worst <= 10 + 1, f"{worst} sends in one second over two instances (rate 10/second, burst 1)"


async def test_the_same_delivery_twice_back_to_back_is_sent_once(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str
) -> None:
    """A delivery routed again (a router take-over) lands right behind its original in the same
    partition: read in one batch, the second must not go out before the first's done marker is in
    Redis (the fault run found this: the last message of a conversation sent twice)."""
    from bridge.envelope import Delivery, encode

    env = make_envelope("in", Conversation("g1"), "once")
    x = Delivery(f"d-twice-{env.id}", "c", env, "g1")
    stream = Keys(prefix).partition("c", partition_of("g1", 4))
    for _ in range(2):  # both there before the runner's first read: one batch
        await redis.xadd(stream, {Field.DELIVERY: encode(x), Field.DELIVERY_ID: x.id})
    d = await start_daemon(_second(write_config, "a"))
    sink = d.sinks["c"]
    await wait_for(lambda: len(sink.sent) == 1)
    await wait_for(lambda: _none_pending(d))
    await asyncio.sleep(0.3)
    assert [s.id for s in sink.sent] == [x.id]


async def _none_pending(d: Any) -> bool:
    return bool(await d.bus.out_pending("c") == 0)
