"""WeChat → a real OpenClaw gateway → WeChat, end to end.

A message enters through the real WeCom inbound path (a signed, encrypted callback built by
``wechat-bridge simulate``, posted to the daemon's HTTP endpoint), is stored and routed to the
``openclaw`` sink, which runs a turn of the gateway's ``wechat`` agent over the WebSocket protocol
(or HTTP); the agent's answer comes back as a reply envelope and leaves through the ``wecom_app``
sink to the fake WeCom API: ``appchat/send`` for a group, ``message/send`` for a member. The only
stand-ins are the LLM behind the gateway (tests/fakes/fake_llm.py, which echoes what it was given
and how many user turns it saw) and WeCom's HTTP API (tests/fakes/wecom_api.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from adapters.openclaw.sink import OpenClawSink
from adapters.wechat import simulate as sim
from bridge.bus import Field
from bridge.daemon import Daemon
from bridge.dead import DeadLetters
from bridge.envelope import decode_delivery, stable_id
from tests.conftest import wait_for
from tests.e2e.conftest import Gateway
from tests.fakes.fake_llm import answer_for
from tests.fakes.wecom_api import FakeWeComAPI

pytestmark = pytest.mark.e2e

WX_TOKEN = "bridgeE2eToken"
AES_KEY = "d2VjaGF0LWJyaWRnZSB0ZXN0IGtleSAzMiBieXRlcyE"
CORP = "wwfakecorp0001"

CONFIG = """
[[inbound]]
name = "app"
type = "wecom_app"
path = "/wecom/app"
token = "{wx_token}"
encoding_aes_key = "{aes}"
corp_id = "{corp}"
reply_via = "wecom"
[[inbound]]
name = "bot"
type = "wecom_aibot"
path = "/wecom/bot"
token = "{wx_token}"
encoding_aes_key = "{aes}"
stream = false
reply_via = "wecom"
[[inbound]]
name = "streambot"
type = "wecom_aibot"
path = "/wecom/streambot"
token = "{wx_token}"
encoding_aes_key = "{aes}"
reply_via = "aibot_reply"
[[outbound]]
name = "wecom"
type = "wecom_app"
corp_id = "{corp}"
corp_secret = "fake-corp-secret"
agent_id = 1000002
api_base = "{fake}"
retry_base = 0.05
retry_max = 0.5
[[outbound]]
name = "aibot_reply"
type = "wecom_aibot"
poll_interval = 0.05
[[outbound]]
name = "claw"
type = "openclaw"
url = "{url}"
token = "{token}"
agent = "wechat"
retry_base = 0.5
retry_max = 2
max_attempts = {attempts}
{extra}
[[routes]]
name = "ai"
from = ["app", "bot", "streambot"]
to = "claw"
reply = true
"""


@dataclass
class Loop:
    """A daemon wired to the gateway and the fake WeCom API."""

    d: Daemon
    fake: FakeWeComAPI
    gw: Gateway
    base: str

    @property
    def sink(self) -> OpenClawSink:
        s = self.d.sinks["claw"]
        assert isinstance(s, OpenClawSink)
        return s

    async def simulate(self, inbound: str, text: str, *args: str) -> int:
        p = argparse.ArgumentParser()
        sim.configure(p)
        return await sim.simulate(p.parse_args(["--inbound", inbound, "--text", text, *args]), self.d.config)

    async def member(self) -> str:
        user = "u" + uuid.uuid4().hex[:10]
        self.fake.add_user(user)
        return user

    async def group(self, chatid: str | None = None) -> str:
        """A group chat the app created (so appchat/send may post to it)."""
        chatid = chatid or "wr" + uuid.uuid4().hex[:12]
        async with aiohttp.ClientSession() as s:
            async with s.get(
                self.base + "/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": "fake-corp-secret"}
            ) as r:
                token = (await r.json())["access_token"]
            body = {
                "chatid": chatid,
                "name": f"group {chatid}",
                "owner": "alice",
                "userlist": ["alice", "bob"],
            }
            async with s.post(
                self.base + "/cgi-bin/appchat/create", params={"access_token": token}, json=body
            ) as r:
                answer = await r.json()
                assert answer["errcode"] == 0, answer
        return chatid

    def replies(self, target: str) -> list[str]:
        return [c or "" for c in self.fake.contents(target)]

    async def reply(self, target: str, n: int = 1, timeout: float = 60.0) -> str:
        await wait_for(lambda: len(self.fake.delivered_to(target)) >= n, timeout=timeout, every=0.1)
        return self.replies(target)[n - 1]

    def llm_calls(self, needle: str) -> int:
        return sum(1 for r in self.gw.llm.requests() if any(needle in t for t in r["user_texts"][-1:]))

    async def dead(self) -> list[dict[bytes, bytes]]:
        assert self.d.redis is not None and self.d.bus is not None
        return [f for _, f in await self.d.redis.xrange(self.d.bus.keys.dead)]

    async def drained(self, sink: str = "claw") -> bool:
        assert self.d.redis is not None and self.d.bus is not None
        return await self.d.bus.out_pending(sink) == 0


@pytest.fixture
async def make_loop(redis: Any, gateway: Gateway, write_config: Any, start_daemon: Any) -> AsyncIterator[Any]:
    fakes: list[FakeWeComAPI] = []

    async def make(*, token: str | None = None, extra: str = "", attempts: int = 4) -> Loop:
        fake = FakeWeComAPI()
        fakes.append(fake)
        base = await fake.start()
        cfg = write_config(
            CONFIG.format(
                wx_token=WX_TOKEN, aes=AES_KEY, corp=CORP, fake=base, url=gateway.url,
                token=token or gateway.token, extra=extra, attempts=attempts,
            )
        )  # fmt: skip
        d = await start_daemon(cfg)
        d.config.http.listen = f"127.0.0.1:{d.port}"  # where simulate posts
        return Loop(d, fake, gateway, base)

    yield make
    for f in fakes:
        await f.stop()


async def test_a_member_asks_and_the_answer_comes_back_by_message_send(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    user = await loop.member()
    assert await loop.simulate("app", "hello agent, what time is it?", "--from", user) == 0
    answer = await loop.reply(user)
    assert answer == f"echo: {user}: hello agent, what time is it? | users=1 | prev=-"
    [send] = [r for r in loop.fake.sent("/message/send") if r.json and r.json.get("touser") == user]
    assert send.errcode == 0 and send.json["agentid"] == 1000002
    assert loop.fake.sent("/appchat/send") == []
    # the agent used for WeChat runs with the restricted tools docs/openclaw.md recommends
    [req] = [r for r in loop.gw.llm.requests() if any("hello agent" in t for t in r["user_texts"])]
    assert not {"exec", "write", "edit", "apply_patch", "process"} & set(req["tools"]), req["tools"]


async def test_a_long_answer_comes_home_whole_in_numbered_parts(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    group = await loop.group()
    assert await loop.simulate("bot", "tell me everything LONG6000", "--chat", group, "--from", "dave") == 0
    # "drained" is also true before the first entry is read: wait for the answer's first part first
    await wait_for(lambda: loop.fake.delivered_to(group), timeout=60)
    await wait_for(loop.drained, timeout=60)
    await wait_for(lambda: loop.drained("wecom"), timeout=30)
    parts = loop.fake.delivered_to(group)
    assert len(parts) >= 3 and all(not p.truncated for p in parts)
    assert all(len((p.content or "").encode()) <= 2048 for p in parts)
    n = len(parts)
    bodies = [re.sub(rf"^\({i}/{n}\)\n", "", p.content or "") for i, p in enumerate(parts, 1)]
    whole = answer_for([f"dave in {group}: tell me everything LONG6000"])
    assert "".join(bodies) == whole and len(whole) >= 6000


async def test_group_turns_share_a_session_and_groups_do_not(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    group_a = await loop.group()
    group_b = await loop.group()
    group_a_upper = await loop.group(group_a.upper().replace("WR", "wr", 1))  # differs only in case
    assert await loop.simulate("bot", "first question", "--chat", group_a, "--from", "alice") == 0
    first = await loop.reply(group_a)
    assert first == f"echo: alice in {group_a}: first question | users=1 | prev=-"
    assert await loop.simulate("bot", "second question", "--chat", group_a, "--from", "bob") == 0
    second = await loop.reply(group_a, 2)
    assert second == (
        f"echo: bob in {group_a}: second question | users=2 | prev=alice in {group_a}: first question"
    )
    assert await loop.simulate("bot", "other group", "--chat", group_b, "--from", "alice") == 0
    assert await loop.reply(group_b) == f"echo: alice in {group_b}: other group | users=1 | prev=-"
    assert await loop.simulate("bot", "same letters", "--chat", group_a_upper, "--from", "alice") == 0
    assert (await loop.reply(group_a_upper)).endswith("| users=1 | prev=-")
    sends = loop.fake.sent("/appchat/send")
    assert sorted(r.json["chatid"] for r in sends) == sorted([group_a, group_a, group_b, group_a_upper])
    assert all(r.errcode == 0 for r in sends)
    assert [r for r in loop.fake.sent("/message/send")] == []


async def test_a_retried_delivery_does_not_run_the_agent_twice(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    user = await loop.member()
    # WeChat's own retry of the callback (same MsgId) is published once
    for _ in range(3):
        assert await loop.simulate("app", "only once please", "--from", user, "--msgid", "4242424242") == 0
    await loop.reply(user)
    await wait_for(loop.drained)
    assert loop.llm_calls("only once please") == 1
    # the runner gets the same delivery again with its done marker gone (a crash between the send
    # and the marker, or `dead replay`): the sink finds the answer in the session's history
    assert loop.d.redis is not None and loop.d.bus is not None
    [(_, fields)] = [e for s in loop.d.bus.out_streams("claw") for e in await loop.d.redis.xrange(s)]
    delivery = decode_delivery(fields[Field.DELIVERY.key])
    await loop.d.redis.delete(loop.d.bus.keys.mark("claw", delivery.id))
    await loop.d.redis.xadd(loop.d.bus.keys.out("claw"), {Field.DELIVERY: fields[Field.DELIVERY.key]})
    await wait_for(lambda: loop.d.redis.get(loop.d.bus.keys.mark("claw", delivery.id)))  # type: ignore[union-attr]
    await wait_for(loop.drained)
    await asyncio.sleep(1.0)
    assert loop.llm_calls("only once please") == 1
    assert len(loop.fake.delivered_to(user)) == 1
    assert await loop.dead() == []


async def test_a_dropped_connection_mid_run_resends_under_the_same_key(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    user = await loop.member()
    assert await loop.simulate("app", "slow answer SLOW3", "--from", user) == 0
    await wait_for(lambda: loop.llm_calls("slow answer SLOW3") == 1, timeout=30)
    client = loop.sink.client
    assert client is not None and client.conn is not None
    before = client.connects
    await client.conn.ws.close()  # the bridge's side of the socket drops; the gateway keeps running
    answer = await loop.reply(user, timeout=60)
    assert answer == f"echo: {user}: slow answer SLOW3 | users=1 | prev=-"
    assert client.connects > before
    await wait_for(loop.drained)
    assert loop.llm_calls("slow answer SLOW3") == 1
    assert len(loop.fake.delivered_to(user)) == 1


@pytest.mark.timeout(300)
async def test_a_gateway_restart_mid_run_ends_with_exactly_one_reply(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    group = await loop.group()
    assert await loop.simulate("bot", "interrupted SLOW6", "--chat", group, "--from", "carol") == 0
    await wait_for(lambda: loop.llm_calls("interrupted SLOW6") == 1, timeout=30)
    await asyncio.sleep(1.0)  # the model is answering, the user message is in the transcript
    took = await asyncio.to_thread(loop.gw.restart, kill=True)  # a crash: the run is cut off
    answer = await loop.reply(group, timeout=150)
    await wait_for(loop.drained, timeout=30)
    await asyncio.sleep(3.0)  # nothing else arrives
    assert len(loop.fake.delivered_to(group)) == 1, loop.replies(group)
    assert "interrupted SLOW6" in answer
    # the first run (cut off) and the gateway's own re-run of the interrupted turn; never a third
    assert loop.llm_calls("interrupted SLOW6") <= 2
    assert await loop.dead() == []
    assert took < 120


@pytest.mark.timeout(300)
async def test_a_gateway_crash_right_after_accepting_a_turn_still_ends_with_one_reply(make_loop: Any) -> None:
    """Killed before the turn reached the transcript: the gateway refuses the old key after its restart
    ("Pending input ownership ended") and re-runs nothing, so the sink asks again under a new key."""
    loop: Loop = await make_loop()
    user = await loop.member()
    assert loop.d.redis is not None and loop.d.bus is not None
    pattern = loop.d.bus.keys.state("claw", "run:*")

    async def sending() -> bool:  # the sink writes its run state right before it sends the turn
        assert loop.d.redis is not None
        return await _any(loop.d.redis.scan_iter(match=pattern))

    assert await loop.simulate("app", "early crash SLOW2", "--from", user) == 0
    await wait_for(sending, timeout=30, every=0.01)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(loop.gw.restart, kill=True)
    answer = await loop.reply(user, timeout=150)
    await wait_for(loop.drained, timeout=30)
    await asyncio.sleep(3.0)
    assert len(loop.fake.delivered_to(user)) == 1, loop.replies(user)
    assert "early crash SLOW2" in answer
    assert loop.llm_calls("early crash SLOW2") <= 2
    assert await loop.dead() == []


async def _any(it: Any) -> bool:
    async for _ in it:
        return True
    return False


async def test_a_failed_run_is_dead_lettered_with_the_gateways_reason(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    user = await loop.member()
    assert await loop.simulate("app", "this will FAIL400", "--from", user) == 0
    await wait_for(loop.dead, timeout=60)
    [dead] = await loop.dead()
    reason = dead[Field.REASON.key].decode()
    assert reason.startswith("permanent: the agent run failed"), reason
    assert "LLM request failed" in reason
    assert loop.fake.delivered_to(user) == []
    assert loop.llm_calls("this will FAIL400") == 1
    # `wechat-bridge dead replay` runs the turn afresh (not the gateway's cached failure)
    bus = loop.d.bus
    assert bus is not None
    dead_letters = DeadLetters(loop.d.redis, bus.keys, stream_of=bus.stream_of)  # to its partition
    replayed = await dead_letters.replay(
        await dead_letters.oldest(), {o.name for o in loop.d.config.outbound}
    )
    assert len(replayed.replayed) == 1 and not replayed.skipped
    await wait_for(lambda: loop.llm_calls("this will FAIL400") == 2, timeout=60)
    await wait_for(loop.dead, timeout=60)
    [again] = await loop.dead()
    assert again[Field.REASON.key].decode() == reason
    assert loop.fake.delivered_to(user) == []


async def test_a_bad_token_is_permanent_and_readiness_says_why(make_loop: Any) -> None:
    loop: Loop = await make_loop(token="not-the-gateway-token-0123456789abcdef")
    await wait_for(lambda: loop.sink.client is not None and loop.sink.client.problem is not None, timeout=20)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{loop.d.port}/readyz") as r:
        assert r.status == 503
        body = await r.json()
    why = body["not_ready"]["claw"]
    assert "refused the credentials" in why and "AUTH_TOKEN_MISMATCH" in why
    assert "not-the-gateway-token" not in why
    user = await loop.member()
    assert await loop.simulate("app", "nobody hears me", "--from", user) == 0
    await wait_for(loop.dead, timeout=30)
    [dead] = await loop.dead()
    assert dead[Field.REASON.key].decode().startswith("permanent: the gateway refused the credentials")
    assert dead[b"attempts"] == b"1"


async def test_a_message_over_the_gateways_max_payload_is_refused_before_sending(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    client = loop.sink.client
    assert client is not None
    conn = await client.connection(10)
    conn.hello["policy"]["maxPayload"] = 2048  # as a gateway configured with a small frame limit says
    user = await loop.member()
    assert await loop.simulate("app", "x" * 3000, "--from", user) == 0
    await wait_for(loop.dead, timeout=30)
    [dead] = await loop.dead()
    reason = dead[Field.REASON.key].decode()
    assert reason.startswith("permanent: the message is too large for the gateway: the request is "), reason
    assert reason.endswith("bytes, over the gateway's policy.maxPayload of 2048 bytes")
    assert loop.llm_calls("x" * 100) == 0
    assert client.conn is conn and not conn.closed  # nothing was sent: the gateway did not close on us


async def test_http_mode_keeps_the_session_and_replies_home(make_loop: Any) -> None:
    loop: Loop = await make_loop(extra='mode = "http"')
    user = await loop.member()
    assert await loop.simulate("app", "over http", "--from", user) == 0
    assert await loop.reply(user) == f"echo: {user}: over http | users=1 | prev=-"
    assert await loop.simulate("app", "again over http", "--from", user) == 0
    assert await loop.reply(user, 2) == f"echo: {user}: again over http | users=2 | prev={user}: over http"


async def test_http_mode_with_a_bad_token_is_not_ready_and_dead_letters(make_loop: Any) -> None:
    loop: Loop = await make_loop(token="not-the-gateway-token-0123456789abcdef", extra='mode = "http"')
    await wait_for(lambda: loop.sink._http_problem is not None, timeout=20)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{loop.d.port}/readyz") as r:
        assert r.status == 503
        assert "refused the credentials (HTTP 401" in (await r.json())["not_ready"]["claw"]
    user = await loop.member()
    assert await loop.simulate("app", "nobody hears me", "--from", user) == 0
    await wait_for(loop.dead, timeout=30)
    [dead] = await loop.dead()
    assert (
        dead[Field.REASON.key].decode().startswith("permanent: the gateway refused the credentials (HTTP 401")
    )


async def test_an_ai_bot_stream_shows_the_answer_as_it_is_written(
    make_loop: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    loop: Loop = await make_loop()
    user = "s" + uuid.uuid4().hex[:8]
    msgid = uuid.uuid4().hex
    assert await loop.simulate("streambot", "stream this SLOW3", "--from", user, "--msgid", msgid) == 0
    envelope = stable_id("streambot", "msg", msgid)
    assert loop.d.redis is not None and loop.d.bus is not None
    key = loop.d.bus.keys.draft(envelope)
    drafts: list[tuple[str, bool]] = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        v = await loop.d.redis.hgetall(key)
        if v:
            item = (v[b"text"].decode(), v.get(b"final") == b"1")
            if not drafts or drafts[-1] != item:
                drafts.append(item)
            if item[1]:
                break
        await asyncio.sleep(0.05)
    final = f"echo: {user}: stream this SLOW3 | users=1 | prev=-"
    assert drafts and drafts[-1] == (final, True), drafts
    partial = [t for t, fin in drafts if not fin]
    assert all(final.startswith(t) for t in partial), drafts
    assert len([t for t in partial if t != final]) >= 2, drafts  # the answer grew while written
    # WeCom's next stream refresh gets the whole answer with finish=true, and the sink is done
    capsys.readouterr()
    assert (
        await loop.simulate("streambot", "", "--kind", "stream", "--stream-id", envelope, "--from", user) == 0
    )
    [reply] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("reply: ")]
    assert json.loads(reply[7:])["stream"] == {"id": envelope, "finish": True, "content": final}
    await wait_for(lambda: loop.drained("aibot_reply"), timeout=30)
