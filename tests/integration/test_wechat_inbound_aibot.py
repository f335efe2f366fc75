"""The WeCom AI bot's reply path end to end: message → stream ack → AI answer (a routed reply) →
``wecom_aibot`` sink → stream refresh with finish=true, or response_url when the window has closed.

The "AI" is the test's CollectSink answering with ``ctx.reply``; response_url is a local aiohttp
receiver. WeCom's stream refreshes are sent like WeCom sends them (signed, encrypted).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge.bus import Field
from bridge.envelope import stable_id
from tests.conftest import CollectSink, wait_for
from tests.integration.test_wechat_inbound import KEY, TOKEN, Bridge, MakeBridge, bridges, decrypt_reply, post

#: the response_url receiver is on loopback: allowed here (bridge/egress.py refuses it by default)
CONFIG = f"""fetch_hosts = ["127.0.0.1"]
fetch_private = ["127.0.0.0/8"]
[[inbound]]
name = "bot"
type = "wecom_aibot"
path = "/wecom/bot"
token = "{TOKEN}"
encoding_aes_key = "{KEY}"
reply_via = "bot_reply"
stream_window = {{window}}
[[outbound]]
name = "bot_reply"
type = "wecom_aibot"
poll_interval = 0.05
retry_base = 0.05
max_attempts = 3
[[outbound]]
name = "ai"
type = "collect"
[[routes]]
name = "ask"
from = "bot"
to = "{{to}}"
reply = true
"""


class Receiver:
    """A response_url endpoint: records each POST, answers from ``script`` (then errcode 0)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.script: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        return web.json_response(self.script.pop(0) if self.script else {"errcode": 0, "errmsg": "ok"})


@pytest.fixture
async def make_bridge(redis: Any, write_config: Any, start_daemon: Any) -> AsyncIterator[MakeBridge]:
    # `redis` first: its teardown (deleting this test's keys) runs after the daemons stopped
    async with bridges(write_config, start_daemon) as make:
        yield make


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/response", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}/response"
    yield r
    await runner.cleanup()


async def start(make_bridge: MakeBridge, *, window: int = 60, to: str = "ai") -> tuple[Bridge, CollectSink]:
    b = await make_bridge(CONFIG.format(window=window, to=to))
    return b, CollectSink.instances["ai"]


def message(msgid: str, text: str, response_url: str) -> bytes:
    body = {"msgid": msgid, "aibotid": "AIBOT", "chatid": "wrGROUP", "chattype": "group", "from": {"userid": "lisi"},
            "response_url": response_url, "msgtype": "text", "text": {"content": text}}  # fmt: skip
    return json.dumps(body).encode()


async def send(b: Bridge, plain: bytes) -> dict[str, Any]:
    q, body = post("wecom_aibot", plain)
    status, answer = await b.call("POST", "/wecom/bot", q, body)
    assert status == 200, answer
    return decrypt_reply(answer)["stream"] if answer else {}


async def refresh(b: Bridge, stream_id: str) -> dict[str, Any]:
    """WeCom's stream refresh callback: a new msgid, no response_url, the stream id."""
    plain = {"msgid": f"refresh-{stream_id}", "aibotid": "AIBOT", "chatid": "wrGROUP", "chattype": "group",
             "from": {"userid": "lisi"}, "msgtype": "stream", "stream": {"id": stream_id}}  # fmt: skip
    return await send(b, json.dumps(plain).encode())


