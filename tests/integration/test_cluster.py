"""The bus unchanged on a 3-master Redis Cluster (``redis+cluster://``) and on Sentinel
(``redis+sentinel://``): publish → route → deliver with dedupe, markers, rate keys, leases, status
and dead-letter replay; every script's keys on one slot (a cross-slot script fails on a cluster)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

import bridge.lua
from bridge.bus import Bus, Field, Keys, connect, is_cluster
from bridge.config import Rate
from bridge.daemon import Daemon
from bridge.dead import DeadLetters
from bridge.envelope import Conversation, decode_envelope, make_envelope
from bridge.errors import BusUnavailable, PermanentError
from bridge.lease import Lease
from bridge.pairing import AccessKeys
from bridge.ratelimit import Limit, Limiter
from bridge.status import snapshot
from tests import redis_cluster
from tests.conftest import CollectSink, wait_for


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster.cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


BODY = """
[redis]
url = "{url}"
prefix = "{prefix}"
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "a"
type = "collect"
rate = "200/s"
[[outbound]]
name = "b"
type = "collect"
[[routes]]
from = "in"
to = ["a", "b"]
"""


async def _run_the_bus(d: Daemon, prefix: str) -> None:
    """Publish → route → deliver over many conversations, with dedupe, a dead letter and its replay,
    a lease, status and metrics: the same assertions whatever Redis topology is under ``d``."""
    assert d.bus is not None
    a, b = CollectSink.instances["a"], CollectSink.instances["b"]
    b.script = [PermanentError("gone")]
    convs = [f"c{n}" for n in range(6)]
    for i in range(5):
        for c in convs:
            await d.bus.publish(make_envelope("in", Conversation(c), f"{c}-{i}"), dedupe_key=f"{c}-{i}")
    assert not await d.bus.publish(make_envelope("in", Conversation("c0"), "again"), dedupe_key="c0-0")
    await wait_for(lambda: len(a.sent) == 30 and len(b.sent) == 29, timeout=30)
    for sink in (a, b):
        for c in convs:  # in order per conversation
            texts = [x.envelope.text for x in sink.sent if x.envelope.conversation.id == c]
            assert texts == sorted(texts) and len(texts) >= 4
    keys = Keys(prefix)
    # markers live beside their stream (one slot), on whichever master holds it; sink a's sends went
    # through claim_send.lua with its rate keys (their state expires within a few ms at 200/s)
    assert (await d.redis.get(keys.mark("a", a.sent[0].id))).startswith(b"done:")

    dead = DeadLetters(d.redis, keys)

    async def one_dead() -> bool:
        letters = await dead.oldest()
        if len(letters) != 1 or letters[0].delivery is None:
            return False
        return bool(await d.redis.get(keys.mark("b", letters[0].delivery.id)) == b"done:dead")

    await wait_for(one_dead)
    res = await dead.replay(await dead.oldest(), {"a", "b"})
    assert len(res.replayed) == 1 and not res.skipped
    await wait_for(lambda: len(b.sent) == 30)

    lease = Lease(d.redis, keys, "partition-3", "t1:x", ttl=2)
    assert await lease.acquire() and await lease.renew()
    assert await lease.guarded_set(keys.lease("partition-3") + ":state", "v")
    partitions = {o.name: o.partitions for o in d.config.outbound}
    snap = await snapshot(d.redis, keys, ["a", "b"], scan=True, partitions=partitions)  # SCANs every master
    owners = {le.name: le.owner for le in snap.leases}
    assert owners["partition-3"] == "t1:x" and owners["router"]  # and the daemon's own leases
    assert [i.name for i in snap.instances] == ["t1"]
    streams = {s.name: s for s in snap.streams}
    assert sum(s.length for name, s in streams.items() if name.split(":p")[0] == "out:a") == 30
    assert streams["dead"].length == 0
    assert await lease.release()
    text = (await d.exposition()).decode()
    assert "wechat_bridge_redis_up 1.0" in text
    assert 'wechat_bridge_delivered_total{sink="a"} 30.0' in text


async def test_the_bus_runs_unchanged_on_a_redis_cluster(
    cluster_ports: list[int], write_config: Any, start_daemon: Any, prefix: str
) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster_ports[0]}"
    d: Daemon = await start_daemon(write_config(BODY.format(url=url, prefix=prefix), redis=False))
    assert is_cluster(d.redis)
    try:
        await _run_the_bus(d, prefix)
        # the keys really are spread over the masters (else this test would prove little)
        keys = Keys(prefix)
        slots = {
            await d.redis.cluster_keyslot(k) for k in (keys.inbound, keys.out("a"), keys.out("b"), keys.dead)
        }
        nodes = {d.redis.nodes_manager.get_node_from_slot(s).name for s in slots}
        assert len(nodes) >= 2, nodes
    finally:
        await d.stop()  # before the keys go (a blocked read on a deleted stream is an error)
        r = connect(url)
        async for k in r.scan_iter(match=f"{prefix}:*"):
            await r.delete(k)
        await r.aclose()


async def test_the_rate_script_alone_runs_on_a_cluster(cluster_ports: list[int], prefix: str) -> None:
    r = connect(f"redis+cluster://127.0.0.1:{cluster_ports[1]}")
    keys = Keys(prefix)
    try:
        limits = [
            Limit(keys.rate("s", 0), Rate(1, 1.0), 1),
            Limit(keys.rate("s", 0, "user-1"), Rate(1, 1.0), 1),
        ]
        assert await Limiter(r).acquire(limits) <= 0
        assert await Limiter(r).acquire(limits) > 0
        # a script given keys of two slots is refused by the cluster: what the hash tags prevent
        bad = [Limit(keys.rate("s", 0), Rate(1, 1.0), 1), Limit(keys.rate("other", 0), Rate(1, 1.0), 1)]
        with pytest.raises(Exception, match=r"(?i)slot"):
            await Limiter(r).acquire(bad)
    finally:
        for k in (keys.rate("s", 0), keys.rate("s", 0, "user-1")):
            await r.delete(k)
        await r.aclose()


def test_every_script_is_given_keys_of_one_slot() -> None:
    """Every ``bridge/lua/`` script, with the keys its callers build (``Keys``), touches one slot;
    claim_read.lua builds its markers from a prefix, which must hash with its stream too. A script
    missing here fails the test: add it with its callers' keys."""
    k = Keys("wb")
    ak = AccessKeys("wb")
    lease = k.lease("partition-1")
    calls = {
        "publish_many": [k.inbound, k.seen("wecom", "m1"), k.seen("hook", "m2")],
        "add_deliveries": [k.out("a")],
        "claim_read": [k.out("a"), k.mark("a", "d1")],  # the stream, and a marker from its prefix
        "sync": [k.partition("a", 1), k.mark("a", "d1"), k.mark("a", "d2")],
        "claim_send": [k.mark("a", "d1"), k.rate("a", 0), k.rate("a", 1, "user-1")],
        "gcra_acquire": [k.rate("a", 0), k.rate("a", 0, "user-1")],
        "lease_acquire": [lease, f"{lease}:fence"],
        "lease_renew": [lease],
        "lease_release": [lease],
        "lease_guarded_set": [lease, f"{lease}:state"],  # a guarded key carries its lease's tag
        "replay": [k.partition("a", 2), k.mark("a", "d1")],  # a conversation's partition, its marker
        "take_over": [k.partition("a", 3)],
        "drop_consumers": [k.inbound],
        "pairing_issue": [ak.pending("in"), ak.code("ABCDEFGH"), ak.paired("in")],  # bridge/pairing.py
        "heartbeats (MGET)": [k.instances, k.instance("i1"), k.instance("i2")],
        # bridge.held: one hash tag per held connection (its base key, as HeldConnection builds it)
        "held_request": ["wb:{held:bot}:req", "wb:{held:bot}:done:r1"],
        "held_finish": ["wb:{held:bot}:done:r1", "wb:{held:bot}:ans:r1"],
        # adapters/wechat/lua/: the access-token cache (adapters.wechat.tokens: key, key + ":lock")
        "token_store (adapters)": [k.state("wecom", "token"), k.state("wecom", "token") + ":lock"],
        "token_drop (adapters)": [k.state("wecom", "token")],
        "lock_release (adapters)": [k.state("wecom", "token") + ":lock"],
    }
    fragments = {"claim", "gcra", "lease_check"}
    lua = Path(bridge.lua.__file__).parent
    assert {f.stem for f in lua.glob("*.lua")} - fragments == {c for c in calls if "(" not in c}
    for name, keys in calls.items():
        assert len({key_slot(key.encode()) for key in keys}) == 1, f"{name}: {keys} span several slots"
    assert key_slot(k.out("a").encode()) != key_slot(k.out("b").encode())  # the check can tell


