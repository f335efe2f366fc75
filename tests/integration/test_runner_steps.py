"""The runner's parts on their own, against real Redis: AckBatch, ReadClaim, and a runner driven
without a daemon (``run_until_idle``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge import logging as blog
from bridge.adapter import Context, NoOptions, SendContext
from bridge.bus import RUNNER_GROUP, UNAVAILABLE, Bus, Field, Keys, connect
from bridge.config import Config
from bridge.envelope import Conversation, Delivery, make_envelope
from bridge.errors import RetryableError
from bridge.runner import AckBatch, ReadClaim, Runner
from bridge.scripts import Ack, Claim, ClaimStatus, Owner, Scripts
from tests.conftest import CollectSink

ME = Owner("t1", "t1:life")
LOG = blog.get("test")

SINK = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "c"
type = "collect"
retry_base = 0.02
retry_max = 0.05
[[routes]]
from = "in"
to = "c"
"""


def delivery(n: int, conv: str) -> Delivery:
    env = make_envelope("in", Conversation(conv, "group"), f"m{n}")
    return Delivery(f"d{n}-{env.id}", "c", env)


async def stream_with(redis: Any, prefix: str, n: int) -> tuple[Bus, str, list[str]]:
    bus = Bus(redis, Keys(prefix))
    stream = bus.keys.out("c")
    await bus.ensure_group(stream, RUNNER_GROUP)
    await bus.add_deliveries([delivery(i, "g") for i in range(n)])
    ids = [eid.decode() for eid, _ in await redis.xrange(stream)]
    return bus, stream, ids


# -- AckBatch ----------------------------------------------------------------------------------------


async def test_ack_batch_writes_done_markers_and_acks_in_one_call(redis: Any, prefix: str) -> None:
    bus, stream, ids = await stream_with(redis, prefix, 3)
    await redis.xreadgroup(RUNNER_GROUP, "t1", {stream: ">"})
    acks = AckBatch(bus.scripts, stream, ME, 5000, LOG)
    mark = bus.keys.mark("c", "x")
    acks.add(Ack(ids[0], mark, "done:r0"))
    acks.add(Ack(ids[1]))
    assert len(acks) == 2
    claims = await acks.sync([bus.keys.mark("c", "y")])
    assert claims == [Claim(ClaimStatus.OK)] and len(acks) == 0
    assert await redis.get(mark) == b"done:r0"
    assert (await redis.xpending(stream, RUNNER_GROUP))["pending"] == 1
    await acks.flush()  # nothing left: no call


async def test_ack_batch_keeps_what_it_could_not_write_first_in_line(redis: Any, prefix: str) -> None:
    bus, stream, ids = await stream_with(redis, prefix, 3)
    await redis.xreadgroup(RUNNER_GROUP, "t1", {stream: ">"})
    down = connect("redis://127.0.0.1:1/0", socket_timeout=0.2)  # nothing listens there
    acks = AckBatch(Scripts(down), stream, ME, 5000, LOG)
    acks.add(Ack(ids[0]))
    with pytest.raises(UNAVAILABLE):
        await acks.sync()
    acks.add(Ack(ids[1]))
    assert [a.entry for a in acks.take()] == ids[:2]
    acks.put_back([Ack(ids[0]), Ack(ids[1])])
    acks.add(Ack(ids[2]))
    ok = AckBatch(bus.scripts, stream, ME, 5000, LOG)
    ok.put_back(acks.take())
    await ok.flush()
    assert (await redis.xpending(stream, RUNNER_GROUP))["pending"] == 0
    await down.aclose()


async def test_ack_batch_run_writes_acks_after_its_linger(redis: Any, prefix: str) -> None:
    bus, stream, ids = await stream_with(redis, prefix, 2)
    await redis.xreadgroup(RUNNER_GROUP, "t1", {stream: ">"})
    acks = AckBatch(bus.scripts, stream, ME, 5000, LOG, linger=0.05)
    task = asyncio.create_task(acks.run())
    try:
        acks.add(Ack(ids[0]))
        acks.add(Ack(ids[1]))
        await asyncio.sleep(0.02)
        assert (await redis.xpending(stream, RUNNER_GROUP))["pending"] == 2  # lingering
        await asyncio.sleep(0.1)
        assert (await redis.xpending(stream, RUNNER_GROUP))["pending"] == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- ReadClaim ---------------------------------------------------------------------------------------