async def poll_until_finished(b: Bridge, stream_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def finished() -> bool:
        seen.update(await refresh(b, stream_id))
        return bool(seen["finish"])

    await wait_for(finished, timeout=10, every=0.05)
    return seen


async def dead(b: Bridge) -> list[dict[bytes, bytes]]:
    return [f for _, f in await b.d.redis.xrange(b.d.bus.keys.dead)]  # type: ignore[union-attr]


async def test_the_answer_reaches_the_stream_and_finishes_it(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b, ai = await start(make_bridge)
    ai.reply_text = "echo: {text}"
    ack = await send(b, message("m1", "@bot hello", receiver.url))
    sid = stable_id("bot", "msg", "m1")
    assert ack == {"id": sid, "finish": False, "content": ""}
    final = await poll_until_finished(b, sid)
    assert final == {"id": sid, "finish": True, "content": "echo: @bot hello"}
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)
    assert receiver.posts == []  # shown once: in the stream, not again through response_url
    assert await refresh(b, sid) == final  # later refreshes keep saying the same
    assert await dead(b) == []


async def test_drafts_show_while_the_answer_is_streamed(make_bridge: MakeBridge, receiver: Receiver) -> None:
    b, _ = await start(make_bridge)  # the AI does not answer: it is still thinking
    await send(b, message("m2", "question", receiver.url))
    sid = stable_id("bot", "msg", "m2")
    ctx = b.d.sources["bot"].ctx
    await ctx.set_draft(sid, "partial an")  # what an AI sink's SendContext.draft() does
    assert await refresh(b, sid) == {"id": sid, "finish": False, "content": "partial an"}
    await ctx.set_draft(sid, "partial answer, longer")
    assert await refresh(b, sid) == {"id": sid, "finish": False, "content": "partial answer, longer"}
    # a stream that is not ours (or long gone): WeCom is told to stop polling
    assert await refresh(b, "no-such-stream") == {"id": "no-such-stream", "finish": True, "content": ""}
    # a retried message callback answers with the same stream and what it shows now
    assert await send(b, message("m2", "question", receiver.url)) == {
        "id": sid, "finish": False, "content": "partial answer, longer"
    }  # fmt: skip
    assert await b.inbound_len() == 1


async def test_a_late_answer_goes_to_response_url_once(make_bridge: MakeBridge, receiver: Receiver) -> None:
    b, ai = await start(make_bridge, window=1)
    ai.reply_text = "late: {text}"
    ai.delay = 1.3  # the answer comes after the stream window
    await send(b, message("m3", "slow question", receiver.url))
    sid = stable_id("bot", "msg", "m3")
    await wait_for(lambda: len(receiver.posts) == 1)
    assert receiver.posts == [{"msgtype": "markdown", "markdown": {"content": "late: slow question"}}]
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)
    # WeCom still polling: the stream ends without repeating the answer
    assert await refresh(b, sid) == {"id": sid, "finish": True, "content": ""}
    assert len(receiver.posts) == 1 and await dead(b) == []


async def test_an_answer_nobody_fetched_falls_back_to_response_url(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b, ai = await start(make_bridge, window=1)
    ai.reply_text = "answer"
    await send(b, message("m4", "q", receiver.url))
    sid = stable_id("bot", "msg", "m4")
    await wait_for(lambda: len(receiver.posts) == 1)  # no refresh came within the window
    assert receiver.posts[0]["markdown"]["content"] == "answer"
    assert await refresh(b, sid) == {"id": sid, "finish": True, "content": ""}
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)
    assert len(receiver.posts) == 1


async def test_a_long_answer_is_split_between_stream_and_response_url(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b, ai = await start(make_bridge)
    long = "第一段，很长的回答。" * 900 + "\n\n" + "second part. " * 400  # ~27 KB + 5 KB
    ai.reply_text = long + "{text}"
    await send(b, message("m5", "!", receiver.url))
    sid = stable_id("bot", "msg", "m5")
    final = await poll_until_finished(b, sid)
    assert len(final["content"].encode()) <= 20480
    await wait_for(lambda: len(receiver.posts) == 1)
    rest = receiver.posts[0]["markdown"]["content"]
    assert len(rest.encode()) <= 20480
    assert final["content"] + rest == long + "!"  # nothing dropped, nothing repeated
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)