@pytest.fixture(scope="module")
def sentinel_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int]]:
    with redis_cluster.sentinel(tmp_path_factory.mktemp("sentinel")) as ports:
        yield ports


async def test_the_bus_runs_on_sentinel_by_url(
    sentinel_ports: tuple[int, int, int], write_config: Any, start_daemon: Any, prefix: str
) -> None:
    master, _replica, sent = sentinel_ports
    url = f"redis+sentinel://127.0.0.1:{sent}/main"
    d: Daemon = await start_daemon(write_config(BODY.format(url=url, prefix=prefix), redis=False))
    assert (await d.redis.connection_pool.get_master_address())[1] == master
    await _run_the_bus(d, prefix)


async def test_wait_replicas_confirms_a_publish_or_refuses_it(
    sentinel_ports: tuple[int, int, int], prefix: str
) -> None:
    _master, replica, sent = sentinel_ports
    r = connect(f"redis+sentinel://127.0.0.1:{sent}/main")
    on_replica = connect(f"redis://127.0.0.1:{replica}")
    keys = Keys(prefix)
    bus = Bus(r, keys)
    try:
        bus.wait = (1, 2000)
        assert await bus.publish(make_envelope("in", Conversation("c"), "kept"), dedupe_key="k1")
        assert await on_replica.xlen(keys.inbound) == 1  # confirmed: already on the replica
        bus.wait = (2, 100)  # one replica exists: two cannot confirm
        with pytest.raises(BusUnavailable, match="1 of 2 replicas"):
            await bus.publish(make_envelope("in", Conversation("c"), "unconfirmed"), dedupe_key="k2")
    finally:
        await r.delete(keys.inbound, keys.seen("in", "k1"), keys.seen("in", "k2"))
        await r.aclose()
        await on_replica.aclose()


