"""The poll loop (bridge/poller.py) with the oa_articles feed against a fake of seed 000's API, real Redis.

First sync pages to the end; increments ask ``since`` and publish only what is new; a restart
resumes from the checkpoint with no duplicate and no gap; errors back off and recover, honouring
Retry-After; two daemons never poll one feed at once; a refused key or a body of unknown shape stops
the feed with a clear reason and readiness false; status, metrics and ``wechat-bridge poll``.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import aiohttp
import pytest

from bridge import cli
from bridge.envelope import Envelope, decode_envelope
from bridge.poller import Feed
from tests.conftest import wait_for
from tests.fakes.feed_server import Fault
from tests.fakes.oa_articles_api import FakeOAArticlesAPI

FEED = """
[[inbound]]
name = "oa"
type = "oa_articles"
base_url = "{base}"
api_key = "oa-test-key"
interval = {interval}
jitter = 0
backoff_base = {backoff}
backoff_max = {backoff_max}
lease_ttl = 1
page_size = 5
{extra}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeOAArticlesAPI]:
    f = FakeOAArticlesAPI()
    await f.start()
    yield f
    await f.stop()


def config(
    write_config: Any, fake: FakeOAArticlesAPI, interval: float = 0.05, extra: str = "", backoff: float = 0.05
) -> Any:
    body = FEED.format(
        base=fake.base, interval=interval, extra=extra, backoff=backoff, backoff_max=backoff * 8
    )
    return write_config(body)


async def envelopes(redis: Any, prefix: str, source: str = "oa") -> list[Envelope]:
    out = [decode_envelope(f[b"e"]) for _, f in await redis.xrange(f"{prefix}:{{inbound}}")]
    return [e for e in out if e.source == source]


async def count(redis: Any, prefix: str, n: int) -> bool:
    return len(await envelopes(redis, prefix)) >= n


def feed(d: Any, name: str = "oa") -> Feed:
    f = d.sources[name]
    assert isinstance(f, Feed)
    return f


async def status(redis: Any, prefix: str, name: str = "oa") -> dict[str, str]:
    raw = await redis.hgetall(f"{prefix}:{{lease:feed:{name}}}:status")
    return {k.decode(): v.decode() for k, v in raw.items()}


async def ok_again(redis: Any, prefix: str) -> bool:
    return (await status(redis, prefix)).get("consecutive_errors") == "0"


async def test_first_sync_pages_to_the_end_then_increments(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    for i in range(12):
        fake.add(f"article {i}", stored_at=time.time() - 1000 + i)
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: count(redis, prefix, 12))
    first = [r["query"] for r in fake.requests[:3]]
    assert [q["page"] for q in first] == ["1", "2", "3"]
    assert all("since" not in q and q["pageSize"] == "5" for q in first)
    assert all(r["auth"] == "Bearer oa-test-key" for r in fake.requests)
    envs = await envelopes(redis, prefix)
    assert sorted(e.raw["title"] for e in envs) == sorted(f"article {i}" for i in range(12))
    e = next(e for e in envs if e.raw["title"] == "article 3")
    assert e.text == "article 3\nsummary of article 3\nhttps://mp.weixin.qq.com/s/art-00004"
    assert e.conversation.id == "Tech Daily" and e.sender is not None and e.sender.name == "Tech Daily"
    assert e.attachments[0].url == "https://mp.weixin.qq.com/s/art-00004"

    # increments: later polls ask `since` and publish only the new articles
    await wait_for(lambda: any("since" in r["query"] for r in fake.requests))
    fake.add("fresh one")
    fake.add("fresh two")
    await wait_for(lambda: count(redis, prefix, 14))
    await wait_for(lambda: len(fake.requests) > 30)  # many more polls: nothing else appears
    envs = await envelopes(redis, prefix)
    assert len(envs) == 14 and len({e.id for e in envs}) == 14
    later = [r["query"] for r in fake.requests if "since" in r["query"]]
    assert later and all(q["page"] == "1" for q in later)
    st = await status(redis, prefix)
    assert "since" in st["cursor"] and float(st["last_success"]) > 0 and st["consecutive_errors"] == "0"
    assert feed(d).poller.counters.items == 14
    assert await d.readiness() == {}


