"""The WeCom AI bot over its long connection, against the fake server (tests/fakes/wecom_aibot_ws.py).

Daemons run in-process (and one in a subprocess, killed with SIGKILL); the agent is a stand-in sink
(tests/integration/aibot_ws_node.py). Timing keys are sub-second, so every test is quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.wecom.aibot_ws import WeComAIBotWSSource, parse_frame
from adapters.wecom.aibot_ws_sink import WeComAIBotWSSink
from bridge.adapter import Registry, SendContext
from bridge.config import Config
from bridge.daemon import Daemon
from bridge.envelope import Conversation, Delivery, Origin, make_envelope, stable_id
from bridge.errors import ConfigError, PermanentError
from bridge.runner import Runner
from tests.conftest import wait_for
from tests.fakes.wecom_aibot_ws import FakeAIBotServer
from tests.integration.aibot_ws_node import AgentSink

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[[inbound]]
name = "bot"
type = "wecom_aibot_ws"
bot_id = "bot1"
secret = "{secret}"
url = "{url}"
reply_via = "botout"
heartbeat_interval = 0.3
ack_timeout = 1
connect_timeout = 2
reconnect_base = 0.05
reconnect_max = 0.2
lease_ttl = 2
lease_retry = 0.3
draft_poll = 0.05
{extra_in}
[[outbound]]
name = "botout"
type = "wecom_aibot_ws"
inbound = "bot"
timeout = 2
rate = "100/second"
retry_base = 0.05
retry_max = 0.3
claim_idle = 1
[[outbound]]
name = "agent"
type = "agent"
retry_base = 0.05
retry_max = 0.3
claim_idle = 1
[[routes]]
name = "ai"
from = "bot"
to = "agent"
reply = true
{extra}
"""

#: a dead holder is replaced within lease_ttl + lease_retry (+ connecting). lease_ttl is 2 s, not
#: less: a test machine under load may stall the loop long enough for a shorter lease to lapse
TAKEOVER = 2.3


@pytest.fixture
async def fake() -> AsyncIterator[FakeAIBotServer]:
    srv = FakeAIBotServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def agent_registry(registry: Registry) -> Registry:
    registry.sinks["agent"] = AgentSink
    AgentSink.answered.clear()
    return registry


