"""Every Redis script of the bus, the runner and the rate limiter, called directly against real Redis.

One section per ``bridge/lua/*.lua`` file (the lease's scripts are tested in test_lease.py), through
its typed wrapper: edge cases included (duplicates in a batch, order, owner take-over, TTL expiry, a
rate key at its limit, stored GCRA state in the past and in the future).
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import pytest

from bridge import lua
from bridge.bus import RUNNER_GROUP, Field
from bridge.config import Rate
from bridge.ratelimit import Limit, Limiter
from bridge.scripts import Ack, Claim, ClaimStatus, Owner, Publish, Scripts

ME = Owner("inst", "inst:life1")


async def redis_ms(redis: Any) -> float:
    sec, usec = await redis.time()
    return float(sec * 1000 + usec / 1000)


# -- the files -------------------------------------------------------------------------------------


#: every package that keeps Redis scripts (the core's and the adapters')
LUA_PACKAGES = ("bridge.lua", "adapters.wechat.lua")


def lua_files() -> list[tuple[str, str]]:
    return [
        (pkg, p.name)
        for pkg in LUA_PACKAGES
        for p in sorted(resources.files(pkg).iterdir(), key=lambda p: p.name)
        if p.name.endswith(".lua")
    ]


@pytest.mark.parametrize(("package", "name"), lua_files())
def test_every_script_has_a_header_and_fragments_define_only_local_functions(package: str, name: str) -> None:
    text = resources.files(package).joinpath(name).read_text()
    head = text.split("\n", 1)[0]
    assert head.startswith((f"-- {name[:-4]}:", f"-- fragment {name[:-4]}:")), head
    if head.startswith("-- fragment"):
        code = [ln for ln in text.splitlines() if ln and not ln.startswith(" ") and not ln.startswith("--")]
        assert code and all(ln.startswith("local function ") or ln == "end" for ln in code), code
    else:
        assert "KEYS" in text and "Returns" in text.split("\n--!include")[0].split("\nlocal")[0]
    lua.source(name, package)  # includes resolve


def test_an_include_cycle_is_refused(tmp_path: Any, monkeypatch: Any) -> None:
    assert "local function claim" in lua.source("sync")
    assert "--!include" not in lua.source("claim_send")
    with pytest.raises(ValueError, match="include cycle"):
        lua._resolve("bridge.lua", "x.lua", ("x.lua",))


def test_the_field_names_the_scripts_write_are_the_named_ones() -> None:
    assert "'*', 'e', ARGV" in lua.source("publish_many") and Field.ENVELOPE.value == "e"
    assert "'d', ARGV[i + 1], 'i', ARGV[i]" in lua.source("add_deliveries")
    assert (Field.DELIVERY.value, Field.DELIVERY_ID.value) == ("d", "i")
    assert "if f[i] == 'i' then" in lua.source("claim_read")


# -- publish_many.lua -------------------------------------------------------------------------------


async def test_publish_many_keeps_order_and_drops_duplicates_even_within_a_batch(
    redis: Any, prefix: str
) -> None:
    s, stream = Scripts(redis), f"{prefix}:in"
    m1, m2 = f"{prefix}:seen:1", f"{prefix}:seen:2"
    flags = await s.publish_many(
        stream, 1000,
        [Publish(m1, b"one", 60), Publish(m2, b"two", 60), Publish(m1, b"one again", 60),
         Publish(stream, b"no dedupe", 0), Publish(stream, b"no dedupe", 0)],
    )  # fmt: skip
    assert flags == [True, True, False, True, True]
    entries = await redis.xrange(stream)
    assert [f[Field.ENVELOPE.key] for _, f in entries] == [b"one", b"two", b"no dedupe", b"no dedupe"]
    assert await redis.get(m1) == entries[0][0]  # the marker holds the stream id
    assert 55 <= await redis.ttl(m1) <= 60
    assert await s.publish_many(stream, 1000, [Publish(m2, b"two", 60)]) == [False]
    assert await redis.xlen(stream) == 4


async def test_publish_many_stores_again_after_the_marker_expired(redis: Any, prefix: str) -> None:
    s, stream, m = Scripts(redis), f"{prefix}:in", f"{prefix}:seen:x"
    assert await s.publish_many(stream, 1000, [Publish(m, b"x", 1)]) == [True]
    await redis.pexpire(m, 50)
    await asyncio.sleep(0.1)
    assert await s.publish_many(stream, 1000, [Publish(m, b"x", 1)]) == [True]
    assert await redis.xlen(stream) == 2


# -- add_deliveries.lua ----------------------------------------------------------------------------


async def test_add_deliveries_appends_in_order_with_their_ids(redis: Any, prefix: str) -> None:
    s, stream = Scripts(redis), f"{prefix}:out"
    assert await s.add_deliveries(stream, 1000, [("d1", b"one"), ("d2", b"two"), ("d1", b"one")]) == 3
    pipe = redis.pipeline(transaction=False)
    Scripts.queue_add_deliveries(pipe, stream, 1000, [("d3", b"three")])
    assert await pipe.execute() == [1]
    rows = [(f[Field.DELIVERY_ID.key], f[Field.DELIVERY.key]) for _, f in await redis.xrange(stream)]
    assert rows == [(b"d1", b"one"), (b"d2", b"two"), (b"d1", b"one"), (b"d3", b"three")]


# -- claim_send.lua (claim.lua + gcra.lua) ---------------------------------------------------------


async def test_claim_send_takes_a_free_marker_and_keeps_it_for_its_ttl(redis: Any, prefix: str) -> None:
    s, mk = Scripts(redis), f"{prefix}:mark:d"
    assert await s.claim_send(mk, ME, 5000, []) == Claim(ClaimStatus.OK)
    assert await redis.get(mk) == ME.id.encode()
    assert 4000 < await redis.pttl(mk) <= 5000
    assert (await s.claim_send(mk, ME, 9000, None)).status is ClaimStatus.OK  # ours: renewed
    assert 8000 < await redis.pttl(mk) <= 9000


async def test_claim_send_reports_a_sent_delivery_with_its_remote_id(redis: Any, prefix: str) -> None:
    s, mk = Scripts(redis), f"{prefix}:mark:d"
    await redis.set(mk, "done:msg-42")
    assert await s.claim_send(mk, ME, 5000, []) == Claim(ClaimStatus.DONE, remote_id="msg-42")
    assert await redis.get(mk) == b"done:msg-42"  # untouched


async def test_claim_send_waits_for_another_live_instance_until_its_claim_expires(
    redis: Any, prefix: str
) -> None:
    s, mk = Scripts(redis), f"{prefix}:mark:d"
    await redis.set(mk, "other:life9", px=300)
    busy = await s.claim_send(mk, ME, 5000, [])
    assert busy.status is ClaimStatus.BUSY and 0.2 < busy.wait <= 0.3
    assert await redis.get(mk) == b"other:life9"
    await asyncio.sleep(0.35)  # the other instance's claim lapsed (TTL expiry)
    assert (await s.claim_send(mk, ME, 5000, [])).status is ClaimStatus.OK
    assert await redis.get(mk) == ME.id.encode()


async def test_claim_send_takes_over_a_marker_a_previous_life_of_our_instance_left(
    redis: Any, prefix: str
) -> None:
    s, mk = Scripts(redis), f"{prefix}:mark:d"
    await redis.set(mk, "inst:life0", px=60_000)  # our instance's previous process
    assert (await s.claim_send(mk, ME, 5000, [])).status is ClaimStatus.OK
    assert await redis.get(mk) == ME.id.encode()
    await redis.set(mk, "instance2:life0", px=60_000)  # a prefix of the name is not our instance
    assert (await s.claim_send(mk, ME, 5000, [])).status is ClaimStatus.BUSY


async def test_claim_send_at_the_rate_limit_says_wait_and_charges_nothing(redis: Any, prefix: str) -> None:
    s, mk = Scripts(redis), f"{prefix}:mark:d"
    sink = Limit(f"{prefix}:rl:0", Rate(1, 10.0))  # one every 10 s
    bob = Limit(f"{prefix}:rl:bob:0", Rate(100, 1.0))
    assert await s.claim_send(mk, ME, 5000, [sink, bob]) == Claim(ClaimStatus.OK)
    sink_tat, bob_tat = await redis.get(sink.key), await redis.get(bob.key)
    wait = await s.claim_send(mk, ME, 5000, [sink, bob])
    assert wait.status is ClaimStatus.WAIT and 9.5 < wait.wait <= 10.0
    assert (await redis.get(sink.key), await redis.get(bob.key)) == (sink_tat, bob_tat)
    assert await redis.get(mk) == ME.id.encode()  # the claim is ours meanwhile
    assert (await s.claim_send(mk, ME, 5000, None)).status is ClaimStatus.OK  # keeping it charges nothing
    assert await redis.get(sink.key) == sink_tat


# -- sync.lua --------------------------------------------------------------------------------------


async def test_sync_sets_done_markers_acks_then_claims_in_order(redis: Any, prefix: str) -> None:
    s, stream = Scripts(redis), f"{prefix}:out"
    await redis.xgroup_create(stream, RUNNER_GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {Field.DELIVERY: b"x"}) for _ in range(3)]
    await redis.xreadgroup(RUNNER_GROUP, "inst", {stream: ">"})
    e = [i.decode() for i in ids]
    free, sent, held = f"{prefix}:mark:free", f"{prefix}:mark:sent", f"{prefix}:mark:held"
    await redis.set(sent, "done:r1")
    await redis.set(held, "other:x", px=10_000)
    claims = await s.sync(
        stream, RUNNER_GROUP, [Ack(e[0], f"{prefix}:mark:a", "done:ra"), Ack(e[1])], [free, sent, held], ME,
        ttl_ms=5000, done_ttl=60,
    )  # fmt: skip
    assert claims == [Claim(ClaimStatus.OK), Claim(ClaimStatus.DONE, "r1"), Claim(ClaimStatus.BUSY)]
    assert await redis.get(f"{prefix}:mark:a") == b"done:ra"
    assert 55 <= await redis.ttl(f"{prefix}:mark:a") <= 60
    pending = await redis.xpending_range(stream, RUNNER_GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [e[2]]
    assert await redis.get(free) == ME.id.encode()
    assert await s.sync(stream, RUNNER_GROUP, [], [], ME, ttl_ms=5000, done_ttl=60) == []


async def test_sync_acks_more_than_one_chunk(redis: Any, prefix: str) -> None:
    s, stream = Scripts(redis), f"{prefix}:out"
    await redis.xgroup_create(stream, RUNNER_GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for _ in range(1200):
        pipe.xadd(stream, {Field.DELIVERY: b"x"})
    ids = [i.decode() for i in await pipe.execute()]
    await redis.xreadgroup(RUNNER_GROUP, "inst", {stream: ">"})
    await s.sync(stream, RUNNER_GROUP, [Ack(i) for i in ids[:1100]], [], ME, ttl_ms=5000, done_ttl=60)
    assert (await redis.xpending(stream, RUNNER_GROUP))["pending"] == 100


# -- claim_read.lua --------------------------------------------------------------------------------


async def test_claim_read_claims_what_the_read_in_its_pipeline_gave(redis: Any, prefix: str) -> None:
    stream, marks = f"{prefix}:{{out:c}}", f"{prefix}:{{out:c}}:mark:"
    await redis.xgroup_create(stream, RUNNER_GROUP, id="0", mkstream=True)
    old = (await redis.xadd(stream, {Field.DELIVERY: b"x", Field.DELIVERY_ID: "d0"})).decode()
    await redis.xreadgroup(RUNNER_GROUP, "inst", {stream: ">"})  # read before: not claimed again
    a = (await redis.xadd(stream, {Field.DELIVERY: b"x", Field.DELIVERY_ID: "d1"})).decode()
    b = (await redis.xadd(stream, {Field.DELIVERY: b"x"})).decode()  # written without its id
    c = (await redis.xadd(stream, {Field.DELIVERY: b"x", Field.DELIVERY_ID: "d2"})).decode()
    await redis.set(marks + "d2", "done:r2")
    pipe = redis.pipeline(transaction=False)
    pipe.xreadgroup(RUNNER_GROUP, "inst", {stream: ">"}, count=10)
    Scripts.queue_claim_read(
        pipe, stream, RUNNER_GROUP, "inst", after=old, count=10, owner=ME, ttl_ms=5000, marker_prefix=marks
    )
    read, res = await pipe.execute()
    assert [x[0].decode() for x in read[0][1]] == [a, b, c]
    claims = Scripts.parse_claim_read(res)
    assert list(claims) == [a, b, c]  # in order
    assert claims == {
        a: Claim(ClaimStatus.OK),
        b: Claim(ClaimStatus.UNCLAIMED),
        c: Claim(ClaimStatus.DONE, "r2"),
    }
    assert await redis.get(marks + "d1") == ME.id.encode()
    assert await redis.get(marks + "d0") is None


async def test_claim_read_answers_nothing_for_a_trimmed_entry(redis: Any, prefix: str) -> None:
    stream, marks = f"{prefix}:{{out:c}}", f"{prefix}:{{out:c}}:mark:"
    await redis.xgroup_create(stream, RUNNER_GROUP, id="0", mkstream=True)
    a = (await redis.xadd(stream, {Field.DELIVERY: b"x", Field.DELIVERY_ID: "d1"})).decode()
    await redis.xreadgroup(RUNNER_GROUP, "inst", {stream: ">"})
    await redis.xdel(stream, a)
    pipe = redis.pipeline(transaction=False)
    Scripts.queue_claim_read(
        pipe, stream, RUNNER_GROUP, "inst", after="0", count=10, owner=ME, ttl_ms=5000, marker_prefix=marks
    )
    assert Scripts.parse_claim_read((await pipe.execute())[0]) == {a: Claim(ClaimStatus.UNCLAIMED)}
    assert await redis.get(marks + "d1") is None


def test_an_unknown_claim_answer_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected claim answer"):
        Claim.from_marker("maybe")


# -- gcra_acquire.lua (gcra.lua) -------------------------------------------------------------------


async def test_gcra_a_key_at_its_limit_waits_exactly_until_it_frees(redis: Any, prefix: str) -> None:
    lim, key = Limiter(redis), f"{prefix}:rl"
    limit = Limit(key, Rate(2, 1.0), burst=2)  # 2 at once, then one every 500 ms
    assert await lim.acquire([limit]) == 0.0
    assert await lim.acquire([limit]) == 0.0
    tat = float(await redis.get(key))
    before = await redis_ms(redis)
    wait = await lim.acquire([limit])
    after = await redis_ms(redis)
    # free again once tat + 500 - now <= 2 * 500, i.e. at tat - 500 on Redis' clock (measured on
    # Redis' clock around the call, so a slow machine moves the bounds, not the verdict)
    assert 0 < wait <= 0.5
    assert (tat - 500 - after) / 1000 - 0.002 <= wait <= (tat - 500 - before) / 1000 + 0.002
    assert float(await redis.get(key)) == tat  # a refused call charges nothing
    now = await redis_ms(redis)
    assert 0 < await redis.pttl(key) <= tat - now + 2  # the state lives until it is past


async def test_gcra_state_in_the_past_counts_as_now(redis: Any, prefix: str) -> None:
    """The clock went forward past the stored TAT (a quiet spell): allowed, charged from now."""
    lim, key = Limiter(redis), f"{prefix}:rl"
    now = await redis_ms(redis)
    await redis.set(key, f"{now - 3_600_000:.3f}")
    assert await lim.acquire([Limit(key, Rate(1, 1.0))]) == 0.0
    tat = float(await redis.get(key))
    assert now + 1000 <= tat <= await redis_ms(redis) + 1000


async def test_gcra_state_in_the_future_waits_for_it(redis: Any, prefix: str) -> None:
    """A TAT ahead of Redis' clock (charged by another instance): the wait is measured on Redis'
    clock, and nothing is charged while waiting."""
    lim, key = Limiter(redis), f"{prefix}:rl"
    now = await redis_ms(redis)
    stored = f"{now + 5000:.3f}"
    await redis.set(key, stored, px=10_000)
    wait = await lim.acquire([Limit(key, Rate(1, 1.0), burst=2)])  # allowed once TAT - now <= 1 s
    assert 3.9 < wait <= 4.0
    assert await redis.get(key) == stored.encode()


async def test_gcra_charges_all_keys_or_none(redis: Any, prefix: str) -> None:
    lim = Limiter(redis)
    free, full = Limit(f"{prefix}:free", Rate(100, 1.0)), Limit(f"{prefix}:full", Rate(1, 60.0))
    assert await lim.acquire([full]) == 0.0
    assert await lim.acquire([free, full]) > 59
    assert await redis.get(free.key) is None
    assert await lim.acquire([]) == 0.0