async def test_restart_resumes_from_the_checkpoint(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    for i in range(12):
        fake.add(f"a{i}", stored_at=time.time() - 100 + i)
    # page 3 fails: pages 1-2 are published and checkpointed, then the daemon stops
    orig = fake.shape

    def failing_third(items: Any, total: int, page: int, size: int) -> Any:
        if page == 3:
            raise RuntimeError("page 3 unavailable")  # aiohttp answers 500
        return orig(items, total, page, size)

    fake.shape = failing_third
    d = await start_daemon(config(write_config, fake, backoff=5))
    await wait_for(lambda: count(redis, prefix, 10))
    await wait_for(lambda: status(redis, prefix))
    await wait_for(lambda: any(r["query"].get("page") == "3" for r in fake.requests))
    await wait_for(lambda: feed(d).poller.counters.errors >= 1)
    cursor = json.loads(await redis.get(f"{prefix}:{{lease:feed:oa}}:cursor"))
    assert cursor["page"] == 3 and cursor["since"] is None
    await d.stop()

    fake.shape = orig
    fake.requests.clear()
    await redis.hdel(f"{prefix}:{{lease:feed:oa}}:status", "next_poll")  # skip the 5 s back-off
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: count(redis, prefix, 12))
    assert fake.requests[0]["query"]["page"] == "3"  # resumed, not restarted
    envs = await envelopes(redis, prefix)
    assert sorted(e.raw["title"] for e in envs) == sorted(f"a{i}" for i in range(12))  # no gap, no duplicate


