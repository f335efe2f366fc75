"""What an operator sees: /metrics (prometheus-client), status snapshots, heartbeats, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from adapters.generic.http_sink import sign
from bridge.bus import Field, Keys
from bridge.daemon import Daemon, persistence_risk
from bridge.dead import DeadLetters
from bridge.envelope import Conversation, make_envelope
from bridge.errors import PermanentError, RetryableError
from bridge.lease import Lease
from bridge.status import Heartbeat, instances, leases, snapshot, table
from tests.conftest import CollectSink, wait_for

MANY_SINKS = """
[[inbound]]
name = "hook"
type = "webhook"
path = "/hook"
secret = "hook-secret-value"
[[outbound]]
name = "a"
type = "collect"
retry_base = 0.02
rate = "20/s"
[[outbound]]
name = "b"
type = "collect"
[[outbound]]
name = "idle"
type = "collect"
[[routes]]
from = "hook"
to = ["a", "b"]
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[list[str], Samples]:
    """Family names in order, and every sample by (name, sorted labels)."""
    names: list[str] = []
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        names.append(fam.name)
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return names, samples


async def scrape(d: Daemon) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def post(d: Daemon, body: bytes, *, signed: bool = True) -> int:
    ts = str(int(time.time()))
    headers = {"X-Bridge-Timestamp": ts, "X-Bridge-Signature": sign("hook-secret-value", ts, body)}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{d.port}/hook", data=body, headers=headers if signed else {}) as r,
    ):
        return r.status


async def test_metrics_count_every_stage_in_one_family_per_name(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(MANY_SINKS))
    a, b = CollectSink.instances["a"], CollectSink.instances["b"]
    a.script = [RetryableError("busy, try again")]
    b.script = [PermanentError("no such chat")]
    assert await post(d, json.dumps({"conversation": "g1", "text": "one"}).encode()) == 200
    assert await post(d, b'{"conversation": "g1"}', signed=False) == 401
    assert await post(d, b"not json") == 400
    assert d.bus is not None
    for text in ("two", "three"):
        await d.bus.publish(make_envelope("hook", Conversation("g2"), text), dedupe_key="same")
    keys = d.bus.keys
    lease = Lease(d.redis, keys, "partition-0", "t1:life", ttl=5)
    assert await lease.acquire()
    await wait_for(lambda: len(a.sent) == 2 and len(b.sent) == 1)
    await wait_for(lambda: d.redis.xlen(keys.dead))

    # the router counts a batch's deliveries once Redis confirmed them: with its next read (≤ 1 s)
    await wait_for(lambda: d.router is not None and d.router.routed == 4, timeout=5)
    text = await scrape(d)
    names, got = parse(text)
    assert len(names) == len(set(names)), "a family appears more than once"
    prefix = "wechat_bridge_"

    def v(name: str, **labels: str) -> float:
        return got.get((prefix + name, tuple(sorted(labels.items()))), -1.0)

    assert v("received_total", adapter="hook") == 3
    assert v("refused_total", event="webhook.refused", source="hook", reason="missing signature") == 1
    assert v("published_total", adapter="hook") == 2
    assert v("deduplicated_total", adapter="hook") == 1
    assert v("routed_total", sink="a") == 2 and v("routed_total", sink="b") == 2
    assert v("delivered_total", sink="a") == 2 and v("delivered_total", sink="b") == 1
    assert v("retried_total", sink="a") == 1 and v("retried_total", sink="b") == -1
    assert v("dead_lettered_total", adapter="b") == 1
    assert v("send_seconds_count", sink="a") == 2 and v("send_seconds_bucket", sink="a", le="+Inf") == 2
    assert v("end_to_end_seconds_count", sink="b") == 1
    assert v("end_to_end_seconds_sum", sink="b") > 0
    assert v("stream_length", stream="dead") == 1 and v("dead_letters") == 1
    out_a = [n for (name, labels), n in got.items() if name == prefix + "stream_length"
             and dict(labels)["stream"].split(":p")[0] == "out:a"]  # fmt: skip
    assert len(out_a) == 4 and sum(out_a) == 2 and v("stream_length", stream="out:idle") == 0
    pending_a = [n for (name, labels), n in got.items() if name == prefix + "stream_pending"
                 and dict(labels)["stream"].split(":p")[0] == "out:a"]  # fmt: skip
    assert pending_a and sum(pending_a) == 0
    assert v("stream_lag", stream="inbound", group="router") == 0
    assert v("instances_live") == 1 and v("redis_up") == 1
    assert v("lease_held", lease="partition-0") == 1 and v("lease_has_holder", lease="partition-0") == 1
    # one family per name, one series per sink: the runner's families carry every sink that counted
    assert text.count("# TYPE wechat_bridge_delivered_total counter") == 1

    await lease.release()
    _, got = parse(await scrape(d))
    assert got[(prefix + "lease_held", (("lease", "partition-0"),))] == 0
    assert got[(prefix + "lease_has_holder", (("lease", "partition-0"),))] == 0


