"""The wecom_app sink through the daemon's runner, against the fake WeCom API and a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from bridge.bus import Field
from bridge.config import load
from bridge.envelope import Attachment, Conversation, Delivery, encode, make_envelope
from bridge.errors import ConfigError
from tests.conftest import wait_for
from tests.fakes.wecom_api import FakeWeComAPI, Recorded

CONFIG = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "app"
type = "wecom_app"
rate = "{rate}"
retry_base = 0.05
retry_max = 0.2
max_attempts = {attempts}
corp_id = "wwfakecorp0001"
corp_secret = "fake-corp-secret"
agent_id = 1000002
api_base = "{base}"
timeout = {timeout}
member_rate = "{member_rate}"
chat_rate = "{chat_rate}"
backoff = 0.1
{extra}
[[routes]]
from = "in"
to = {to}
"""


class FlakyFake(FakeWeComAPI):
    """The fake, plus: answer HTTP 502 to the n-th appchat/send calls listed in ``fail_calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_calls: set[int] = set()
        self.appchat_calls = 0

    async def _appchat_send(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        self.appchat_calls += 1
        if self.appchat_calls in self.fail_calls:
            record.status = 502
            return web.Response(status=502, text="bad gateway")
        return await super()._appchat_send(request, record)


@pytest.fixture
async def fake() -> AsyncIterator[FlakyFake]:
    f = FlakyFake()
    f.base = await f.start()  # type: ignore[attr-defined]
    yield f
    await f.stop()


async def start(
    write_config: Any,
    start_daemon: Any,
    fake: Any,
    *,
    to: str = '"app"',
    attempts: int = 4,
    rate: str = "none",
    member_rate: str = "none",
    chat_rate: str = "none",
    timeout: float = 2.0,
    base: str | None = None,
    extra: str = "",
) -> Any:
    cfg = write_config(
        CONFIG.format(
            base=base or fake.base,
            to=to,
            attempts=attempts,
            rate=rate,
            member_rate=member_rate,
            chat_rate=chat_rate,
            timeout=timeout,
            extra=extra,
        )
    )
    return await start_daemon(cfg)


async def publish(d: Any, text: str, conv: str = "alice", kind: str = "direct", **fields: Any) -> str:
    env = make_envelope("in", Conversation(conv, kind), text, **fields)  # type: ignore[arg-type]
    await d.bus.publish(env)
    return env.id


async def dead_letters(d: Any) -> list[dict[bytes, bytes]]:
    return [f for _, f in await d.redis.xrange(d.bus.keys.dead)]


async def drained(d: Any) -> bool:
    return bool(await d.bus.out_pending("app") == 0)


async def create_chat(fake: Any, chatid: str = "wrOps", users: tuple[str, ...] = ("alice", "bob")) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        params = {"corpid": fake.corpid, "corpsecret": fake.corpsecret}
        async with http.get(fake.base + "/cgi-bin/gettoken", params=params) as r:
            token = (await r.json())["access_token"]
        body = {"chatid": chatid, "userlist": list(users), "owner": users[0], "name": "ops"}
        async with http.post(
            fake.base + "/cgi-bin/appchat/create", json=body, params={"access_token": token}
        ) as r:
            assert (await r.json())["errcode"] == 0
    fake.requests.clear()
    return chatid


def strip_number(part: str) -> tuple[int, int, str]:
    m = re.match(r"\((\d+)/(\d+)\) ", part)
    assert m, part[:20]
    return int(m.group(1)), int(m.group(2)), part[m.end() :]


# -- every send type -------------------------------------------------------------------------------


async def test_text_to_a_member_with_the_duplicate_check(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake)
    await publish(d, "hello alice")
    await wait_for(lambda: fake.contents("alice") == ["hello alice"])
    [req] = fake.sent("/message/send")
    assert req.json["touser"] == "alice" and req.json["agentid"] == fake.agentid
    assert req.json["enable_duplicate_check"] == 1 and req.json["duplicate_check_interval"] == 1800
    await wait_for(lambda: drained(d))
    marker = await d.redis.get(d.bus.keys.mark("app", (await delivered_ids(d))[0]))
    assert marker.startswith(b"done:") and len(marker) > 10  # the remote id is WeCom's msgid


async def delivered_ids(d: Any) -> list[str]:
    keys = [k async for k in d.redis.scan_iter(match=d.bus.keys.mark("app", "*"))]
    return [k.decode().rsplit(":", 1)[1] for k in keys]


async def test_text_and_markdown_to_an_app_chat(write_config: Any, start_daemon: Any, fake: Any) -> None:
    chatid = await create_chat(fake)
    d = await start(
        write_config, start_daemon, fake, to=f'[{{sink = "app", conversation = "chat:{chatid}"}}]'
    )
    await publish(d, "plain")
    await publish(d, "**bold**", format="markdown")
    await wait_for(lambda: len(fake.delivered_to(chatid)) == 2)
    assert [(m.msgtype, m.content) for m in fake.delivered_to(chatid)] == [
        ("text", "plain"),
        ("markdown", "**bold**"),
    ]
    assert all(r.errcode == 0 for r in fake.sent("/appchat/send"))
    assert fake.sent("/message/send") == []


async def test_a_group_conversation_going_home_is_an_app_chat(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    chatid = await create_chat(fake, "wrHome")
    d = await start(write_config, start_daemon, fake)
    await publish(d, "to the chat", conv=chatid, kind="group")
    await publish(d, "to several", conv="user:alice|bob")
    await wait_for(lambda: fake.contents(chatid) == ["to the chat"])
    await wait_for(lambda: fake.contents("bob") == ["to several"])
    assert fake.contents("alice") == ["to several"]


async def test_markdown_to_a_member_and_party(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    await publish(d, "# title\n\nbody", format="markdown")
    await publish(d, "to the whole department", conv="party:1")
    await wait_for(lambda: len(fake.sent("/message/send")) == 2)
    # two conversations, two partitions: they may go out in either order
    sent = fake.sent("/message/send")
    (md,) = [c for c in sent if c.json.get("msgtype") == "markdown"]
    (party,) = [c for c in sent if c.json.get("toparty")]
    assert md.json["msgtype"] == "markdown" and md.json["markdown"]["content"] == "# title\n\nbody"
    assert party.json["toparty"] == "1" and party.errcode == 0
    await wait_for(lambda: fake.contents("dave") == ["to the whole department"])


async def test_news_textcard_and_media_attachments(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    attachments = [
        Attachment("link", url="https://example.com/a", title="A", description="first", extra={"picurl": "https://x/p.png"}),
        Attachment("link", url="https://example.com/b", title="B"),
        Attachment("card", url="https://example.com/c", title="Card", description="details", extra={"btntxt": "Open"}),
        Attachment("image", media_id="MEDIA1"),
        Attachment("location", title="Office", extra={"lat": 31.2, "lng": 121.5}),
    ]  # fmt: skip
    await publish(d, "see attached", attachments=attachments)
    await wait_for(lambda: len(fake.delivered_to("alice")) == 4)
    got = [(m.msgtype, m.body) for m in fake.delivered_to("alice")]
    assert got[0] == ("text", {"content": "see attached\n[location] Office 31.2,121.5"})
    assert got[1][0] == "news" and [a["title"] for a in got[1][1]["articles"]] == ["A", "B"]
    assert got[1][1]["articles"][0]["picurl"] == "https://x/p.png"
    assert got[2] == ("textcard", {"title": "Card", "description": "details", "url": "https://example.com/c",
                                   "btntxt": "Open"})  # fmt: skip
    assert got[3] == ("image", {"media_id": "MEDIA1"})


# -- splitting end to end --------------------------------------------------------------------------


async def test_a_10kb_cjk_reply_arrives_complete_and_in_order(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    chatid = await create_chat(fake)
    d = await start(
        write_config, start_daemon, fake, to=f'["app", {{sink = "app", conversation = "chat:{chatid}"}}]'
    )
    text = "".join(f"第{i}段：企业微信按字节计算长度，中文每个字三个字节。🙂\n" for i in range(200))
    assert len(text.encode()) > 10_000
    await publish(d, text)
    for target in ("alice", chatid):
        await wait_for(lambda t=target: len(fake.delivered_to(t)) >= 6)  # type: ignore[misc]
        await asyncio.sleep(0.1)
        parts = fake.contents(target)
        numbered = [strip_number(p or "") for p in parts]
        n = len(parts)
        assert [(i, total) for i, total, _ in numbered] == [(i, n) for i in range(1, n + 1)]
        assert "".join(body for _, _, body in numbered) == text
        assert all(len((p or "").encode()) <= 2048 for p in parts)
    assert not any(m.truncated for m in fake.delivered_to("alice"))


async def test_a_retry_after_part_2_of_4_failed_sends_only_parts_3_and_4(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    chatid = await create_chat(fake)
    fake.fail_calls = {3}
    d = await start(
        write_config, start_daemon, fake, to=f'[{{sink = "app", conversation = "chat:{chatid}"}}]'
    )
    text = "\n\n".join("段落" + "字" * 330 for _ in range(8))  # 8 KB → 4 parts of ≤ 2048 bytes
    await publish(d, text)
    await wait_for(lambda: len(fake.delivered_to(chatid)) == 4)
    await wait_for(lambda: drained(d))
    parts = fake.contents(chatid)
    assert [strip_number(p or "")[:2] for p in parts] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "".join(strip_number(p or "")[2] for p in parts) == text
    sent = [strip_number(r.json["text"]["content"])[0] for r in fake.sent("/appchat/send")]
    assert sent == [1, 2, 3, 3, 4]  # part 3 failed once (HTTP 502) and was the only one sent again
    assert await dead_letters(d) == []


async def test_a_timeout_after_wecom_took_the_part_does_not_show_it_twice(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake, timeout=0.3)
    fake.fail_next("/message/send", delay=0.8)  # WeCom takes it, but answers too late
    await publish(d, "exactly once")
    await wait_for(lambda: len(fake.sent("/message/send")) == 2)
    await wait_for(lambda: fake.dropped != [] and fake.contents("alice") == ["exactly once"])
    await asyncio.sleep(0.2)
    assert fake.contents("alice") == ["exactly once"]
    assert [m.dropped for m in fake.dropped] == ["duplicate"]


async def test_a_repeated_message_is_not_dropped_as_a_duplicate(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake)
    await publish(d, "ok")
    await wait_for(lambda: fake.contents("alice") == ["ok"])
    await publish(d, "ok")
    await wait_for(lambda: fake.contents("alice") == ["ok", "ok"])
    first, second = fake.sent("/message/send")
    assert first.json["enable_duplicate_check"] == 1 and second.json["enable_duplicate_check"] == 0


# -- errcodes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "errcode"),
    [("errcode", -1), ("errcode", 45009), ("errcode", 45033), ("errcode", 42001), ("errcode", 40014),
     ("http_status", 502), ("http_status", 503)],
)  # fmt: skip
async def test_transient_failures_end_in_success(
    write_config: Any, start_daemon: Any, fake: Any, fault: str, errcode: int
) -> None:
    d = await start(write_config, start_daemon, fake)
    fake.fail_next("/message/send", **{fault: errcode})
    await publish(d, "eventually")
    await wait_for(lambda: fake.contents("alice") == ["eventually"])
    await wait_for(lambda: drained(d))
    assert await dead_letters(d) == []
    assert len(fake.sent("/message/send")) == 2


@pytest.mark.parametrize(
    ("errcode", "reason"),
    [
        (60020, "企业可信IP"),
        (81013, "visible range"),
        (40058, "should not happen"),
        (45002, "should not happen"),
        (86001, "does not exist"),
        (40050, "does not exist"),
        (301002, "agent_id"),
        (47001, "devtool/query?e=47001"),
    ],
)
async def test_permanent_errcodes_dead_letter_with_what_to_fix(
    write_config: Any, start_daemon: Any, fake: Any, errcode: int, reason: str
) -> None:
    d = await start(write_config, start_daemon, fake)
    fake.fail_next("/message/send", errcode=errcode)
    await publish(d, "doomed")
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    text = dead[Field.REASON.key].decode()
    assert text.startswith(f"permanent: /cgi-bin/message/send: errcode {errcode}") and reason in text, text
    assert dead[b"attempts"] == b"1" and len(fake.sent("/message/send")) == 1


async def test_real_permanent_failures_from_the_fake(write_config: Any, start_daemon: Any, fake: Any) -> None:
    fake.ip_not_trusted = True
    d = await start(write_config, start_daemon, fake)
    await publish(d, "x", conv="user:nobody")
    await wait_for(lambda: dead_letters(d))
    assert b"60020" in (await dead_letters(d))[0][Field.REASON.key]
    fake.ip_not_trusted = False
    await publish(d, "x", conv="user:nobody")
    await publish(d, "x", conv="chat:wrNoSuchChat")
    await wait_for(lambda: len(fake.sent("/send")) == 3)
    await wait_for(lambda: _count_dead(d, 3))
    # the two run concurrently (different conversations): their dead letters come in either order
    later = sorted(f[Field.REASON.key].decode() for f in (await dead_letters(d))[1:])
    assert (
        "errcode 86003" in later[0] and "chat:wrNoSuchChat" in later[0] and "wecom appchat create" in later[0]
    )
    assert "errcode 81013" in later[1] and "user:nobody" in later[1]


async def _count_dead(d: Any, n: int) -> bool:
    return len(await dead_letters(d)) == n


async def test_retries_exhausted_on_an_unreachable_api(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake, attempts=2, base="http://127.0.0.1:9")
    await publish(d, "nowhere")
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    reason = dead[Field.REASON.key].decode()
    assert reason.startswith("gave up after 2 attempts: WeCom /cgi-bin/gettoken: cannot reach 127.0.0.1:9")
    assert "fake-corp-secret" not in reason


async def test_an_ambiguous_conversation_is_refused(write_config: Any, start_daemon: Any, fake: Any) -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\].to\[0\].conversation: 'alice' must say"):
        await start(write_config, start_daemon, fake, to='[{sink = "app", conversation = "alice"}]')


async def test_a_delivery_without_a_prefix_dead_letters(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake)
    env = make_envelope("in", Conversation("somewhere"), "x")
    await d.redis.xadd(d.bus.keys.out("app"), {Field.DELIVERY: encode(Delivery("d1", "app", env, "bob"))})
    await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    assert b"write chat:bob or user:bob" in dead[Field.REASON.key]


async def test_an_empty_envelope_dead_letters(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    await publish(d, "")
    await wait_for(lambda: dead_letters(d))
    assert b"nothing to send" in (await dead_letters(d))[0][Field.REASON.key]


async def test_secrets_stay_out_of_logs_and_dead_letters(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    with structlog.testing.capture_logs() as logs:
        d = await start(write_config, start_daemon, fake, attempts=2)
        fake.fail_next("/message/send", errcode=42001)
        fake.fail_next("/message/send", delay=3.0)
        await publish(d, "one")
        await wait_for(lambda: fake.contents("alice") == ["one"], timeout=15)
        fake.fail_next("/message/send", errcode=60020)
        await publish(d, "two")
        await wait_for(lambda: dead_letters(d))
    tokens = {r.query["access_token"] for r in fake.requests if "access_token" in r.query}
    assert tokens
    seen = repr(logs) + repr(await dead_letters(d))
    for secret in [*tokens, fake.corpsecret]:
        assert secret not in seen
    assert "access_token=" not in seen


# -- quotas ----------------------------------------------------------------------------------------


async def test_member_quota_holds_across_two_instances(
    write_config: Any, start_daemon: Any, fake: Any, tmp_path: Path
) -> None:
    d1 = await start(write_config, start_daemon, fake, member_rate="5/second")
    cfg2 = tmp_path / "second.toml"
    cfg2.write_text((tmp_path / "bridge.toml").read_text().replace('instance = "t1"', 'instance = "t2"'))
    await start_daemon(load(cfg2))
    long = "x" * 3000  # two parts: both count
    for i in range(4):
        await publish(d1, f"m{i}", conv="user:alice")
    await publish(d1, long, conv="user:alice")
    await publish(d1, "to bob", conv="user:bob")
    await wait_for(lambda: len(fake.delivered_to("alice")) == 6, timeout=15)
    times = sorted(r.time for r in fake.sent("/message/send") if r.json["touser"] == "alice")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 5/second, burst 1: charged at least 200 ms apart (arrival times jitter a little)
    assert min(gaps) >= 0.05 and times[-1] - times[0] >= 0.2 * len(gaps) - 0.1, gaps
    await wait_for(lambda: fake.contents("bob") == ["to bob"])  # another member: its own quota


async def test_chat_quota_and_sink_rate_count_every_part(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    chatid = await create_chat(fake)
    d = await start(
        write_config, start_daemon, fake, rate="10/second", chat_rate="5/second",
        to=f'[{{sink = "app", conversation = "chat:{chatid}"}}]',
    )  # fmt: skip
    await publish(d, "y" * 5000)  # three parts
    await publish(d, "after")
    await wait_for(lambda: len(fake.delivered_to(chatid)) == 4, timeout=10)
    times = [r.time for r in fake.sent("/appchat/send")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 and times[-1] - times[0] >= 0.2 * len(gaps) - 0.1, gaps
    assert d.runners["app"].rates[0].count == 10


EDGE_CASES = {
    "exactly_at_the_limit": "a" * 2045 + "字",  # 2048 bytes: one part, not numbered
    "one_byte_past": "a" * 2046 + "字",
    "emoji_sequences": "👩‍👩‍👧‍👦🇨🇳👍🏽" * 150,
    "combining_marks": "e\u0301a\u0308o\u0302 " * 500,
    "cjk_without_breaks": "中" * 2000,
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
async def test_split_edge_cases_arrive_intact(
    write_config: Any, start_daemon: Any, fake: Any, case: str
) -> None:
    from bridge.text import split_chunks, split_text

    text = EDGE_CASES[case]
    expected = split_text(text, 2048)
    d = await start(write_config, start_daemon, fake)
    await publish(d, text)
    await wait_for(lambda: len(fake.delivered_to("alice")) == len(expected))
    await wait_for(lambda: drained(d))
    assert fake.contents("alice") == expected
    assert all(len(p.encode()) <= 2048 for p in expected) and not any(
        m.truncated for m in fake.delivered_to("alice")
    )
    assert "".join(split_chunks(text, 2048)) == text
    if case == "exactly_at_the_limit":
        assert expected == [text]
    for p in expected:  # no part starts with a mark that belongs to the previous character
        body = re.sub(r"^\(\d+/\d+\) ", "", p)
        assert body[0] not in "\u0301\u0308\u0302\u200d\U0001f3fd"


async def test_a_code_block_longer_than_a_part(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    code = "".join(f"    value_{i} = compute({i})  # 计算\n" for i in range(150))
    text = "Here:\n\n```python\n" + code + "```\n\nDone."
    await publish(d, text, format="markdown")
    await wait_for(lambda: len(fake.delivered_to("alice")) >= 3)
    await wait_for(lambda: drained(d))
    parts = fake.contents("alice")
    assert all(len((p or "").encode()) <= 2048 for p in parts)
    assert all(m.msgtype == "markdown" for m in fake.delivered_to("alice"))
    lines = [ln for p in parts for ln in (p or "").split("\n") if ln.startswith("    value_")]
    assert "".join(ln + "\n" for ln in lines) == code  # every line of code, once, in order
    inside = [p for p in parts if "value_" in (p or "")]
    assert all((p or "").count("```") % 2 == 0 for p in inside)  # each part opens and closes its fence


async def test_a_long_quota_wait_yields_to_the_runner_and_resumes(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    """One attempt stays within claim_idle / 2, waits for quota included: past it the send yields
    with retry_after, the runner keeps the delivery, and the retry goes on from the next part."""
    d = await start(write_config, start_daemon, fake, member_rate="2/second", extra="claim_idle = 0.6")
    text = "\n\n".join("第" + "字" * 330 for _ in range(8))  # 4 parts, 500 ms apart > 300 ms allowed
    await publish(d, text)
    await wait_for(lambda: len(fake.delivered_to("alice")) == 4)
    await wait_for(lambda: drained(d))
    assert [strip_number(p or "")[0] for p in fake.contents("alice")] == [1, 2, 3, 4]
    assert len(fake.sent("/message/send")) == 4  # nothing sent twice
    assert await dead_letters(d) == []
