from __future__ import annotations

from typing import Any

import pytest

from bridge.bus import Bus, Field, Keys
from bridge.envelope import Conversation, decode_envelope, make_envelope
from bridge.errors import BusUnavailable


async def test_publish_dedupes_a_republished_envelope(redis: Any, prefix: str) -> None:
    bus = Bus(redis, Keys(prefix))
    env = make_envelope("corp", Conversation("u1"), "hi")
    assert await bus.publish(env, dedupe_key="msg-1") is True
    again = make_envelope("corp", Conversation("u1"), "hi (platform retry)")
    assert await bus.publish(again, dedupe_key="msg-1") is False
    other_source = make_envelope("oa", Conversation("u1"), "hi")
    assert await bus.publish(other_source, dedupe_key="msg-1") is True  # dedupe is per source
    entries = await redis.xrange(bus.keys.inbound)
    assert [decode_envelope(f[Field.ENVELOPE.key]).text for _, f in entries] == ["hi", "hi"]
    seen = await redis.get(bus.keys.seen("corp", "msg-1"))
    assert seen == entries[0][0]  # the marker names the stored entry
    assert 0 < await redis.ttl(bus.keys.seen("corp", "msg-1")) <= 86_400


async def test_publish_without_dedupe_key_always_stores(redis: Any, prefix: str) -> None:
    bus = Bus(redis, Keys(prefix))
    env = make_envelope("corp", Conversation("u1"), "hi")
    assert await bus.publish(env) and await bus.publish(env)
    assert await redis.xlen(bus.keys.inbound) == 2


async def test_unreachable_redis_raises_bus_unavailable() -> None:
    import redis.asyncio as aioredis

    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    bus = Bus(dead, Keys("x"))
    with pytest.raises(BusUnavailable):
        await bus.publish(make_envelope("corp", Conversation("u1"), "hi"), dedupe_key="k")
    await dead.aclose()


def test_keys_share_a_slot_per_script() -> None:
    k = Keys("wb")
    assert k.inbound == "wb:{inbound}" and k.seen("a", "1").startswith("wb:{inbound}:")
    assert k.mark("s", "d").startswith(k.out("s")) and k.rate("s", 0, "u1").startswith(k.out("s"))
    assert k.stream("out:s") == k.out("s") and k.stream("dead") == k.dead
    with pytest.raises(ValueError):
        k.stream("bogus")
