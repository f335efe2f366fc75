"""The wechat_oa sink (customer-service messages) through the daemon's runner, against the fake API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from bridge.bus import Field
from bridge.envelope import Attachment, Conversation, make_envelope
from bridge.text import split_text
from tests.conftest import wait_for
from tests.fakes.wecom_api import FakeWeComAPI

CONFIG = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "oa"
type = "wechat_oa"
rate = "none"
retry_base = 0.05
retry_max = 0.2
max_attempts = 3
app_id = "wxfakeappid0001"
app_secret = "fake-app-secret"
api_base = "{base}"
timeout = 2
backoff = 0.1
{extra}
[[routes]]
from = "in"
to = {to}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeComAPI]:
    f = FakeWeComAPI()
    f.base = await f.start()  # type: ignore[attr-defined]
    yield f
    await f.stop()


async def start(write_config: Any, start_daemon: Any, fake: Any, *, to: str = '"oa"', extra: str = "") -> Any:
    return await start_daemon(write_config(CONFIG.format(base=fake.base, to=to, extra=extra)))


async def publish(d: Any, text: str, openid: str = "oAlice", **fields: Any) -> None:
    await d.bus.publish(make_envelope("in", Conversation(openid, "direct"), text, **fields))


async def dead_letters(d: Any) -> list[dict[bytes, bytes]]:
    return [f for _, f in await d.redis.xrange(d.bus.keys.dead)]


async def test_text_reply_to_a_follower(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake, extra='kf_account = "kf2001@wxfake"')
    await publish(d, "您好，已收到")
    await wait_for(lambda: fake.contents("oAlice") == ["您好，已收到"])
    [req] = fake.sent("/custom/send")
    assert req.json["touser"] == "oAlice" and req.json["customservice"] == {"kf_account": "kf2001@wxfake"}


async def test_a_long_reply_arrives_in_order(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    text = "".join(f"第{i}条：公众号客服消息按字节限制长度。\n" for i in range(300))
    await publish(d, text, format="markdown")  # no markdown on an OA: sent as text
    n = len(split_text(text, 2048))
    assert n >= 8
    await wait_for(lambda: len(fake.contents("oAlice")) == n)
    parts = [p or "" for p in fake.contents("oAlice")]
    total = len(parts)
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert [re.match(r"\((\d+)/(\d+)\) ", p).groups() for p in parts] == [  # type: ignore[union-attr]
        (str(i), str(total)) for i in range(1, total + 1)
    ]
    assert "".join(re.sub(r"^\(\d+/\d+\) ", "", p) for p in parts) == text
    assert {m.msgtype for m in fake.delivered_to("oAlice")} == {"text"}


async def test_the_48_hour_window_is_permanent_with_a_clear_reason(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    fake.set_outside_window("oBob")
    d = await start(write_config, start_daemon, fake)
    await publish(d, "too late", openid="oBob")
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    reason = dead[Field.REASON.key].decode()
    assert "errcode 45015" in reason and "48-hour" in reason
    assert "must send a message to the Official Account" in reason
    assert dead[b"attempts"] == b"1"


async def test_an_unknown_openid_dead_letters(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    await publish(d, "hi", openid="oStranger")
    await wait_for(lambda: dead_letters(d))
    assert b"errcode 40003" in (await dead_letters(d))[0][Field.REASON.key]


async def test_40001_refreshes_the_token_and_sends(write_config: Any, start_daemon: Any, fake: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        d = await start(write_config, start_daemon, fake)
        await publish(d, "one")
        await wait_for(lambda: fake.contents("oAlice") == ["one"])
        fake.fail_next("/custom/send", errcode=40001)
        await publish(d, "two")
        await wait_for(lambda: fake.contents("oAlice") == ["one", "two"])
    assert len(fake.token_requests()) == 2
    tokens = {r.query["access_token"] for r in fake.requests if "access_token" in r.query}
    assert not any(t in repr(logs) for t in tokens) and "fake-app-secret" not in repr(logs)


async def test_news_and_media_and_openid_prefix(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake, to='[{sink = "oa", conversation = "openid:oBob"}]')
    attachments = [
        Attachment("link", url="https://example.com/post", title="Post", description="read me"),
        Attachment("image", media_id="OAMEDIA"),
        Attachment("file", url="https://example.com/f.zip", name="f.zip"),
    ]
    await publish(d, "links", attachments=attachments)
    await wait_for(lambda: len(fake.delivered_to("oBob")) == 3)
    got = [(m.msgtype, m.body) for m in fake.delivered_to("oBob")]
    assert got[0] == ("text", {"content": "links\n[file] f.zip https://example.com/f.zip"})
    assert got[1] == ("news", {"articles": [{"title": "Post", "url": "https://example.com/post",
                                             "description": "read me"}]})  # fmt: skip
    assert got[2] == ("image", {"media_id": "OAMEDIA"})


async def test_busy_and_5xx_are_retried(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    fake.fail_next("/custom/send", errcode=-1)
    fake.fail_next("/cgi-bin/token", http_status=502)
    await publish(d, "persist")
    await wait_for(lambda: fake.contents("oAlice") == ["persist"])
    assert await dead_letters(d) == []