async def test_read_claim_reads_claims_and_carries_the_acks_in_one_round_trip(
    redis: Any, prefix: str
) -> None:
    bus, stream, ids = await stream_with(redis, prefix, 4)
    acks = AckBatch(bus.scripts, stream, ME, 5000, LOG)
    read = ReadClaim(bus, stream, "t1", ME, acks, claim_ttl_ms=5000, marker_prefix=bus.keys.mark("c", ""))
    got = await read(2, asyncio.Event())
    assert got is not None
    entries, claims = got
    assert [e for e, _ in entries] == ids[:2] and read.last_read == ids[1]
    assert claims == {ids[0]: Claim(ClaimStatus.OK), ids[1]: Claim(ClaimStatus.OK)}
    first = entries[0][1][Field.DELIVERY_ID.key].decode()
    assert await redis.get(bus.keys.mark("c", first)) == ME.id.encode()
    acks.add(Ack(ids[0]))
    got = await read(10, asyncio.Event())
    assert got is not None and [e for e, _ in got[0]] == ids[2:]
    assert set(got[1]) == set(ids[2:])  # only what this read gave is claimed
    assert len(acks) == 0
    pending = await redis.xpending_range(stream, RUNNER_GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == ids[1:]  # ids[0] acked by that read


async def test_a_read_claim_abandoned_on_stop_puts_the_acks_back(redis: Any, prefix: str) -> None:
    bus, stream, ids = await stream_with(redis, prefix, 1)
    await redis.xreadgroup(RUNNER_GROUP, "t1", {stream: ">"})
    acks = AckBatch(bus.scripts, stream, ME, 5000, LOG)
    read = ReadClaim(bus, stream, "t1", ME, acks, claim_ttl_ms=5000, marker_prefix=bus.keys.mark("c", ""))
    acks.add(Ack(ids[0]))
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    assert await read(10, stop) is None  # the read blocked (nothing new) until the stop
    assert [a.entry for a in acks.take()] == ids


# -- a runner without a daemon ---------------------------------------------------------------------


async def test_a_runner_built_alone_runs_until_idle(
    redis: Any, prefix: str, write_config: Any, tmp_path: Path
) -> None:
    cfg: Config = write_config(SINK)
    bus = Bus(redis, Keys(prefix))
    async with aiohttp.ClientSession() as http:
        ctx = Context(cfg, bus, redis, "t1", tmp_path, lambda: http)
        sink = CollectSink("c", NoOptions(), ctx)
        sink.script = [RetryableError("once")]
        runner = Runner(sink, cfg.outbound[0], bus, "t1")
        ds = [delivery(0, "a"), delivery(1, "b"), delivery(2, "a"), delivery(3, "a")]
        await bus.add_deliveries(ds)
        await asyncio.wait_for(runner.run_until_idle(), 10)
    assert [d.id for d in sink.sent if d.envelope.conversation.id == "a"] == [ds[0].id, ds[2].id, ds[3].id]
    assert len(sink.sent) == 4 and runner.sent == 4
    assert (await redis.xpending(bus.keys.out("c"), RUNNER_GROUP))["pending"] == 0
    for d in ds:
        assert (await redis.get(bus.keys.mark("c", d.id))).startswith(b"done:c")
    # again: nothing new, and what was sent is not sent twice
    await bus.add_deliveries(ds[:1])
    runner = Runner(sink, cfg.outbound[0], bus, "t1")
    await asyncio.wait_for(runner.run_until_idle(), 10)
    assert len(sink.sent) == 4 and runner.sent == 0


async def test_charge_part_uses_the_runners_limits_and_yields_to_the_runner_past_the_deadline(
    redis: Any, prefix: str, write_config: Any, tmp_path: Path
) -> None:
    """A sink's further parts are charged to the very keys and rates the runner's claim charges."""
    cfg: Config = write_config(SINK.replace("retry_max = 0.05\n", 'retry_max = 0.05\nrate = "1/minute"\n'))
    bus = Bus(redis, Keys(prefix))
    async with aiohttp.ClientSession() as http:
        sink = CollectSink("c", NoOptions(), Context(cfg, bus, redis, "t1", tmp_path, lambda: http))
        runner = Runner(sink, cfg.outbound[0], bus, "t1")
    d = delivery(0, "a")
    [limit] = runner.limits(d)
    assert limit.key == bus.keys.rate("c", 0) and limit.rate == runner.rates[0]
    ctx = SendContext(d, runner, budget=5.0)
    await ctx.charge_part("part 1")
    assert await redis.get(limit.key) is not None  # charged
    with pytest.raises(RetryableError, match="part 2; waiting for quota") as e:
        await ctx.charge_part("part 2")  # the next token is a minute away: past the budget
    assert e.value.retry_after is not None and 59 < e.value.retry_after <= 60
    with pytest.raises(RetryableError, match="ran long"):
        await runner.charge_part(d, time.monotonic() - 1, "part 2")
