"""Personal-WeChat groups through a real Wechaty puppet service, end to end.

The peer is the real ``wechaty-puppet-service`` with the official ``wechaty-puppet-mock`` behind it
(tests/e2e/puppet.py, tests/e2e/puppet_driver.mjs): a room "room1@chatroom" (topic "Team Room") with
the bot, Alice and Bob. The bridge talks to it over gRPC, TLS with the Wechaty community CA unless a
test says otherwise; the daemon runs in-process against the test Redis.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters.wechaty.sink import WechatySink
from adapters.wechaty.source import WechatySource
from bridge.config import load
from bridge.daemon import Daemon
from bridge.envelope import Attachment, Conversation, Envelope, decode_envelope, make_envelope
from tests.conftest import CollectSink, wait_for
from tests.e2e import puppet as pp
from tests.e2e.conftest import ROOT
from tests.e2e.puppet import ROOM, PuppetService

pytestmark = pytest.mark.e2e

CONFIG = """
[[inbound]]
name = "wx"
type = "wechaty"
endpoint = "{endpoint}"
token = "{token}"
tls = {tls}
reply_via = "wx_out"
reconnect_min = 0.2
reconnect_max = 1.0
lease_ttl = 2
timeout = 5
[[inbound]]
name = "man"
type = "manual"
[[outbound]]
name = "wx_out"
type = "wechaty"
inbound = "wx"
rate = "none"
per_conversation_rate = "none"
retry_base = 0.1
retry_max = 0.5
max_attempts = 20
timeout = 5
{sink_extra}
[[outbound]]
name = "c"
type = "collect"
[[routes]]
name = "ask"
from = "wx"
to = "{to}"
reply = true
[[routes]]
name = "events"
from = "wx"
to = "c"
match = {{ kinds = ["event"] }}
[[routes]]
name = "post"
from = "man"
to = {{ sink = "wx_out", conversation = "{room}" }}
"""


@pytest.fixture(scope="session")
def wechaty_peers() -> None:
    why = pp.ensure_installed()
    if why is not None:
        pytest.skip(
            "!!! Wechaty e2e tests SKIPPED: the npm peers (wechaty-puppet-service@1.19.9, "
            f"wechaty-puppet-mock@1.19.4, wechaty-puppet@1.21.3) are not installed in {pp.WECHATY_DIR} "
            f"and could not be installed: {why}"
        )


@pytest.fixture
async def services(wechaty_peers: None, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[PuppetService] = []

    async def start(*, tls: bool = True, auto_login: bool = True, token: str | None = None) -> PuppetService:
        svc = PuppetService(
            token or f"insecure_{uuid.uuid4()}", tls=tls, auto_login=auto_login,
            log=tmp_path / f"puppet-{len(started)}.log",
        )  # fmt: skip
        started.append(svc)
        await svc.start()
        return svc

    yield start
    for s in started:
        await s.stop()


@pytest.fixture
def wx_config(write_config: Any) -> Callable[..., Any]:
    def make(
        svc: PuppetService,
        *,
        token: str | None = None,
        to: str = "c",
        extra: str = "",
        name: str = "bridge.toml",
        sink_extra: str = "",
    ) -> Any:
        body = CONFIG.format(
            endpoint=svc.endpoint,
            token=token or svc.token,
            tls="true" if svc.tls else "false",
            to=to,
            room=ROOM,
            sink_extra=sink_extra,
        )
        # the file test's server is on loopback: the egress check must let the puppet fetch from it
        http = 'fetch_hosts = ["127.0.0.1"]\nfetch_private = ["127.0.0.0/8"]\n'
        return write_config(http + body + extra, name=name)

    return make


async def published(d: Daemon, source: str = "wx") -> list[Envelope]:
    assert d.redis is not None and d.bus is not None
    out = []
    for _, fields in await d.redis.xrange(d.bus.keys.inbound):
        env = decode_envelope(fields[b"e"])
        if env.source == source:
            out.append(env)
    return out


def wx(d: Daemon) -> WechatySource:
    src = d.sources["wx"]
    assert isinstance(src, WechatySource)
    return src


async def ready(d: Daemon) -> bool:
    return not await d.readiness()


async def test_a_room_message_with_a_mention_arrives_and_the_reply_mentions_the_asker(
    services: Any, wx_config: Any, start_daemon: Any
) -> None:
    svc: PuppetService = await services()
    d = await start_daemon(wx_config(svc))
    c = CollectSink.instances["c"]
    c.reply_text = "echo: {text}"
    await wait_for(lambda: ready(d), timeout=30)
    assert wx(d).self_id == "bot"

    await svc.say("@Bot how are the numbers?", mentions=["bot"], id="m-first")
    await wait_for(lambda: len(c.sent) == 1, timeout=20)
    env = c.sent[0].envelope
    assert env.source == "wx" and env.conversation == Conversation(ROOM, "group", "Team Room")
    assert env.sender is not None and (env.sender.id, env.sender.name) == ("alice", "Alice")
    assert env.text == "@Bot how are the numbers?" and env.mentions == ["bot"] and env.mentions_me
    assert env.meta["msg_type"] == "text" and env.meta["message_id"] == "m-first"

    # the reply goes home through reply_via, into the room, mentioning Alice
    reply = await svc.wait(lambda e: e.get("ev") == "message" and e.get("talker") == "bot", timeout=20)
    assert reply["room"] == ROOM and reply["mentions"] == ["alice"]
    assert reply["text"] == "@Alice echo: @Bot how are the numbers?"

    # the bot's own message came back on the Event stream and was not published
    await svc.say("a direct question", room=None, to="bot", id="m-direct")
    await wait_for(lambda: len(c.sent) == 2, timeout=20)
    direct = c.sent[1].envelope
    assert direct.conversation == Conversation("alice", "direct", "Alice") and direct.mentions_me
    answer = await svc.wait(
        lambda e: e.get("ev") == "message" and e.get("talker") == "bot" and e.get("listener") == "alice"
    )
    assert answer["text"] == "echo: a direct question" and answer["mentions"] == []
    await asyncio.sleep(1.0)
    assert [e.meta["message_id"] for e in await published(d)] == ["m-first", "m-direct"]
    assert len(c.sent) == 2


async def test_a_long_reply_is_split_and_mentions_once(
    services: Any, wx_config: Any, start_daemon: Any
) -> None:
    svc: PuppetService = await services()
    d = await start_daemon(wx_config(svc, sink_extra="max_bytes = 120"))
    c = CollectSink.instances["c"]
    words = " ".join(f"word{i}" for i in range(60))
    c.reply_text = words
    await wait_for(lambda: ready(d), timeout=30)
    await svc.say("@Bot tell me a lot", mentions=["bot"], id="m-long")
    await wait_for(lambda: len(svc.messages(talker="bot")) >= 2, timeout=20)
    await wait_for(lambda: "word59" in svc.messages(talker="bot")[-1]["text"], timeout=20)
    parts = svc.messages(talker="bot")
    assert all(len(p["text"].encode()) <= 120 for p in parts)
    assert parts[0]["text"].startswith("@Alice (1/") and parts[0]["mentions"] == ["alice"]
    assert all(p["mentions"] == [] and not p["text"].startswith("@") for p in parts[1:])
    n = len(parts)
    assert [p["text"].split(" ", 2)[1 if i == 0 else 0] for i, p in enumerate(parts)] == [
        f"({i}/{n})" for i in range(1, n + 1)
    ]
    body = " ".join(p["text"].split(" ", 2 if i == 0 else 1)[-1] for i, p in enumerate(parts))
    assert body.split() == words.split()


async def test_mention_reply_can_be_turned_off(services: Any, wx_config: Any, start_daemon: Any) -> None:
    svc: PuppetService = await services()
    d = await start_daemon(wx_config(svc, sink_extra="mention_reply = false"))
    CollectSink.instances["c"].reply_text = "noted: {text}"
    await wait_for(lambda: ready(d), timeout=30)
    await svc.say("@Bot remember the milk", mentions=["bot"], id="m-quiet")
    reply = await svc.wait(lambda e: e.get("ev") == "message" and e.get("talker") == "bot", timeout=20)
    assert (
        reply["room"] == ROOM and reply["mentions"] == [] and reply["text"] == "noted: @Bot remember the milk"
    )


async def test_room_join_leave_and_topic_are_events(services: Any, wx_config: Any, start_daemon: Any) -> None:
    svc: PuppetService = await services(tls=False)  # a plaintext service: tls = false
    d = await start_daemon(wx_config(svc))
    c = CollectSink.instances["c"]
    await wait_for(lambda: ready(d), timeout=30)
    await svc.send(op="join", room=ROOM, who=["carol"], by="alice")
    await svc.send(op="leave", room=ROOM, who=["carol"], by="alice")
    await svc.send(op="topic", room=ROOM, text="Numbers Room", by="bob")
    await wait_for(lambda: len(c.sent) == 3, timeout=20)
    join, leave, topic = (x.envelope for x in c.sent)
    assert (join.kind, join.event, join.meta["invitees"], join.meta["inviter"]) == (
        "event",
        "room_join",
        "carol",
        "alice",
    )
    assert join.conversation == Conversation(ROOM, "group", "Team Room")
    assert (leave.event, leave.meta["removees"]) == ("room_leave", "carol")
    assert (topic.event, topic.meta["old_topic"], topic.meta["new_topic"]) == (
        "room_topic",
        "Team Room",
        "Numbers Room",
    )
    assert topic.conversation.title == "Numbers Room"
    # the next message carries the new topic (the cached room was dropped)
    await svc.say("after the rename", id="m-renamed")
    await wait_for(lambda: len(c.sent) == 4, timeout=20)
    assert c.sent[3].envelope.conversation.title == "Numbers Room"


class FileServer:
    """A local HTTP server the puppet fetches a URL FileBox from."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.fetched: list[str] = []

    async def start(self) -> None:
        async def get(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            self.fetched.append(name)
            if name not in self.files:
                return web.Response(status=404)
            return web.Response(body=self.files[name], content_type="application/octet-stream")

        app = web.Application()
        app.router.add_get("/files/{name}", get)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_a_file_goes_both_ways(services: Any, wx_config: Any, start_daemon: Any) -> None:
    svc: PuppetService = await services()
    d = await start_daemon(wx_config(svc))
    c = CollectSink.instances["c"]
    await wait_for(lambda: ready(d), timeout=30)

    # in: a file in the room → an attachment reference (name, size, type; no bytes: no media store yet)
    data = b"quarter,revenue\nQ1,100\nQ2,140\n"
    await svc.send(
        op="file",
        **{"from": "alice"},
        room=ROOM,
        name="numbers.csv",
        base64=base64.b64encode(data).decode(),
        id="m-file",
    )
    await wait_for(lambda: len(c.sent) == 1, timeout=20)
    env = c.sent[0].envelope
    assert env.meta["msg_type"] == "attachment" and env.text == ""
    [att] = env.attachments
    assert (att.kind, att.name, att.size, att.media_id) == ("file", "numbers.csv", len(data), "m-file")
    assert att.mime == "text/csv" and att.extra["filebox_type"] == "base64"
    assert base64.b64encode(data).decode() not in str(env.attachments)

    # out: an envelope with a URL attachment → text, then a URL FileBox the puppet fetches
    files = FileServer({"notes.txt": b"meeting notes: ship it\n"})
    await files.start()
    try:
        assert d.bus is not None
        out = make_envelope(
            "man", Conversation("ops"), "the notes",
            attachments=[Attachment("file", url=f"{files.url}/files/notes.txt", name="notes.txt"),
                         Attachment("image", media_id="no-url-here")],
        )  # fmt: skip
        await d.bus.publish(out)
        got = await svc.wait(
            lambda e: e.get("ev") == "message" and e.get("talker") == "bot" and "file" in e, timeout=30
        )
        assert got["room"] == ROOM and got["file"] == {
            "name": "notes.txt",
            "base64": base64.b64encode(b"meeting notes: ship it\n").decode(),
        }
        [text] = svc.messages(talker="bot", text="the notes")
        assert text["room"] == ROOM and text["mentions"] == []
        assert files.fetched == ["notes.txt"]
        # a URL the egress rule refuses (the cloud metadata address) is never handed to the puppet
        bad = make_envelope(
            "man",
            Conversation("ops"),
            "",
            attachments=[Attachment("file", url="http://169.254.169.254/latest")],
        )
        await d.bus.publish(bad)
        assert d.redis is not None

        async def dead() -> list[Any]:
            return [f for _, f in await d.redis.xrange(d.bus.keys.dead)]

        await wait_for(lambda: dead(), timeout=20)
        [letter] = await dead()
        assert b"refused" in letter[b"reason"] and b"latest" in letter[b"reason"]
        assert len(svc.messages(talker="bot")) == 2
    finally:
        await files.stop()


async def test_killing_and_restarting_the_service_recovers_without_duplicates(
    services: Any, wx_config: Any, start_daemon: Any
) -> None:
    svc: PuppetService = await services()
    d = await start_daemon(wx_config(svc))
    c = CollectSink.instances["c"]
    await wait_for(lambda: ready(d), timeout=30)
    await svc.say("before the crash", id="m-before")
    await wait_for(lambda: len(c.sent) == 1, timeout=20)

    await svc.kill()
    await wait_for(lambda: wx(d).status.state == "unreachable", timeout=20)
    assert not await ready(d)
    why = (await d.readiness())["wx"]
    assert "unreachable" in why

    await svc.start()  # a new service on the same port: the bridge calls Start again, LOGIN replays
    await wait_for(lambda: ready(d), timeout=30)
    # a puppet that sends a message again after a reconnect (same id): published once
    await svc.say("before the crash", id="m-before")
    await svc.send(op="replay", id="m-before")
    await svc.say("after the restart", id="m-after")
    await wait_for(lambda: len(c.sent) == 2, timeout=20)
    await asyncio.sleep(1.0)
    assert [e.meta["message_id"] for e in await published(d)] == ["m-before", "m-after"]
    assert [x.envelope.text for x in c.sent] == ["before the crash", "after the restart"]


async def test_a_wrong_token_fails_readiness_with_a_masked_message(
    services: Any, wx_config: Any, start_daemon: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    svc: PuppetService = await services()
    wrong = f"insecure_wrong-{uuid.uuid4().hex}"
    d = await start_daemon(wx_config(svc, token=wrong))
    await wait_for(lambda: wx(d).status.state == "refused", timeout=30)
    problems = await d.readiness()
    assert "refused the token" in problems["wx"] and "UNAUTHENTICATED" in problems["wx"]
    assert wrong not in problems["wx"] and wrong.split("_", 1)[1] not in problems["wx"]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/readyz") as r:
        body = await r.text()
    assert r.status == 503 and "refused the token" in body and wrong.split("_", 1)[1] not in body
    out, err = capfd.readouterr()
    assert "wechaty.refused" in out + err
    assert wrong.split("_", 1)[1] not in out + err


async def test_two_instances_share_one_event_stream(services: Any, wx_config: Any, start_daemon: Any) -> None:
    svc: PuppetService = await services()
    d1 = await start_daemon(wx_config(svc))
    cfg2 = wx_config(svc, name="bridge2.toml")
    cfg2.bridge.instance = "t2"
    d2 = await start_daemon(cfg2)
    await wait_for(lambda: wx(d1).held.held or wx(d2).held.held, timeout=20)
    holder, other = (d1, d2) if wx(d1).held.held else (d2, d1)
    await wait_for(lambda: ready(holder), timeout=30)
    await wait_for(lambda: ready(other), timeout=10)  # readiness is shared through Redis
    assert not wx(other).held.held
    await asyncio.sleep(3 * 2 + 1)  # longer than the recorded status lives without a refresh
    assert await ready(other), await other.readiness()

    # a send from the instance that does not hold the stream reaches the room through the holder
    sink = other.sinks["wx_out"]
    assert isinstance(sink, WechatySink)
    answer = await sink.source.held.call(
        "send_text",
        {"conversation": ROOM, "text": "relayed", "mentions": ["bob"]},
        request_id="t-relay-1",
        timeout=10,
    )
    assert answer["id"]
    [m] = svc.messages(talker="bot", text="@Bob relayed")
    assert m["mentions"] == ["bob"]

    await svc.say("one stream, published once", id="m-shared")
    sinks = [d.sinks["c"] for d in (d1, d2)]
    assert all(isinstance(s, CollectSink) for s in sinks)
    await wait_for(lambda: sum(len(s.sent) for s in sinks) >= 1, timeout=20)
    await asyncio.sleep(0.5)
    assert sum(len(s.sent) for s in sinks) == 1
    assert [e.meta["message_id"] for e in await published(d1)] == ["m-shared"]

    # the holder stops: the other takes the stream over
    await holder.stop()
    await wait_for(lambda: wx(other).held.held, timeout=20)
    await wait_for(lambda: wx(other).status.state == "logged_in", timeout=20)
    await svc.say("after the take-over", id="m-taken")
    await wait_for(lambda: _has(other, "m-taken"), timeout=20)
    assert [e.meta["message_id"] for e in await published(other)] == ["m-shared", "m-taken"]


async def _has(d: Daemon, message_id: str) -> bool:
    return any(e.meta.get("message_id") == message_id for e in await published(d))


async def test_the_login_command_shows_the_qr_code_and_waits_for_the_login(
    services: Any, wx_config: Any, tmp_path: Path
) -> None:
    svc: PuppetService = await services(auto_login=False)
    cfg = wx_config(svc)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "wechaty", "login", "--config", str(cfg.path), "--timeout", "60",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not any("(the link in it:" in x for x in lines):
            line = (await proc.stdout.readline()).decode()
            assert line, (
                f"the command ended early: {lines}, {(await proc.stderr.read()).decode() if proc.stderr else ''}"
            )
            lines.append(line)
    text = "".join(lines)
    assert "Scan this QR code" in text and "https://login.example.invalid/qr/" in text
    assert "▀" in text or "▄" in text  # the terminal QR code
    await svc.send(op="login")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "logged in as bot (Bot)" in out.decode()


async def test_a_room_asks_openclaw_and_the_answer_comes_back_into_the_room(
    services: Any, wx_config: Any, start_daemon: Any, gateway: Any
) -> None:
    """Wechaty room → the real OpenClaw gateway (fake LLM behind it) → the same room."""
    svc: PuppetService = await services()
    claw = f"""
[[outbound]]
name = "claw"
type = "openclaw"
url = "{gateway.url}"
token = "{gateway.token}"
agent = "wechat"
retry_base = 0.5
retry_max = 2
max_attempts = 4
"""
    d = await start_daemon(wx_config(svc, to="claw", extra=claw))
    await wait_for(lambda: ready(d), timeout=30)
    await svc.say("@Bot what is the plan for today?", mentions=["bot"], id="m-claw")
    answer = await svc.wait(lambda e: e.get("ev") == "message" and e.get("talker") == "bot", timeout=120)
    assert answer["room"] == ROOM and answer["mentions"] == ["alice"]
    assert answer["text"].startswith("@Alice echo: ") and "what is the plan for today?" in answer["text"]
    # one turn, one answer: nothing else came back into the room
    await asyncio.sleep(1.0)
    assert len(svc.messages(talker="bot")) == 1


async def test_the_login_command_follows_a_running_bridge(
    services: Any, wx_config: Any, start_daemon: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bridge holds the one Event stream: the command shows the QR code the bridge recorded."""
    svc: PuppetService = await services(auto_login=False)
    cfg = wx_config(svc)
    d = await start_daemon(cfg)
    await wait_for(lambda: wx(d).status.state == "scan", timeout=30)
    assert "scan" in (await d.readiness())["wx"]
    logged = "".join(capfd.readouterr())
    # the bridge's own log: the link, and the QR code as text in the qr field
    assert "wechaty.scan" in logged and "qrcode=https://login.example.invalid/qr/" in logged
    assert "qr='" in logged and "▀" in logged
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "wechaty", "login", "--config", str(cfg.path), "--timeout", "60",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not any("(the link in it:" in x for x in lines):
            line = (await proc.stdout.readline()).decode()
            assert line, f"the command ended early: {lines}"
            lines.append(line)
    text = "".join(lines)
    assert "a running bridge holds the service's Event stream" in text
    assert "https://login.example.invalid/qr/" in text
    await svc.send(op="login")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "logged in as bot (Bot)" in out.decode()
    await wait_for(lambda: ready(d), timeout=10)


async def test_access_policies_and_session_commands_hold_for_wechaty(
    services: Any, wx_config: Any, start_daemon: Any
) -> None:
    """What the core gives every inbound works here too: a DM refused by policy never reaches a sink,
    and a session command in the room is answered by the bridge itself, never reaching the agent."""
    svc: PuppetService = await services()
    cfg = wx_config(svc)
    access = '[inbound.access]\ndm_policy = "disabled"\ngroup_policy = "open"\nadmins = ["alice"]\n'
    text = cfg.path.read_text().replace('[[inbound]]\nname = "man"', access + '[[inbound]]\nname = "man"', 1)
    cfg.path.write_text(text)

    d = await start_daemon(load(cfg.path, env=dict(os.environ)))
    c = CollectSink.instances["c"]
    await wait_for(lambda: ready(d), timeout=30)

    await svc.say("let me in", frm="bob", room=None, to="bot", id="m-dm")  # refused: DMs disabled
    await svc.say("@Bot /status", mentions=["bot"], id="m-cmd")  # answered by the bridge
    await svc.say("@Bot hello", mentions=["bot"], id="m-ask")  # goes to the agent
    await wait_for(lambda: len(c.sent) == 1, timeout=20)
    answer = await svc.wait(
        lambda e: e.get("ev") == "message" and e.get("talker") == "bot" and e.get("room") == ROOM, timeout=20
    )
    assert f"Conversation {ROOM} (group), session #0." in answer["text"]  # the bridge's own /status
    await asyncio.sleep(1.0)
    assert [s.envelope.meta["message_id"] for s in c.sent] == ["m-ask"]  # no DM, no command
    assert not any(e.get("listener") == "bob" for e in svc.events)  # the refused DM got no answer