async def test_time_waiting_on_a_rate_is_counted(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(MANY_SINKS.replace('rate = "20/s"', 'rate = "4/s"')))
    assert d.bus is not None
    for n in range(3):
        await d.bus.publish(make_envelope("hook", Conversation(f"g{n}"), "x"))
    await wait_for(lambda: len(CollectSink.instances["a"].sent) == 3)
    _, got = parse(await scrape(d))
    waited = got[("wechat_bridge_rate_limit_wait_seconds_total", (("sink", "a"),))]
    assert 0.2 < waited < 2.0  # 3 sends at 4/s with a burst of 1: about 0.25 s + 0.25 s of waiting


async def test_metrics_say_redis_is_down_instead_of_failing(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(MANY_SINKS))
    good = d.redis
    d.redis = type(good).from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        _, got = parse(await scrape(d))
        assert got[("wechat_bridge_redis_up", ())] == 0
    finally:
        await d.redis.aclose()
        d.redis = good


async def test_heartbeats_list_live_instances_and_prune_the_dead(redis: Any, prefix: str) -> None:
    keys = Keys(prefix)
    one, two = Heartbeat(redis, keys, "one", ttl=0.5), Heartbeat(redis, keys, "two", ttl=30)
    await one.beat()
    await two.beat()
    assert [i.name for i in await instances(redis, keys)] == ["one", "two"]
    await asyncio.sleep(0.7)  # one's key expired: it is not live, and leaves the set
    assert [i.name for i in await instances(redis, keys)] == ["two"]
    assert await redis.smembers(keys.instances) == {b"two"}
    task = asyncio.create_task(two.run())
    await two.stop()  # a graceful stop leaves at once
    await task
    assert await instances(redis, keys) == []


async def test_status_shows_streams_leases_and_instances(redis: Any, prefix: str) -> None:
    keys = Keys(prefix)
    held = Lease(redis, keys, "router", "i1:abc", ttl=5)
    assert await held.acquire()
    await Heartbeat(redis, keys, "i1", leases=lambda: ["router"]).beat()  # it names its leases
    await redis.xadd(keys.out("s"), {"d": b"{}"})
    await redis.xgroup_create(keys.out("s"), "runner", id="0")
    await redis.xreadgroup("runner", "i1", {keys.out("s"): ">"})
    snap = await snapshot(redis, keys, ["s"], known_leases=["partition-7"])
    rows = {s.name: s for s in snap.streams}
    assert rows["out:s"].length == 1 and rows["inbound"].length == 0 and rows["dead"].length == 0
    [g] = rows["out:s"].groups
    assert (g.name, g.pending, g.lag, [c.name for c in g.consumers]) == ("runner", 1, 0, ["i1"])
    by_name = {le.name: le for le in snap.leases}
    assert by_name["router"].owner == "i1:abc" and by_name["router"].fence == held.fence
    assert by_name["partition-7"].owner is None  # known, held by nobody
    shown = table(snap)
    assert "out:s" in shown and "i1(1)" in shown and "NONE" in shown and "router" in shown
    assert json.loads(json.dumps(snap.to_json()))["leases"][0]["name"] == "partition-7"
    assert [le.name for le in await leases(redis, keys)] == []  # no names, no scan: none
    assert [le.name for le in await leases(redis, keys, scan=True)] == ["router"]
    assert snap.instances[0].leases == ["router"]


async def _dead_letters(d: Daemon, texts: list[str]) -> list[str]:
    sink = CollectSink.instances["c"]
    sink.script = [PermanentError(f"gone {t}") for t in texts]
    assert d.bus is not None
    for t in texts:
        await d.bus.publish(make_envelope("in", Conversation("g1"), t))
    keys = d.bus.keys
    dead = DeadLetters(d.redis, keys)

    async def all_dead() -> bool:  # and their markers say so (the runner writes them just after)
        letters = await dead.oldest()
        marks = [await d.redis.get(keys.mark("c", x.delivery.id)) for x in letters if x.delivery]
        return len(marks) >= len(texts) and all(m == b"done:dead" for m in marks)

    await wait_for(all_dead)
    return [dl.id for dl in await dead.oldest()]