async def test_crash_between_publish_and_commit_publishes_nothing_twice(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    for i in range(7):
        fake.add(f"a{i}", stored_at=time.time() - 100 + i)
    d = await start_daemon(config(write_config, fake, interval=30))
    p = feed(d).poller
    await wait_for(lambda: count(redis, prefix, 7))
    await d.stop()
    fake.add("new")
    # a "crash" after publishing, before the checkpoint: the guarded write never happens
    cfg = config(write_config, fake, interval=30)
    d2 = await start_daemon(cfg)
    p = feed(d2).poller
    calls = []

    async def lost(key: str, value: Any, ttl: int = 0) -> bool:
        calls.append(value)
        return False

    await redis.hdel(p.status_key, "next_poll")
    assert await p.lease.acquire()
    before = await redis.get(p.cursor_key)
    p.lease.guarded_set = lost  # type: ignore[method-assign]
    await p.poll(publish=True)
    assert calls and await redis.get(p.cursor_key) == before  # the cursor did not move
    assert len(await envelopes(redis, prefix)) == 8
    del p.lease.guarded_set
    assert await p.lease.acquire()  # (kept or re-taken: a lease_ttl of 1 s may have lapsed meanwhile)
    await p.poll(publish=True)  # the same page again: deduplicated, then committed
    assert await redis.get(p.cursor_key) != before
    envs = await envelopes(redis, prefix)
    assert len(envs) == 8 and p.counters.duplicates >= 1
    await p.lease.release()


async def test_errors_back_off_and_recover_honouring_retry_after(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    fake.add("one")
    fake.faults = [
        Fault(500, {"error": "boom"}),
        Fault(502, "bad gateway"),
        Fault(429, {}, {"Retry-After": "1"}),
    ]
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: count(redis, prefix, 1))
    await wait_for(lambda: ok_again(redis, prefix))
    st = await status(redis, prefix)
    assert st["consecutive_errors"] == "0" and int(st["errors_total"]) == 3
    assert "HTTP 429" in st["last_error"]
    assert feed(d).poller.counters.errors == 3


async def test_retry_after_is_waited_for(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    fake.add("one")
    stamps: list[float] = []
    orig = fake.enter

    async def stamped(request: Any, **extra: Any) -> Any:
        stamps.append(time.monotonic())
        return await orig(request, **extra)

    fake.enter = stamped  # type: ignore[method-assign]
    fake.faults = [Fault(429, {"error": "slow down"}, {"Retry-After": "1"})]
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: count(redis, prefix, 1))
    assert stamps[1] - stamps[0] >= 0.95  # backoff_base is 0.05: only Retry-After explains the wait
    st = await status(redis, prefix)
    assert st["last_error"].startswith("oa_articles: HTTP 429")


async def test_two_daemons_never_poll_one_feed_at_once(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    for i in range(3):
        fake.add(f"a{i}")
    fake.delay = 0.03
    d1 = await start_daemon(config(write_config, fake, interval=0.01))
    d2 = await start_daemon(config(write_config, fake, interval=0.01))
    await wait_for(lambda: len(fake.requests) >= 40, timeout=30)
    assert fake.max_in_flight == 1
    polls = feed(d1).poller.counters.polls + feed(d2).poller.counters.polls
    assert polls >= 30
    assert feed(d1).poller.counters.polls > 0 and feed(d2).poller.counters.polls > 0  # both took turns
    fake.add("late")
    await wait_for(lambda: count(redis, prefix, 4))
    await asyncio.sleep(0.2)
    envs = await envelopes(redis, prefix)
    assert len(envs) == 4


async def test_refused_key_stops_the_feed_with_readiness_false(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    fake.key = "another-key"
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: feed(d).poller.stopped is not None)
    problems = await d.readiness()
    assert "API key was refused" in problems["oa"] and problems["oa"].startswith("stopped: ")
    assert "oa-test-key" not in json.dumps(problems)
    n = len(fake.requests)
    await asyncio.sleep(0.3)
    assert len(fake.requests) == n  # stopped: no more polls
    st = await status(redis, prefix)
    assert "HTTP 401" in st["stopped"]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/readyz") as r:
        assert r.status == 503
        body = await r.json()
    assert "API key was refused" in body["not_ready"]["oa"]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/metrics") as r:
        text = await r.text()
    assert 'wechat_bridge_feed_stopped{feed="oa"} 1.0' in text
    assert 'wechat_bridge_feed_errors_total{feed="oa",kind="permanent"} 1.0' in text


async def test_unknown_shape_stops_the_feed_naming_the_keys(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    fake.add("one")
    fake.shape = lambda items, total, page, size: {"ok": True, "payload": {"rows": items}}
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: feed(d).poller.stopped is not None)
    reason = (await d.readiness())["oa"]
    assert "fits none of the accepted shapes" in reason and "top-level keys found: ok, payload" in reason
    assert await envelopes(redis, prefix) == []  # nothing guessed, nothing published
    assert await redis.get(f"{prefix}:{{lease:feed:oa}}:cursor") is None


async def test_status_metrics_and_one_off_poll(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI, tmp_path: Any
) -> None:
    for i in range(6):
        fake.add(f"a{i}", stored_at=time.time() - 100 + i)
    cfg = config(write_config, fake, interval=30)
    path = str(cfg.path)

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(["--config", path, *argv])
        return rc, out.getvalue(), err.getvalue()

    # a dry run prints what it finds and changes nothing
    rc, out, err = await asyncio.to_thread(run, "poll", "oa")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 and {r["conversation"] for r in rows} == {"Tech Daily"}
    summary = json.loads(err.strip().splitlines()[-1])
    assert (
        summary["items"] == 6
        and summary["published"] is False
        and summary["cursor_after"] == "first sync not started"
    )
    assert await envelopes(redis, prefix) == []
    assert await redis.get(f"{prefix}:{{lease:feed:oa}}:cursor") is None

    # --publish is one of the daemon's polls
    rc, out, err = await asyncio.to_thread(run, "poll", "oa", "--publish")
    assert rc == 0, err
    assert len(await envelopes(redis, prefix)) == 6
    assert "since" in json.loads(err.strip().splitlines()[-1])["cursor_after"]

    # the daemon starts from that checkpoint; status shows cursor, last success, next poll
    d = await start_daemon(cfg)
    rc, out, err = await asyncio.to_thread(run, "status")
    assert rc == 0, err
    st = json.loads(out)["feeds"]["oa"]
    assert "since" in st["cursor"] and st["last_success"] and st["next_poll"] and st["last_error"] is None
    assert st["polls_total"] >= 1 and st["items_total"] == 6
    assert "oa-test-key" not in out
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/metrics") as r:
        text = await r.text()
    assert 'wechat_bridge_feed_polls_total{feed="oa"}' in text

    rc, out, err = await asyncio.to_thread(run, "poll", "nope")
    assert rc == 1 and "no feed named 'nope'" in err

    rc, out, err = await asyncio.to_thread(run, "check-config")
    assert rc == 0 and "oa-test-key" not in out


async def test_a_stop_drops_a_slow_fetch_and_commits_nothing(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    fake.add("one")
    fake.delay = 60  # the API hangs
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: fake.in_flight == 1)
    await asyncio.wait_for(d.stop(), 20)  # well before timeout (30 s) + shutdown_timeout would end it
    assert await redis.get(f"{prefix}:{{lease:feed:oa}}:cursor") is None
    assert await redis.get(f"{prefix}:{{lease:feed:oa}}") is None  # the lease was released


async def test_a_body_over_max_response_is_an_error_not_a_read(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeOAArticlesAPI
) -> None:
    for i in range(5):
        fake.add("x" * 400 + str(i))
    d = await start_daemon(config(write_config, fake, extra="max_response = 1024"))
    await wait_for(lambda: feed(d).poller.counters.errors >= 1)

    async def recorded() -> bool:
        return "last_error" in await status(redis, prefix)

    await wait_for(recorded)
    assert "over max_response" in (await status(redis, prefix))["last_error"]
    assert await envelopes(redis, prefix) == [] and feed(d).poller.stopped is None
