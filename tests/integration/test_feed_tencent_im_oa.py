"""tencent_im_oa against a fake of seed 003's official_account_msg_get_simple (UserSig verified)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.poller import Feed
from tests.conftest import wait_for
from tests.fakes.feed_server import Fault
from tests.fakes.tencent_im_api import FakeTencentIM
from tests.integration.test_feed_oa_articles import envelopes, status

ACCOUNT = "@TOA#_15ERQPAER"
FEED = """
[[inbound]]
name = "toa"
type = "tencent_im_oa"
base_url = "{base}"
sdkappid = 1400000000
secret_key = "{key}"
identifier = "{identifier}"
official_account = "{account}"
interval = {interval}
jitter = 0
backoff_base = 0.05
backoff_max = 0.4
lease_ttl = 1
{extra}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeTencentIM]:
    f = FakeTencentIM()
    await f.start()
    yield f
    await f.stop()


def config(
    write_config: Any,
    fake: FakeTencentIM,
    *,
    key: str = "",
    identifier: str = "administrator",
    account: str = ACCOUNT,
    extra: str = "",
    interval: float = 0.05,
) -> Any:
    body = FEED.format(
        base=fake.base,
        key=key or fake.key,
        identifier=identifier,
        account=account,
        extra=extra,
        interval=interval,
    )
    return write_config(body)


def feed(d: Any) -> Feed:
    f = d.sources["toa"]
    assert isinstance(f, Feed)
    return f


async def got(redis: Any, prefix: str, n: int) -> bool:
    return len(await envelopes(redis, prefix, "toa")) >= n


def bodies(fake: FakeTencentIM) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in fake.requests]


async def test_first_sync_pages_back_to_the_beginning_then_increments(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    for i in range(45):
        fake.post(ACCOUNT, f"message {i + 1}")
    fake.deleted = {10}  # a hole
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 44))
    first = bodies(fake)[:3]
    assert "LastMsgKey" not in first[0] and first[0]["ReqMsgNumber"] == 20
    assert first[1]["LastMsgKey"].startswith("26_1_") and first[2]["LastMsgKey"].startswith("6_1_")
    q = fake.requests[0]["query"]
    assert q["sdkappid"] == "1400000000" and q["identifier"] == "administrator" and q["contenttype"] == "json"
    envs = await envelopes(redis, prefix, "toa")
    seqs = [e.raw["MsgSeq"] for e in envs]
    assert seqs == [s for s in range(1, 46) if s != 10]  # oldest first, the hole skipped
    e = envs[0]
    assert e.text == "message 1" and e.conversation.id == ACCOUNT and e.sender is not None
    assert (await status(redis, prefix, "toa"))["cursor"] == "MsgSeq 45"

    n = len(fake.requests)
    await wait_for(lambda: len(fake.requests) > n + 3)
    for i in range(3):
        fake.post(ACCOUNT, f"new {i}")
    await wait_for(lambda: got(redis, prefix, 47))
    n = len(fake.requests)
    await wait_for(lambda: len(fake.requests) > n + 5)
    envs = await envelopes(redis, prefix, "toa")
    assert [e.raw["MsgSeq"] for e in envs][-3:] == [46, 47, 48] and len(envs) == 47
    # an increment is one request: the newest page already reaches the checkpoint
    assert all("LastMsgKey" not in b for b in bodies(fake)[3:])
    assert fake.over_rate == 0
    assert await d.readiness() == {}


async def test_recalled_messages_are_optional(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    for i in range(4):
        fake.post(ACCOUNT, f"m{i + 1}")
    fake.recalled = {2}
    await start_daemon(config(write_config, fake, extra="with_recalled = true"))
    await wait_for(lambda: got(redis, prefix, 4))
    envs = await envelopes(redis, prefix, "toa")
    recalled = [e for e in envs if e.raw["MsgSeq"] == 2]
    assert recalled[0].kind == "event" and recalled[0].event == "recalled"
    assert bodies(fake)[0]["WithRecalledMsg"] == 1


async def test_restart_resumes_without_duplicates(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    for i in range(30):
        fake.post(ACCOUNT, f"m{i + 1}")
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 30))
    await d.stop()
    for i in range(25):
        fake.post(ACCOUNT, f"while down {i}")
    fake.requests.clear()
    await redis.hdel(f"{prefix}:{{lease:feed:toa}}:status", "next_poll")
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 55))
    await asyncio.sleep(0.2)
    envs = await envelopes(redis, prefix, "toa")
    assert [e.raw["MsgSeq"] for e in envs] == list(range(1, 56))
    first = bodies(fake)[:2]  # 25 new: two pages back, stopping at the checkpoint
    assert "LastMsgKey" not in first[0] and first[1]["LastMsgKey"].startswith("36_1_")