@pytest.fixture
async def node(
    fake: FakeAIBotServer, write_config: Callable[..., Config], agent_registry: Registry, redis: Any
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process daemons (instances t1, t2, ...) on one Redis prefix and the fake server."""
    started: list[Daemon] = []

    async def make(
        *, secret: str = "secret-1", extra_in: str = "", extra: str = "", wait: bool = True
    ) -> Daemon:
        n = len(started) + 1
        cfg = write_config(
            CONFIG.format(secret=secret, url=fake.url, extra_in=extra_in, extra=extra), name=f"n{n}.toml"
        )
        cfg.bridge.instance = f"t{n}"
        d = Daemon(cfg, agent_registry)
        started.append(d)
        await d.start()
        if wait and n == 1:
            await wait_for(lambda: source(d).socket is not None, timeout=5)
        return d

    yield make
    for d in reversed(started):
        await d.stop()


def source(d: Daemon) -> WeComAIBotWSSource:
    s = d.sources["bot"]
    assert isinstance(s, WeComAIBotWSSource)
    return s


def send_ctx(d: Daemon, delivery: Delivery) -> SendContext:
    """What the runner hands the sink for one delivery (the tests call the sink directly)."""
    assert d.bus is not None
    [cfg] = [o for o in d.config.outbound if o.name == delivery.sink]
    return SendContext(delivery, Runner(d.sinks[delivery.sink], cfg, d.bus, d.instance))


def holders(ds: list[Daemon]) -> list[Daemon]:
    return [d for d in ds if source(d).socket is not None]


async def answered(fake: FakeAIBotServer, req_id: str, chat: str = "alice", n: int = 1) -> list[str]:
    await wait_for(lambda: len(fake.answers(req_id, chat)) >= n, timeout=10)
    return fake.answers(req_id, chat)


# -- the fake server itself ----------------------------------------------------------------------


async def test_fake_server_follows_the_note(fake: FakeAIBotServer) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(fake.url) as ws:

        async def ask(cmd: str, req_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            await ws.send_str(json.dumps({"cmd": cmd, "headers": {"req_id": req_id}, "body": body or {}}))
            frame = parse_frame((await ws.receive()).data)
            assert frame is not None
            return frame

        bad = await ask("aibot_subscribe", "aibot_subscribe_1_aa", {"bot_id": "bot1", "secret": "no"})
        assert bad == {"headers": {"req_id": "aibot_subscribe_1_aa"}, "errcode": 853000,
                       "errmsg": "invalid bot_id or secret"}  # fmt: skip
        assert (await ask("aibot_send_msg", "x1", {"chatid": "alice"}))["errcode"] == 846609
        ok = await ask("aibot_subscribe", "sub-2", {"bot_id": "bot1", "secret": "secret-1"})
        assert ok == {"headers": {"req_id": "sub-2"}, "errcode": 0, "errmsg": "ok"}
        assert (await ask("ping", "ping_1"))["errcode"] == 0
        conn = fake.live()
        assert conn is not None
        ev = await fake.push_event("enter_chat", conn=conn)
        frame = parse_frame((await ws.receive()).data)
        assert frame is not None and frame["cmd"] == "aibot_event_callback"
        assert frame["body"]["event"] == {"eventtype": "enter_chat"}
        stream = {"msgtype": "stream", "stream": {"id": "s", "finish": True, "content": "x"}}
        assert (await ask("aibot_respond_msg", ev, stream))["errcode"] == 846605  # an event's req_id
        welcome = {"msgtype": "text", "text": {"content": "hi"}}
        assert (await ask("aibot_respond_welcome_msg", ev, welcome))["errcode"] == 0
        msg = await fake.push_message("hello")
        await ws.receive()
        fake.stream_expiry = 0.0
        assert (await ask("aibot_respond_msg", msg, stream))["errcode"] == 846608
        # a second subscription kicks the first: disconnected_event, then close
        async with s.ws_connect(fake.url) as ws2:
            await ws2.send_str(json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": "s3"},
                                           "body": {"bot_id": "bot1", "secret": "secret-1"}}))  # fmt: skip
            assert json.loads((await ws2.receive()).data)["errcode"] == 0
            kicked = parse_frame((await ws.receive()).data)
            assert kicked is not None and kicked["body"]["event"]["eventtype"] == "disconnected_event"
            assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            # a req_id of the older connection is dead on the new one
            await ws2.send_str(
                json.dumps({"cmd": "aibot_respond_msg", "headers": {"req_id": msg}, "body": stream})
            )
            assert json.loads((await ws2.receive()).data)["errcode"] == 846605


# -- one instance --------------------------------------------------------------------------------


async def test_a_message_is_answered_in_its_stream_placeholder_first(
    node: Any, fake: FakeAIBotServer, redis: Any, prefix: str
) -> None:
    d = await node()
    req = await fake.push_message("hello DRAFT", msgid="m-1")
    [answer] = await answered(fake, req)
    assert answer == "echo: hello DRAFT"
    frames = fake.stream_frames(req)
    envelope = stable_id("bot", "msg", "m-1")
    assert frames[0] == {"id": envelope, "finish": False, "content": "<think></think>"}
    assert frames[-1] == {"id": envelope, "finish": True, "content": "echo: hello DRAFT"}
    growing = [f["content"] for f in frames[1:-1]]
    assert growing and all("echo: hello DRAFT".startswith(t) for t in growing), frames
    assert fake.sent() == []
    # the envelope is the HTTP mode's: same id, shape and meta
    [(inst, env_id)] = AgentSink.answered
    assert env_id == envelope and inst == "t1"
    assert await source(d).ready() is None
    # the same msgid again (a redelivery) is not published twice
    req2 = await fake.push_message("hello DRAFT", msgid="m-1")
    await asyncio.sleep(0.5)
    assert len(AgentSink.answered) == 1
    assert fake.stream_frames(req2) == []


async def test_a_long_answer_continues_in_further_streams(node: Any, fake: FakeAIBotServer) -> None:
    await node(extra_in='placeholder = ""')
    req = await fake.push_message("LONG one")
    await wait_for(lambda: len([f for f in fake.stream_frames(req) if f["finish"]]) >= 3, timeout=10)
    finished = [f for f in fake.stream_frames(req) if f["finish"]]
    assert len(finished) == 3 and len({f["id"] for f in finished}) == 3
    assert all(len(f["content"].encode()) <= 20480 for f in finished)
    whole = "".join(f["content"] for f in finished)
    assert whole.replace(" ", "").replace("\n", "") == (
        "echo: LONG one " + "lorem ipsum dolor sit amet. " * 1800
    ).replace(" ", "").replace("\n", "")  # nothing cut, nothing lost
    assert fake.stream_frames(req)[0]["finish"] is True  # no placeholder when it is off


async def test_proactive_send_to_a_chat(node: Any, fake: FakeAIBotServer) -> None:
    d = await node()
    sink = d.sinks["botout"]
    assert isinstance(sink, WeComAIBotWSSink)
    env = make_envelope("alerts", Conversation("wrGroup1", "group"), "**disk** full")
    delivery = Delivery("dlv-1", "botout", env, "wrGroup1")
    got = await sink.send(delivery, send_ctx(d, delivery))
    assert got.startswith("aibot_send_msg_")
    assert fake.sent("wrGroup1") == [
        {"chatid": "wrGroup1", "msgtype": "markdown", "markdown": {"content": "**disk** full"}}
    ]
    # a retried delivery (same id) does not send again
    await d.redis.delete(d.bus.keys.parts("botout", "dlv-1"))
    assert await sink.send(delivery, send_ctx(d, delivery)) == got
    assert len(fake.sent("wrGroup1")) == 1


async def test_bad_secret_is_not_ready_and_says_why(node: Any, fake: FakeAIBotServer) -> None:
    d = await node(secret="wrong", wait=False)
    await wait_for(lambda: "853000" in (source(d).status or ""), timeout=5)
    assert await source(d).ready() == "subscribe refused: 853000 invalid bot_id or secret"
    assert "wrong" not in (await source(d).ready() or "")
    assert fake.subscriptions() == 0
    standby = await node(secret="wrong", wait=False)  # another instance says why too
    await asyncio.sleep(0.3)
    assert (
        await source(standby).ready()
        == "the holder: subscribe refused: 853000 invalid bot_id or secret (on t1)"
    )


async def test_malformed_frames_change_nothing(
    node: Any, fake: FakeAIBotServer, redis: Any, prefix: str
) -> None:
    d = await node()
    conn = fake.live()
    assert conn is not None
    for junk in (
        "not json",
        "[1, 2]",
        json.dumps({"cmd": "aibot_msg_callback", "headers": {"req_id": "r1"}}),  # no body
        json.dumps({"cmd": "aibot_msg_callback", "headers": {"req_id": "r2"}, "body": {"msgtype": "text"}}),
        json.dumps(
            {"cmd": "aibot_msg_callback", "body": {"msgid": "x", "from": {"userid": "u"}}}
        ),  # no req_id
        json.dumps({"headers": {"req_id": "nobody-asked"}, "errcode": 0}),
    ):
        await conn.ws.send_str(junk)
    # a raw control character inside the frame is stripped, as the SDK does
    body = {"msgid": "ctl-1", "aibotid": "bot1", "chattype": "single", "from": {"userid": "alice"},
            "msgtype": "text", "text": {"content": "fine after all"}}  # fmt: skip
    conn.inbound["r-ctl"] = ("message", "", "alice", time.time())
    frame = json.dumps({"cmd": "aibot_msg_callback", "headers": {"req_id": "r-ctl"}, "body": body})
    await conn.ws.send_str(frame.replace("fine", "fi\x01ne\x1f"))
    assert await answered(fake, "r-ctl") == ["echo: fine after all"]
    assert source(d).socket is not None and fake.subscriptions() == 1
    assert await redis.xlen(d.bus.keys.inbound) >= 1
    assert len(AgentSink.answered) == 1


def test_parse_frame_strips_control_characters() -> None:
    assert parse_frame('{"a":"x\x01y\x1f"}') == {"a": "xy"}
    assert parse_frame('{"a":"tab\tkept"}') == {"a": "tab\tkept"}
    assert parse_frame("[]") is None and parse_frame("{") is None


# -- dead-but-open sockets and late answers ------------------------------------------------------


async def test_unanswered_pings_lead_to_a_new_socket(node: Any, fake: FakeAIBotServer) -> None:
    d = await node()
    first = fake.live()
    assert first is not None
    fake.mute(first)
    await wait_for(lambda: fake.live() is not None and fake.live() is not first, timeout=5)
    await wait_for(lambda: source(d).socket is not None, timeout=5)
    req = await fake.push_message("still there?")
    assert await answered(fake, req) == ["echo: still there?"]


async def test_silence_past_the_bound_leads_to_a_new_socket(node: Any, fake: FakeAIBotServer) -> None:
    # pings every 0.3 s would be answered, but the bound (0.2 s of silence) is shorter than their interval
    d = await node(extra_in="silence_timeout = 0.2")
    first = fake.live()
    await wait_for(lambda: fake.live() is not None and fake.live() is not first, timeout=5)
    assert d.sources


async def test_a_lost_subscription_reconnects_and_the_late_answer_comes_by_send(
    node: Any, fake: FakeAIBotServer
) -> None:
    await node()
    first = fake.live()
    assert first is not None
    req = await fake.push_message("SLOW question")
    await wait_for(lambda: len(fake.stream_frames(req)) >= 1, timeout=5)  # the placeholder
    fake.lose_subscription(first)  # the socket stays open; the answer gets 846609
    [answer] = await answered(fake, req)
    assert answer == "echo: SLOW question"
    assert fake.sent("alice")[0]["markdown"]["content"] == "echo: SLOW question"
    assert fake.live() is not None and fake.live() is not first  # resubscribed on a new socket
    assert any(f.errcode == 846609 for f in fake.frames)


async def test_a_server_that_closes_mid_stream(node: Any, fake: FakeAIBotServer) -> None:
    await node()
    first = fake.live()
    assert first is not None
    fake.close_after(first, 1)  # closes right after acking the placeholder
    req = await fake.push_message("SLOW answer me")
    [answer] = await answered(fake, req)
    assert answer == "echo: SLOW answer me"
    [placeholder] = fake.stream_frames(req)  # the old socket took the placeholder only
    assert placeholder["content"] == "<think></think>" and placeholder["finish"] is False
    assert len(fake.sent("alice")) == 1


async def test_an_expired_stream_falls_back_to_a_proactive_message(node: Any, fake: FakeAIBotServer) -> None:
    await node()
    fake.stream_expiry = 0.5  # WeCom answers 846608 after this (6 min in production)
    req = await fake.push_message("SLOW and late")
    [answer] = await answered(fake, req)
    assert answer == "echo: SLOW and late"
    assert [m["markdown"]["content"] for m in fake.sent("alice")] == ["echo: SLOW and late"]
    assert any(f.errcode == 846608 for f in fake.frames)


# -- several instances ---------------------------------------------------------------------------


async def test_three_instances_one_socket_and_takeover(node: Any, fake: FakeAIBotServer) -> None:
    ds = [await node(), await node(), await node()]
    await asyncio.sleep(2.5)  # more than a lease ttl: a standby would have taken it if it could
    assert fake.subscriptions() == 1
    assert holders(ds) == [ds[0]]
    assert all([await source(d).ready() is None for d in ds])
    reqs = [await fake.push_message(f"q{i}") for i in range(3)]
    for i, r in enumerate(reqs):
        assert await answered(fake, r) == [f"echo: q{i}"]
    await ds[0].stop()  # a clean stop releases the lease: another takes over at once
    await wait_for(lambda: len(holders(ds[1:])) == 1, timeout=TAKEOVER * 3)
    assert fake.subscriptions() == 2
    req = await fake.push_message("after")
    assert await answered(fake, req) == ["echo: after"]
    await asyncio.sleep(0.5)
    assert len(holders(ds[1:])) == 1 and fake.subscriptions() == 2


async def test_standby_sends_through_the_holder(node: Any, fake: FakeAIBotServer) -> None:
    a = await node()
    b = await node()
    await asyncio.sleep(0.3)
    assert holders([a, b]) == [a]
    sink = b.sinks["botout"]
    assert isinstance(sink, WeComAIBotWSSink)
    env = make_envelope("alerts", Conversation("bob", "direct"), "from the standby")
    delivery = Delivery("dlv-standby", "botout", env, "bob")
    await sink.send(delivery, send_ctx(b, delivery))
    assert [m["markdown"]["content"] for m in fake.sent("bob")] == ["from the standby"]


async def test_kill_the_holder_process(
    node: Any, fake: FakeAIBotServer, write_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Three instances, the holder in its own process, killed with SIGKILL mid-answer: exactly one
    other instance connects, within the bound; every message is answered exactly once."""
    write_config(CONFIG.format(secret="secret-1", url=fake.url, extra_in="", extra=""), name="proc.toml")
    conf = tmp_path / "proc.toml"
    conf.write_text(conf.read_text().replace('instance = "t1"', 'instance = "proc"'))
    log = (tmp_path / "proc.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.aibot_ws_node", str(conf)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        await wait_for(lambda: fake.live() is not None, timeout=30)
        b = await node(wait=False)  # two in-process instances standing by
        c = await node(wait=False)
        await asyncio.sleep(0.5)
        assert fake.subscriptions() == 1 and holders([b, c]) == []
        first = await fake.push_message("before", msgid="k-1", user="u1")
        assert await answered(fake, first, "u1") == ["echo: before"]
        slow = await fake.push_message("SLOW during", msgid="k-2", user="u2")
        # and a batch in flight from other users, some of them in one group chat
        batch = [
            (await fake.push_message(f"SLOW batch {i}", msgid=f"k-b{i}", user=f"v{i}",
                                     chat="wrTeam" if i % 2 else None), "wrTeam" if i % 2 else f"v{i}")
            for i in range(6)
        ]  # fmt: skip
        await wait_for(lambda: all(fake.stream_frames(r) for r in [slow, *(r for r, _ in batch)]), timeout=5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        await wait_for(lambda: len(holders([b, c])) == 1, timeout=TAKEOVER * 5)
        await asyncio.sleep(0.5)
        assert fake.subscriptions() == 2 and len(holders([b, c])) == 1  # exactly one took over
        after = await fake.push_message("after", msgid="k-3", user="u3")
        assert await answered(fake, after, "u3") == ["echo: after"]
        # the answer the dead holder was writing comes by proactive send, once
        await wait_for(lambda: fake.answers(slow, "u2"), timeout=15)
        await asyncio.sleep(1.0)
        assert fake.answers(first, "u1") == ["echo: before"]
        assert fake.answers(slow, "u2") == ["echo: SLOW during"]
        assert fake.sent("u2") and fake.answers(after, "u3") == ["echo: after"]
        await wait_for(
            lambda: len(fake.sent("wrTeam")) >= 3 and all(fake.sent(f"v{i}") for i in (0, 2, 4)), timeout=15
        )
        await asyncio.sleep(0.5)
        team = sorted(m["markdown"]["content"] for m in fake.sent("wrTeam"))
        assert team == ["echo: SLOW batch 1", "echo: SLOW batch 3", "echo: SLOW batch 5"]  # each once
        for i in (0, 2, 4):
            assert fake.answers(batch[i][0], f"v{i}") == [f"echo: SLOW batch {i}"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


async def test_the_kick_loop_cannot_happen(node: Any, fake: FakeAIBotServer) -> None:
    """Another client subscribes the bot: every instance stays down and says why; nobody kicks back."""
    a = await node()
    b = await node()
    async with aiohttp.ClientSession() as s, s.ws_connect(fake.url) as other:
        await other.send_str(json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": "x"},
                                         "body": {"bot_id": "bot1", "secret": "secret-1"}}))  # fmt: skip
        assert json.loads((await other.receive()).data)["errcode"] == 0
        theirs = fake.conns[-1]
        await wait_for(lambda: holders([a, b]) == [], timeout=5)
        settled = fake.subscriptions()  # ours so far, and the other client's
        await asyncio.sleep(TAKEOVER + 0.5)  # b could have taken over by now
        assert fake.subscriptions() == settled  # nobody reconnected
        assert fake.live() is theirs  # the other client keeps the bot
        for d in (a, b):
            why = await source(d).ready()
            assert why is not None and why.startswith("kicked: disconnected_event at "), why
    await asyncio.sleep(0.5)  # the other client left: still nobody reconnects by itself
    assert fake.subscriptions() == settled


async def test_a_holder_that_loses_redis_closes_its_socket_and_another_takes_over(
    node: Any, fake: FakeAIBotServer, redis: Any
) -> None:
    a = await node()
    b = await node()
    first = fake.live()

    async def unreachable(*args: Any, **kw: Any) -> Any:
        raise ConnectionError("redis unreachable from this instance")

    lease = source(a).held.lease
    lease._renew = unreachable  # only the holder's lease calls fail: it cannot renew
    lease._acquire = unreachable
    await wait_for(
        lambda: source(a).socket is None, timeout=5
    )  # stops acting once its lease may have expired
    await wait_for(lambda: source(b).socket is not None, timeout=TAKEOVER * 5)
    assert first is not None and first.closed
    assert fake.subscriptions() == 2
    req = await fake.push_message("still answered")
    assert await answered(fake, req) == ["echo: still answered"]
    assert await redis.exists(source(a).kicked_key) == 0


async def test_a_handover_disconnected_event_is_not_a_kick(
    node: Any, fake: FakeAIBotServer, redis: Any
) -> None:
    """A holder whose lease moved on (it was paused) gets disconnected_event when the next holder
    subscribes: expected, not a kick — the fenced check says the lease is not ours any more."""
    a = await node()
    b = await node()
    sock = source(a).socket
    conn = fake.live()
    assert sock is not None and conn is not None
    await redis.set(source(a).held.lease.key, "someone-else|999", px=800)  # the lease moved on
    event = {"cmd": "aibot_event_callback", "headers": {"req_id": "kick-1"},
             "body": {"msgid": "kick-1", "aibotid": "bot1", "msgtype": "event",
                      "event": {"eventtype": "disconnected_event"}}}  # fmt: skip
    await conn.ws.send_str(json.dumps(event))
    await wait_for(lambda: sock.dead.is_set(), timeout=5)
    assert sock.why == "disconnected_event"  # it was the event, not the lease check, that closed it
    await asyncio.sleep(0.3)
    assert await redis.exists(source(a).kicked_key) == 0
    await wait_for(lambda: len(holders([a, b])) == 1, timeout=5)
    assert await source(a).ready() is None and await source(b).ready() is None
    req = await fake.push_message("who answers")
    assert await answered(fake, req) == ["echo: who answers"]


async def test_a_kick_while_holding_is_recorded_fenced(node: Any, fake: FakeAIBotServer, redis: Any) -> None:
    a = await node()
    sock = source(a).socket
    conn = fake.live()
    assert sock is not None and conn is not None
    event = {"cmd": "aibot_event_callback", "headers": {"req_id": "kick-2"},
             "body": {"msgid": "kick-2", "aibotid": "bot1", "msgtype": "event",
                      "event": {"eventtype": "disconnected_event"}}}  # fmt: skip
    await conn.ws.send_str(json.dumps(event))
    await wait_for(lambda: sock.dead.is_set(), timeout=5)
    assert sock.why == "disconnected_event"
    assert await redis.exists(source(a).kicked_key) == 1
    assert (await source(a).ready() or "").startswith("kicked: ")


# -- welcome and cards -----------------------------------------------------------------------------


async def test_static_welcome(node: Any, fake: FakeAIBotServer) -> None:
    await node(extra_in='welcome = "Hi, ask me anything"')
    ev = await fake.push_event("enter_chat")
    await wait_for(lambda: fake.replies("aibot_respond_welcome_msg"), timeout=5)
    [w] = fake.replies("aibot_respond_welcome_msg")
    assert w.req_id == ev and w.body == {"msgtype": "text", "text": {"content": "Hi, ask me anything"}}


async def test_welcome_routed_to_the_agent(node: Any, fake: FakeAIBotServer) -> None:
    await node(
        extra='[[routes]]\nname = "hello"\nfrom = "bot"\nto = "agent"\nreply = true\n[routes.match]\nkinds = ["event"]\n'
    )
    ev = await fake.push_event("enter_chat")
    await wait_for(lambda: fake.replies("aibot_respond_welcome_msg"), timeout=5)
    [w] = fake.replies("aibot_respond_welcome_msg")
    assert w.req_id == ev and w.body == {"msgtype": "text", "text": {"content": "echo: enter_chat"}}


async def test_card_out_click_in_and_update(node: Any, fake: FakeAIBotServer, redis: Any) -> None:
    card = {"card_type": "button_interaction", "main_title": {"title": "Deploy?"}, "task_id": "t-1",
            "button_list": [{"text": "Yes", "key": "deploy_yes"}]}  # fmt: skip
    extra = '[[routes]]\nname = "clicks"\nfrom = "bot"\nto = "agent"\nreply = true\n[routes.match]\nkinds = ["event"]\ntext = "^deploy_"\n'
    d = await node(extra=extra)
    # out: a card as a proactive message
    sink = d.sinks["botout"]
    assert isinstance(sink, WeComAIBotWSSink)
    env = make_envelope("ops", Conversation("alice", "direct"), "", meta={"template_card": json.dumps(card)})
    delivery = Delivery("dlv-card", "botout", env, "alice")
    await sink.send(delivery, send_ctx(d, delivery))
    assert fake.sent("alice") == [{"chatid": "alice", "msgtype": "template_card", "template_card": card}]
    # in: the click is an event envelope; the agent answers with an updated card (CARD in the text)
    updated = {**card, "button_list": [{"text": "Done", "key": "deploy_done", "style": 2}]}
    click = {"card_type": "button_interaction", "event_key": "deploy_yes CARD", "task_id": "t-1"}
    AgentSink.answered.clear()
    orig = AgentSink.send

    async def send(self: AgentSink, delivery: Delivery, ctx: SendContext) -> str:
        delivery.envelope.meta["card"] = json.dumps(updated)
        assert delivery.envelope.kind == "event" and delivery.envelope.event == "template_card_event"
        assert delivery.envelope.meta["task_id"] == "t-1"
        return await orig(self, delivery, ctx)

    AgentSink.send = send  # type: ignore[method-assign]
    try:
        ev = await fake.push_event("template_card_event", payload=click)
        await wait_for(lambda: fake.replies("aibot_respond_update_msg"), timeout=5)
    finally:
        AgentSink.send = orig  # type: ignore[method-assign]
    [u] = fake.replies("aibot_respond_update_msg")
    assert u.req_id == ev
    assert u.body == {"response_type": "update_template_card", "template_card": updated}


# -- configuration -------------------------------------------------------------------------------


async def test_config_errors_name_the_key(
    write_config: Callable[..., Config], agent_registry: Registry
) -> None:
    bad = CONFIG.format(secret="s", url="https://x", extra_in="", extra="")
    with pytest.raises(ConfigError, match=r"inbound\.bot\.url"):
        agent_registry.validate(write_config(bad))
    cfg = write_config(
        CONFIG.format(secret="s", url="ws://x", extra_in="", extra="").replace(
            'inbound = "bot"', 'inbound = "nope"'
        )
    )
    d = Daemon(cfg, agent_registry)
    with pytest.raises(ConfigError, match=r"outbound\.botout\.inbound"):
        await d.start()
    await d.stop()
    cfg = write_config(CONFIG.format(secret="", url="ws://x", extra_in="", extra=""))
    with pytest.raises(ConfigError, match=r"inbound\.bot\.secret"):
        agent_registry.validate(cfg)


def test_the_example_configs_sections_are_valid(tmp_path: Path) -> None:
    """config/bridge.example.toml ships both sections commented out: uncommented, they validate."""
    from bridge.config import load

    text = (ROOT / "config" / "bridge.example.toml").read_text()
    body = ""
    for head in ('# [[inbound]]\n# name = "aibot-ws"', '# [[outbound]]\n# name = "aibot-ws-out"'):
        start = text.index(head)
        block = text[start : text.index("\n\n", start)]
        body += "\n".join(line.removeprefix("# ") for line in block.splitlines()) + "\n"
    (tmp_path / "aibot-ws-secret").write_text("the-secret")
    cfg_file = tmp_path / "bridge.toml"
    cfg_file.write_text(body)
    cfg = load(cfg_file, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    opts = Registry.from_module("adapters").validate(cfg)
    assert opts["aibot-ws"].secret.reveal() == "the-secret"
    assert opts["aibot-ws"].url == "wss://openws.work.weixin.qq.com"
    assert opts["aibot-ws-out"].inbound == "aibot-ws"


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        ("{", "not JSON"),
        ('{"card_type": "poster"}', "card_type one of"),
        ('{"card_type": "text_notice", "main_title": {"title": "t"}}', "needs card_action"),
        (
            '{"card_type": "button_interaction", "button_list": [{"text": "a", "key": "k"}]}',
            "needs a task_id",
        ),
        ('{"card_type": "button_interaction", "task_id": "bad id!", "button_list": []}', "task_id: 1-128"),
        ('{"card_type": "button_interaction", "task_id": "t1", "button_list": []}', "1 to 6 buttons"),
        (
            '{"card_type": "button_interaction", "task_id": "t1", "button_list": [{"text": "a"}]}',
            "text and key",
        ),
    ],
)
async def test_a_card_wecom_would_refuse_is_refused_before_sending(
    node: Any, fake: FakeAIBotServer, card: str, reason: str
) -> None:
    d = await node()
    sink = d.sinks["botout"]
    env = make_envelope("ops", Conversation("alice", "direct"), "", meta={"template_card": card})
    delivery = Delivery("dlv-bad-card", "botout", env, "alice")
    with pytest.raises(PermanentError, match=reason):
        await sink.send(delivery, send_ctx(d, delivery))
    assert fake.replies() == []


async def test_only_proactive_messages_are_rate_limited(node: Any, fake: FakeAIBotServer) -> None:
    d = await node()
    sink = d.sinks["botout"]
    assert isinstance(sink, WeComAIBotWSSink)
    alert = Delivery("d1", "botout", make_envelope("ops", Conversation("alice"), "disk full"), "alice")
    [(key, rates)] = sink.recipient_limits(alert)
    assert key == "aibot_send_msg" and [str(r) for r in rates] == ["20/60s", "600/3600s"]
    req = await fake.push_message("hi")
    assert await answered(fake, req) == ["echo: hi"]
    origin = Origin("bot", Conversation("alice"), "e1")
    reply = make_envelope("agent", Conversation("alice"), "answer", kind="reply", origin=origin)
    assert sink.recipient_limits(Delivery("d2", "botout", reply, "alice")) == ()


async def test_a_bad_proactive_rate_names_the_key(
    write_config: Callable[..., Config], agent_registry: Registry
) -> None:
    cfg = write_config(CONFIG.format(secret="s", url="ws://x", extra_in="", extra="").replace(
        "timeout = 2\n", 'timeout = 2\nproactive_rate = "lots"\n'))  # fmt: skip
    with pytest.raises(ConfigError, match=r"outbound\.botout\.proactive_rate"):
        agent_registry.validate(cfg)
