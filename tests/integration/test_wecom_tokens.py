"""Access tokens against the fake WeCom/OA API and a real Redis: cached, shared, refreshed, refetched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from adapters.wechat.client import OfficialAccountApi, WeComApi
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wechat.tokens import TokenCache
from bridge.bus import Keys
from bridge.config import Secret
from bridge.errors import PermanentError, RetryableError
from tests.conftest import REDIS_URL
from tests.fakes.wecom_api import FakeWeComAPI


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeComAPI]:
    f = FakeWeComAPI()
    f.base = await f.start()  # type: ignore[attr-defined]
    yield f
    await f.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def wecom(fake: Any, http: aiohttp.ClientSession, redis: Any, prefix: str, **kw: Any) -> WeComApi:
    args: dict[str, Any] = {
        "corp_id": fake.corpid, "corp_secret": Secret(fake.corpsecret), "agent_id": fake.agentid,
        "api_base": fake.base, "http": lambda: http, "timeout": 2.0, "redis": redis,
        "state_key": Keys(prefix).state,
    } | kw  # fmt: skip
    return WeComApi(**args)


def oa(fake: Any, http: aiohttp.ClientSession, redis: Any, prefix: str, **kw: Any) -> OfficialAccountApi:
    args: dict[str, Any] = {
        "app_id": fake.appid, "app_secret": Secret(fake.appsecret), "api_base": fake.base,
        "http": lambda: http, "timeout": 2.0, "redis": redis, "state_key": Keys(prefix).state,
    } | kw  # fmt: skip
    return OfficialAccountApi(**args)


def text_to(fake: Any, user: str, content: str) -> dict[str, Any]:
    return {"touser": user, "msgtype": "text", "agentid": fake.agentid, "text": {"content": content}}


async def test_the_token_is_fetched_once_and_reused(fake: Any, http: Any, redis: Any, prefix: str) -> None:
    api = wecom(fake, http, redis, prefix)
    for i in range(5):
        await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", f"m{i}"))
    assert len(fake.token_requests()) == 1
    assert fake.contents("alice") == [f"m{i}" for i in range(5)]
    # a second client (another instance) finds it in Redis
    other = wecom(fake, http, redis, prefix)
    await other.call("POST", "/cgi-bin/message/send", body=text_to(fake, "bob", "hi"))
    assert len(fake.token_requests()) == 1
    key = Keys(prefix).state("wecom", f"token:{fake.corpid}:{fake.agentid}")
    assert await redis.pttl(key) > 6_000_000  # kept a little under the 7200 s it lives


async def test_stampede_across_three_instances_makes_one_gettoken(fake: Any, http: Any, prefix: str) -> None:
    """10 concurrent sends on each of 3 instances (own Redis connections, own API objects)."""
    fake.fail_next("/cgi-bin/gettoken", delay=0.3)  # a slow gettoken widens the race
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(3)]
    try:
        apis = [wecom(fake, http, r, prefix) for r in clients]
        sends = [
            api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", f"{n}-{i}"))
            for n, api in enumerate(apis)
            for i in range(10)
        ]
        await asyncio.gather(*sends)
        assert len(fake.token_requests()) == 1
        assert len(fake.sent("/message/send")) == 30
        assert all(r.errcode == 0 for r in fake.sent("/message/send"))
    finally:
        for r in clients:
            await r.aclose()


async def test_expired_token_is_refetched_once_and_the_call_retried(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    api = wecom(fake, http, redis, prefix)
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "before"))
    fake.advance(7200)  # the fake's clock: every token it issued is now expired (42001)
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "after"))
    assert len(fake.token_requests()) == 2
    assert [r.errcode for r in fake.sent("/message/send")] == [0, 42001, 0]
    assert fake.contents("alice") == ["before", "after"]


async def test_expiry_under_concurrency_makes_one_refetch(fake: Any, http: Any, prefix: str) -> None:
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(3)]
    try:
        apis = [wecom(fake, http, r, prefix) for r in clients]
        await apis[0].call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "warm"))
        fake.advance(7200)
        fake.fail_next("/cgi-bin/gettoken", delay=0.2)
        await asyncio.gather(
            *(
                a.call("POST", "/cgi-bin/message/send", body=text_to(fake, "bob", "x"))
                for a in apis
                for _ in range(10)
            )
        )
        assert len(fake.token_requests()) == 2
        assert len(fake.contents("bob")) == 30
    finally:
        for r in clients:
            await r.aclose()


@pytest.mark.parametrize("errcode", [40014, 42001, 41001])
async def test_each_token_errcode_refetches(
    fake: Any, http: Any, redis: Any, prefix: str, errcode: int
) -> None:
    api = wecom(fake, http, redis, prefix)
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "a"))
    fake.fail_next("/message/send", errcode=errcode)
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "b"))
    assert len(fake.token_requests()) == 2
    assert fake.contents("alice") == ["a", "b"]


async def test_invalidated_tokens_are_replaced(fake: Any, http: Any, redis: Any, prefix: str) -> None:
    api = wecom(fake, http, redis, prefix)
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "a"))
    fake.invalidate_tokens()
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "b"))
    assert len(fake.token_requests()) == 2
    assert fake.contents("alice") == ["a", "b"]


async def test_a_token_rejected_twice_is_a_retryable_error(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    api = wecom(fake, http, redis, prefix)
    fake.fail_next("/message/send", errcode=42001, times=2)
    with pytest.raises(ApiError) as info:
        await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "x"))
    assert info.value.errcode == 42001
    assert isinstance(send_error(info.value), RetryableError)
    assert len(fake.sent("/message/send")) == 2  # refetched once and tried once more, no loop


async def test_a_stale_invalidate_does_not_drop_a_newer_token(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    api = wecom(fake, http, redis, prefix)
    token = await api.tokens.get()
    await api.tokens.invalidate("some-older-token")
    assert await api.tokens.get() == token
    await api.tokens.invalidate(token)
    fake.invalidate_tokens()
    assert await api.tokens.get() != token
    assert len(fake.token_requests()) == 2


async def test_oa_token_is_refreshed_early_by_one_process(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    now = [1_000_000.0]
    apis = [oa(fake, http, redis, prefix, clock=lambda: now[0]) for _ in range(3)]
    first = await apis[0].tokens.get()
    now[0] += 7200 * 0.85  # past the 80 % mark, before expiry
    fake.fail_next("/cgi-bin/token", delay=0.3)
    got = await asyncio.gather(*(a.tokens.get() for a in apis for _ in range(4)))
    assert len(fake.token_requests()) == 2  # one early refresh for all
    fresh = next(t for t in got if t != first)
    assert set(got) <= {first, fresh}  # the others went on with the old, still valid token
    assert await apis[2].tokens.get() == fresh
    body = {"touser": "oAlice", "msgtype": "text", "text": {"content": "hi"}}
    await apis[1].call("POST", "/cgi-bin/message/custom/send", body=body)
    assert fake.contents("oAlice") == ["hi"]
    assert len(fake.token_requests()) == 2


async def test_a_failed_early_refresh_keeps_the_valid_token(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    now = [1_000_000.0]
    api = oa(fake, http, redis, prefix, clock=lambda: now[0])
    first = await api.tokens.get()
    now[0] += 7200 * 0.85
    fake.fail_next("/cgi-bin/token", http_status=502)
    assert await api.tokens.get() == first  # WeChat is down for a moment: go on with the old one
    assert await api.tokens.get() != first  # and refresh on the next call
    assert len(fake.token_requests()) == 3


async def test_oa_40001_refetches(fake: Any, http: Any, redis: Any, prefix: str) -> None:
    api = oa(fake, http, redis, prefix)
    body = {"touser": "oAlice", "msgtype": "text", "text": {"content": "hi"}}
    await api.call("POST", "/cgi-bin/message/custom/send", body=body)
    fake.fail_next("/custom/send", errcode=40001)
    await api.call("POST", "/cgi-bin/message/custom/send", body=body)
    assert len(fake.token_requests()) == 2
    assert fake.contents("oAlice") == ["hi", "hi"]


async def test_wrong_credentials_are_permanent_and_never_show_the_secret(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    api = wecom(fake, http, redis, prefix, corp_secret=Secret("wrong-secret-42"))
    with pytest.raises(PermanentError) as info:
        await api.tokens.get()
    assert "corp_secret is wrong" in str(info.value) and "wrong-secret-42" not in str(info.value)
    api = wecom(fake, http, redis, prefix, corp_id="wwnosuchcorp")
    with pytest.raises(PermanentError, match="corp_id is wrong"):
        await api.tokens.get()
    bad_oa = oa(fake, http, redis, prefix, app_secret=Secret("wrong-app-secret"))
    with pytest.raises(PermanentError) as info:
        await bad_oa.tokens.get()
    assert "app_secret is wrong" in str(info.value) and "wrong-app-secret" not in str(info.value)
    # nothing was cached, and the lock was released: a good client gets a token at once
    good = wecom(fake, http, redis, prefix)
    assert await asyncio.wait_for(good.tokens.get(), 2)


async def test_transport_errors_are_retryable_and_keep_the_token_out(
    fake: Any, http: Any, redis: Any, prefix: str
) -> None:
    api = wecom(fake, http, redis, prefix, timeout=0.3)
    token = await api.tokens.get()
    body = text_to(fake, "alice", "x")
    fake.fail_next("/message/send", http_status=502)
    with pytest.raises(RetryableError, match="HTTP 502"):
        await api.call("POST", "/cgi-bin/message/send", body=body)
    fake.fail_next("/message/send", delay=1.0)
    with pytest.raises(RetryableError, match="no answer") as info:
        await api.call("POST", "/cgi-bin/message/send", body=body)
    assert token not in str(info.value) and "access_token" not in str(info.value)
    closed = wecom(fake, http, redis, prefix, api_base="http://127.0.0.1:9")
    await redis.delete(closed.tokens.key)
    with pytest.raises(RetryableError, match="cannot reach") as info:
        await closed.call("POST", "/cgi-bin/message/send", body=body)
    assert fake.corpsecret not in str(info.value)
    fake.fail_next("/message/send", http_status=404)
    with pytest.raises(PermanentError, match="check api_base"):
        await api.call("POST", "/cgi-bin/message/send", body=body)


async def test_without_redis_the_token_is_kept_in_process(fake: Any, http: Any) -> None:
    api = wecom(fake, http, None, "unused")
    for _ in range(3):
        await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "x"))
    assert len(fake.token_requests()) == 1
    fake.invalidate_tokens()
    await api.call("POST", "/cgi-bin/message/send", body=text_to(fake, "alice", "y"))
    assert len(fake.token_requests()) == 2


async def test_waiters_time_out_if_the_holder_never_stores(redis: Any, prefix: str) -> None:
    async def never() -> tuple[str, int]:
        await asyncio.sleep(10)
        return "t", 7200

    key = Keys(prefix).state("wecom", "token:test")
    holder = TokenCache(redis, key, never, wait=0.3)
    waiter = TokenCache(redis, key, never, wait=0.3)
    task = asyncio.create_task(holder.get())
    await asyncio.sleep(0.05)
    with pytest.raises(RetryableError, match="another instance"):
        await waiter.get()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await redis.get(key + ":lock") is None  # a cancelled holder releases its lock