ONE_SINK = (
    '[[inbound]]\nname = "in"\ntype = "manual"\n[[outbound]]\nname = "c"\ntype = "collect"\n'
    '[[routes]]\nfrom = "in"\nto = "c"\n'
)


async def test_replay_keeps_conversation_order_whatever_order_the_ids_come_in(
    write_config: Any, start_daemon: Any
) -> None:
    d: Daemon = await start_daemon(write_config(ONE_SINK))
    ids = await _dead_letters(d, ["m1", "m2", "m3"])
    assert d.bus is not None
    dead = DeadLetters(d.redis, d.bus.keys)
    letters = await dead.get(list(reversed(ids)))
    assert [dl.id for dl in letters] == ids
    assert [dl.reason for dl in letters] == ["permanent: gone m1", "permanent: gone m2", "permanent: gone m3"]
    res = await dead.replay(letters, {"c"})
    assert res.replayed == ids and res.skipped == {}
    sink = CollectSink.instances["c"]
    await wait_for(lambda: len(sink.sent) == 3)
    assert [x.envelope.text for x in sink.sent] == ["m1", "m2", "m3"]
    assert await dead.count() == 0


async def test_replay_goes_through_the_idempotency_marker(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(ONE_SINK))
    ids = await _dead_letters(d, ["sent-elsewhere", "twice"])
    assert d.bus is not None
    dead = DeadLetters(d.redis, d.bus.keys)
    first, second = await dead.get(ids)
    assert first.delivery is not None and second.delivery is not None
    # the first was sent after all (its marker says so): replay must not send it again
    await d.redis.set(d.bus.keys.mark("c", first.delivery.id), "done:remote-7")
    # the second is dead-lettered twice (two copies): replaying both sends it once
    copy = await d.redis.xadd(d.bus.keys.dead, {Field.DELIVERY: second.raw, Field.REASON: "copy"})
    res = await dead.replay([*await dead.get(ids), *await dead.get([copy.decode()])], {"c", "other"})
    assert res.replayed == [second.id]
    assert res.skipped == {
        first.id: "already sent (its marker says done): not sent again",
        copy.decode(): f"the same delivery as {second.id}: replayed once",
    }
    sink = CollectSink.instances["c"]
    await wait_for(lambda: len(sink.sent) == 1)
    await asyncio.sleep(0.3)
    assert [x.envelope.text for x in sink.sent] == ["twice"]
    assert await dead.count() == 0
    # replayed again later (a copy written back by hand): the marker says sent, nothing goes out
    await d.redis.xadd(d.bus.keys.dead, {Field.DELIVERY: second.raw, Field.REASON: "again"})
    res = await dead.replay(await dead.oldest(), {"c"})
    assert list(res.skipped.values()) == ["already sent (its marker says done): not sent again"]
    await asyncio.sleep(0.3)
    assert len(sink.sent) == 1


async def test_replay_skips_what_is_not_a_delivery_and_purge_deletes(
    write_config: Any, start_daemon: Any
) -> None:
    d: Daemon = await start_daemon(write_config(ONE_SINK))
    assert d.bus is not None
    await d.bus.dead_letter(
        b"\xff not json", reason="undecodable", origin="inbound", attempts=0, instance="t1"
    )
    ids = await _dead_letters(d, ["x"])
    dead = DeadLetters(d.redis, d.bus.keys)
    res = await dead.replay(await dead.oldest(), set())
    assert set(res.skipped) == set(ids) and res.replayed == []
    assert "not a delivery" in res.skipped[ids[0]] and "no outbound named 'c'" in res.skipped[ids[1]]
    assert await dead.count() == 2  # skipped letters stay
    assert await dead.purge([ids[0]]) == 1 and await dead.count() == 1
    assert await dead.purge() == 1 and await dead.count() == 0


def test_the_persistence_warning_says_what_can_be_lost() -> None:
    assert persistence_risk({"appendonly": "yes", "appendfsync": "always", "save": ""}) is None
    event, hint = persistence_risk({"appendonly": "yes", "appendfsync": "everysec", "save": ""}) or ("", "")
    assert event == "redis.fsync_everysec" and "~1 s" in hint and "process alone loses nothing" in hint
    event, hint = persistence_risk({"appendonly": "yes", "appendfsync": "no", "save": ""}) or ("", "")
    assert event == "redis.fsync_os" and "30 s" in hint
    event, hint = persistence_risk({"appendonly": "no", "save": "3600 1 300 100"}) or ("", "")
    assert event == "redis.snapshot_only" and "since the last snapshot" in hint
    event, _ = persistence_risk({"appendonly": "no", "save": ""}) or ("", "")
    assert event == "redis.no_persistence"
