"""x_alerts against a fake of seed 001's notifications API (lastKey paging, every documented error)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.poller import Feed
from tests.conftest import wait_for
from tests.fakes.feed_server import Fault
from tests.fakes.x_alerts_api import FakeXAlertsAPI
from tests.integration.test_feed_oa_articles import envelopes, status

FEED = """
[[inbound]]
name = "x"
type = "x_alerts"
base_url = "{base}"
api_key = "{key}"
interval = 0.05
jitter = 0
backoff_base = {backoff}
backoff_max = {backoff_max}
lease_ttl = 1
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeXAlertsAPI]:
    f = FakeXAlertsAPI()
    await f.start()
    yield f
    await f.stop()


def config(
    write_config: Any, fake: FakeXAlertsAPI, *, backoff: float = 0.05, base: str = "", key: str = ""
) -> Any:
    return write_config(
        FEED.format(base=base or fake.base, key=key or fake.key, backoff=backoff, backoff_max=backoff * 8)
    )


def feed(d: Any) -> Feed:
    f = d.sources["x"]
    assert isinstance(f, Feed)
    return f


async def ok_again(redis: Any, prefix: str) -> bool:
    return (await status(redis, prefix, "x")).get("consecutive_errors") == "0"


async def got(redis: Any, prefix: str, n: int) -> bool:
    return len(await envelopes(redis, prefix, "x")) >= n


async def test_first_sync_pages_to_the_end_then_increments(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    base = int(time.time() * 1000) - 500_000
    for i in range(120):
        fake.alert("elonmusk" if i % 2 else "nasa", f"post {i}", created_ms=base + i * 1000)
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 120))
    first = [r["query"] for r in fake.requests[:3]]
    assert "from" not in first[0] and "lastKey" not in first[0]
    assert "lastKey" in first[1] and "lastKey" in first[2]
    assert len({q["to"] for q in first}) == 1  # one window
    assert all(r["key"] == fake.key for r in fake.requests)
    envs = await envelopes(redis, prefix, "x")
    assert len({e.id for e in envs}) == 120
    e = next(e for e in envs if e.raw["tweetText"] == "post 7")
    assert e.conversation.id == "elonmusk" and e.text.startswith(
        "@elonmusk: post 7\nhttps://x.com/elonmusk/status/"
    )
    # pages are published oldest first within each page
    page1 = [e.raw["createdAt"] for e in envs[:50]]
    assert page1 == sorted(page1)

    await wait_for(lambda: any("from" in r["query"] for r in fake.requests))
    fake.alert("nasa", "new post")
    await wait_for(lambda: got(redis, prefix, 121))
    n = len(fake.requests)
    await wait_for(lambda: len(fake.requests) > n + 10)
    envs = await envelopes(redis, prefix, "x")
    assert len(envs) == 121
    assert "next from" in (await status(redis, prefix, "x"))["cursor"]
    assert await d.readiness() == {}


async def test_one_post_alerted_twice_is_one_message(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    fake.alert("nasa", "launch", tweet="42")
    fake.alert("nasa", "launch", tweet="42")  # a second phone
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 1))
    await wait_for(lambda: len(fake.requests) > 5)
    assert len(await envelopes(redis, prefix, "x")) == 1


async def test_restart_inside_a_window_resumes_with_its_last_key(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    base = int(time.time() * 1000) - 500_000
    for i in range(120):
        fake.alert("nasa", f"p{i}", created_ms=base + i)
    fake.fault_at[3] = Fault(500, {"error": "internal"})
    d = await start_daemon(config(write_config, fake, backoff=5))
    await wait_for(lambda: got(redis, prefix, 100))
    await wait_for(lambda: feed(d).poller.counters.errors >= 1)
    cursor = json.loads(await redis.get(f"{prefix}:{{lease:feed:x}}:cursor"))
    assert "lastKey" in cursor
    st = await status(redis, prefix, "x")
    assert "HTTP 500" in st["last_error"]
    await d.stop()
    fake.requests.clear()
    await redis.hdel(f"{prefix}:{{lease:feed:x}}:status", "next_poll")
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 120))
    assert fake.requests[0]["query"]["lastKey"] == cursor["lastKey"]
    envs = await envelopes(redis, prefix, "x")
    assert sorted(e.raw["tweetText"] for e in envs) == sorted(f"p{i}" for i in range(120))