async def test_an_answer_too_long_for_the_bot_is_a_dead_letter_not_a_truncation(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b, ai = await start(make_bridge)
    ai.reply_text = "x" * 45_000 + "{text}"
    await send(b, message("m6", "!", receiver.url))
    await wait_for(lambda: dead(b))
    [d] = await dead(b)
    assert b"45001 UTF-8 bytes" in d[Field.REASON.key] and b"at most 2 x 20480" in d[Field.REASON.key]
    assert receiver.posts == []


async def test_response_url_errors(make_bridge: MakeBridge, receiver: Receiver) -> None:
    b, ai = await start(make_bridge, window=1)
    ai.reply_text = "answer"
    receiver.script = [{"errcode": -1, "errmsg": "system busy"}]  # retried
    await send(b, message("m7", "q", receiver.url))
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)
    assert len(receiver.posts) == 2
    receiver.script = [{"errcode": 40058, "errmsg": "markdown.content exceed max length"}]  # permanent
    await send(b, message("m8", "q", receiver.url))
    await wait_for(lambda: dead(b))
    [d] = await dead(b)
    assert (
        d[Field.REASON.key]
        == b"permanent: response_url refused the answer: errcode 40058 markdown.content exceed max length"
    )


async def test_messages_routed_straight_to_the_sink_are_refused(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b, _ = await start(make_bridge, to="bot_reply")
    await send(b, message("m9", "q", receiver.url))
    await wait_for(lambda: dead(b))
    [d] = await dead(b)
    assert b"only answers messages of a wecom_aibot inbound" in d[Field.REASON.key]


async def test_without_stream_messages_get_an_empty_answer_and_replies_use_response_url(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b = await make_bridge(CONFIG.format(window=60, to="ai").replace("stream_window = 60", "stream = false"))
    CollectSink.instances["ai"].reply_text = "via url"
    assert await send(b, message("m10", "q", receiver.url)) == {}
    await wait_for(lambda: len(receiver.posts) == 1)
    assert receiver.posts[0]["markdown"]["content"] == "via url"


def enter_chat(msgid: str) -> bytes:
    body = {"msgid": msgid, "create_time": 1733000000, "aibotid": "AIBOT", "chattype": "single",
            "from": {"userid": "lisi"}, "msgtype": "event", "event": {"eventtype": "enter_chat"}}  # fmt: skip
    return json.dumps(body).encode()


async def welcome_answer(b: Bridge, msgid: str) -> dict[str, Any]:
    q, body = post("wecom_aibot", enter_chat(msgid))
    status, answer = await b.call("POST", "/wecom/bot", q, body)
    assert status == 200, answer
    return decrypt_reply(answer) if answer else {}


WELCOME_ROUTE = """
[[routes]]
name = "hello"
from = "bot"
to = "ai"
reply = true
[routes.match]
kinds = ["event"]
"""


async def test_a_static_welcome_answers_enter_chat(make_bridge: MakeBridge) -> None:
    b = await make_bridge(
        CONFIG.format(window=60, to="ai").replace(
            "stream_window = 60", 'stream_window = 60\nwelcome = "Hi! Ask me anything."'
        )
    )
    assert await welcome_answer(b, "e1") == {"msgtype": "text", "text": {"content": "Hi! Ask me anything."}}
    assert await b.inbound_len() == 1  # the event is published too


async def test_a_routed_welcome_within_the_wait_and_a_late_one(make_bridge: MakeBridge) -> None:
    cfg = CONFIG.format(window=60, to="ai").replace(
        "stream_window = 60", "stream_window = 60\nwelcome_wait = 1.5"
    )
    b = await make_bridge(cfg + WELCOME_ROUTE)
    ai = CollectSink.instances["ai"]
    ai.reply_text = "welcome, {text}friend"
    assert await welcome_answer(b, "e2") == {"msgtype": "text", "text": {"content": "welcome, friend"}}
    await wait_for(lambda: b.d.runners["bot_reply"].sent == 1)
    ai.delay = (
        2.0  # the agent answers after the wait: the callback is answered empty, the answer dead-lettered
    )
    assert await welcome_answer(b, "e3") == {}
    await wait_for(lambda: dead(b), timeout=10)
    [letter] = await dead(b)
    assert b"no response_url" in letter[b"reason"]