async def test_expired_history_ends_the_first_sync(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    for i in range(30):
        fake.post(ACCOUNT, f"m{i + 1}")
    fake.expired_below = 8  # IsFinished 2 once the page reaches it
    await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 23))
    await asyncio.sleep(0.2)
    envs = await envelopes(redis, prefix, "toa")
    assert [e.raw["MsgSeq"] for e in envs] == list(range(8, 31))


async def test_10002_and_bad_gateway_are_retried(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    fake.post(ACCOUNT, "hello")
    fake.faults = [
        Fault(200, {"ActionStatus": "FAIL", "ErrorCode": 10002, "ErrorInfo": "internal server error"}),
        Fault(502),
    ]
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 1))
    st = await status(redis, prefix, "toa")
    assert int(st["errors_total"]) == 2 and "HTTP 502" in st["last_error"]
    assert feed(d).poller.stopped is None


async def test_an_expired_usersig_is_regenerated(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    fake.post(ACCOUNT, "hello")
    d = await start_daemon(config(write_config, fake, interval=30))
    await wait_for(lambda: got(redis, prefix, 1))
    f = feed(d)
    p = f.poller
    first = fake.requests[0]["query"]["usersig"]
    f._sig = ("stale", 0.0)  # type: ignore[attr-defined]  # due for renewal
    fake.post(ACCOUNT, "again")
    assert await p.lease.acquire()
    await p.poll(publish=True)
    assert await got(redis, prefix, 2)
    second = fake.requests[-1]["query"]["usersig"]
    assert second not in ("stale", "") and first  # regenerated before use (the fake verified it)
    # the service says 70001 (expired): a new UserSig at once, no error recorded
    fake.faults = [Fault(200, {"ActionStatus": "FAIL", "ErrorCode": 70001, "ErrorInfo": "usersig expired"})]
    fake.post(ACCOUNT, "third")
    n = len(fake.requests)
    assert await p.lease.acquire()
    await p.poll(publish=True)
    assert await got(redis, prefix, 3)
    assert len(fake.requests) == n + 2  # refused, then at once again with a new UserSig
    assert "errors_total" not in await status(redis, prefix, "toa")
    await p.lease.release()


@pytest.mark.parametrize(
    ("kw", "code", "needle"),
    [
        ({"account": "@TOA#_nobody"}, 10010, "does not exist"),
        ({"account": "15ERQPAER"}, 10015, "invalid official account id"),
        ({"identifier": "someone"}, 10007, "insufficient permissions"),
        ({"key": "0" * 64}, 70009, "check that secret_key belongs to sdkappid"),
        ({"fault": 10004}, 10004, "invalid parameter"),
        ({"fault": 10003}, 10003, "illegal request command word"),
    ],
)
async def test_permanent_error_codes_stop_the_feed(
    write_config: Any,
    start_daemon: Any,
    redis: Any,
    prefix: str,
    fake: FakeTencentIM,
    kw: dict[str, Any],
    code: int,
    needle: str,
) -> None:
    fake.post(ACCOUNT, "hello")
    fault = kw.pop("fault", None)
    if fault:
        fake.faults = [Fault(200, {"ActionStatus": "FAIL", "ErrorCode": fault, "ErrorInfo": "x"})]
    d = await start_daemon(config(write_config, fake, **kw))
    await wait_for(lambda: feed(d).poller.stopped is not None)
    why = (await d.readiness())["toa"]
    assert f"ErrorCode {code}" in why and needle in why, why
    assert fake.key not in why and fake.requests[0]["query"]["usersig"] not in why
    assert await envelopes(redis, prefix, "toa") == []


async def test_queries_per_second_stay_under_the_limit(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM
) -> None:
    for i in range(100):
        fake.post(ACCOUNT, f"m{i}")
    fake.qps_limit = 50  # the fake answers 60007 past it
    await start_daemon(config(write_config, fake, extra="page_size = 1\nmax_qps = 40"))
    await wait_for(lambda: got(redis, prefix, 100), timeout=30)
    assert fake.over_rate == 0 and len(fake.requests) >= 100


async def test_no_key_or_usersig_in_logs(
    write_config: Any, start_daemon: Any, redis: Any, prefix: str, fake: FakeTencentIM, capsys: Any
) -> None:
    from bridge import logging as blog

    fake.post(ACCOUNT, "hello")
    fake.faults = [Fault(502), Fault(200, {"ActionStatus": "FAIL", "ErrorCode": 10002, "ErrorInfo": "busy"})]
    d = await start_daemon(config(write_config, fake))
    await wait_for(lambda: got(redis, prefix, 1))
    await d.stop()
    d2 = await start_daemon(config(write_config, fake, key="f" * 64))  # refused: 70009
    await wait_for(lambda: feed(d2).poller.stopped is not None)
    blog.flush()
    logs = capsys.readouterr().err
    assert "feed.error" in logs and "feed.stopped" in logs
    sigs = {r["query"]["usersig"] for r in fake.requests}
    assert sigs and not any(s in logs for s in sigs)
    assert fake.key not in logs and "f" * 64 not in logs