async def test_500_backs_off_exponentially_and_recovers(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    fake.alert("nasa", "one")
    fake.faults = [Fault(500, {"error": "internal"}) for _ in range(3)]
    stamps: list[float] = []
    orig = fake.enter

    async def stamped(request: Any, **extra: Any) -> Any:
        stamps.append(time.monotonic())
        return await orig(request, **extra)

    fake.enter = stamped  # type: ignore[method-assign]
    d = await start_daemon(config(write_config, fake, backoff=0.2))
    await wait_for(lambda: got(redis, prefix, 1))
    await wait_for(lambda: ok_again(redis, prefix))
    gaps = [b - a for a, b in itertools.pairwise(stamps[:4])]
    # back-off 0.2, 0.4, 0.8 (jitter 0): each wait at least the one before it doubled, within 10 %
    assert gaps[0] >= 0.18 and gaps[1] >= 0.36 and gaps[2] >= 0.72
    st = await status(redis, prefix, "x")
    assert st["consecutive_errors"] == "0" and int(st["errors_total"]) == 3
    assert feed(d).poller.stopped is None


async def test_rate_limited_403_honours_retry_after(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    fake.alert("nasa", "one")
    fake.faults = [Fault(403, {"error": "rate limited"}, {"Retry-After": "1"})]
    stamps: list[float] = []
    orig = fake.enter

    async def stamped(request: Any, **extra: Any) -> Any:
        stamps.append(time.monotonic())
        return await orig(request, **extra)

    fake.enter = stamped  # type: ignore[method-assign]
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 1))
    assert stamps[1] - stamps[0] >= 0.95


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("bad_key", "HTTP 401: the API key is missing or invalid"),
        ("no_credits", "HTTP 402: out of credits"),
        ("bad_request", "HTTP 400: bad things"),
        ("wrong_path", "HTTP 404 (not found): check base_url"),
        ("no_list", "the response has no notifications list; found: items"),
    ],
)
async def test_permanent_errors_stop_the_feed(
    write_config: Any,
    start_daemon: Any,
    redis: Any,
    prefix: str,
    fake: FakeXAlertsAPI,
    setup: str,
    needle: str,
) -> None:
    fake.alert("nasa", "one")
    base, key = "", ""
    if setup == "bad_key":
        key = "bws_prod_" + "1" * 27
    elif setup == "no_credits":
        fake.credits = 0
    elif setup == "bad_request":
        fake.faults = [Fault(400, {"error": "bad things"})]
    elif setup == "wrong_path":
        base = fake.base + "/v2"
    elif setup == "no_list":
        fake.faults = [Fault(200, {"items": []})]
    d = await start_daemon(config(write_config, fake, base=base, key=key))
    await wait_for(lambda: feed(d).poller.stopped is not None)
    why = (await d.readiness())["x"]
    assert needle in why, why
    assert fake.key not in why and "1" * 27 not in why
    n = len(fake.requests)
    await asyncio.sleep(0.3)
    assert len(fake.requests) == n
    assert await envelopes(redis, prefix, "x") == []
    assert needle in (await status(redis, prefix, "x"))["stopped"]


async def test_a_last_key_the_api_refuses_rereads_the_window(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeXAlertsAPI
) -> None:
    fake.alert("nasa", "one")
    to = int(time.time() * 1000)
    await redis.set(
        f"{prefix}:{{lease:feed:x}}:cursor", json.dumps({"from": None, "to": to, "lastKey": "garbage"})
    )
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 1))
    assert fake.requests[0]["query"]["lastKey"] == "garbage" and "lastKey" not in fake.requests[1]["query"]
    assert feed(d).poller.stopped is None