def test_wait_replicas_is_refused_on_a_cluster(tmp_path: Path) -> None:
    from bridge.config import load
    from bridge.errors import ConfigError

    p = tmp_path / "bridge.toml"
    p.write_text('[redis]\nurl = "redis+cluster://127.0.0.1:7000"\nwait_replicas = 1\n')
    with pytest.raises(ConfigError, match=r"redis\.wait_replicas: not supported on a Redis Cluster"):
        load(p, env={})
    p.write_text('[redis]\nurl = "redis+sentinel://127.0.0.1:26379/main"\nwait_replicas = 1\n')
    assert load(p, env={}).redis.wait_replicas == 1


async def test_a_failover_loses_nothing_wait_confirmed(tmp_path: Path, prefix: str) -> None:
    """While the replica lags, publishes are refused (WAIT 1 times out: 503 to the platform) instead
    of confirmed; then kill -9 the master: Sentinel promotes the replica, every envelope the bus
    confirmed is on it, and the client follows the fail-over by itself."""
    with redis_cluster.sentinel(tmp_path) as (master, replica, sent):
        r = connect(f"redis+sentinel://127.0.0.1:{sent}/main", 1.0)
        keys = Keys(prefix)
        bus = Bus(r, keys)
        bus.wait = (1, 2000)
        try:
            confirmed = []
            for i in range(300):
                env = make_envelope("in", Conversation(f"c{i % 7}"), f"m{i}")
                assert await bus.publish(env, dedupe_key=f"m{i}")
                confirmed.append(env.id)
            # the replica stalls (as a slow network would): what is published now is not confirmed
            stall = asyncio.create_task(asyncio.to_thread(redis_cluster.cli, replica, "debug", "sleep", "3"))
            await asyncio.sleep(0.2)
            bus.wait = (1, 300)
            for i in range(3):
                with pytest.raises(BusUnavailable, match="0 of 1 replicas"):
                    await bus.publish(
                        make_envelope("in", Conversation("c0"), f"late{i}"), dedupe_key=f"late{i}"
                    )
            await stall  # a replica that answers again: Sentinel only promotes a healthy one

            async def healthy() -> bool:
                link = await asyncio.to_thread(redis_cluster.cli, replica, "info", "replication")
                seen = await asyncio.to_thread(redis_cluster.cli, sent, "sentinel", "replicas", "main")
                return (
                    "master_link_status:up" in link
                    and str(replica) in seen  # the Sentinel knows the replica it is to promote
                    and "s_down" not in seen
                    and "disconnected" not in seen
                )

            await wait_for(healthy, timeout=30, every=0.2)
            info = await asyncio.to_thread(redis_cluster.cli, master, "info", "server")
            pid = int(re.findall(r"process_id:(\d+)", info)[0])
            os.kill(pid, signal.SIGKILL)

            async def promoted() -> bool:
                try:
                    _, port = await r.connection_pool.get_master_address()
                except Exception:
                    return False
                return int(port) == replica

            await wait_for(promoted, timeout=60, every=0.2)
            on_new_master = connect(f"redis://127.0.0.1:{replica}")
            try:
                stored = [
                    decode_envelope(f[Field.ENVELOPE.key]).id
                    for _, f in await on_new_master.xrange(keys.inbound)
                ]
            finally:
                await on_new_master.aclose()
            # every confirmed envelope, in order. The three unconfirmed ones may or may not have
            # reached the replica (here they did, once it woke): their callbacks got 503, the
            # platform retries, and the dedupe marker absorbs a copy that did arrive
            assert stored[: len(confirmed)] == confirmed and len(stored) <= len(confirmed) + 3

            async def publishes_again() -> bool:  # the same client, on the new master
                try:
                    return bool(
                        await bus.publish(
                            make_envelope("in", Conversation("c0"), "after"), dedupe_key="after"
                        )
                    )
                except BusUnavailable:
                    return False

            bus.wait = None  # the new master has no replica left
            await wait_for(publishes_again, timeout=20, every=0.2)
        finally:
            await r.aclose()
