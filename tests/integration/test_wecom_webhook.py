"""The wecom_webhook sink (group robot) through the daemon's runner, against the fake WeCom API."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from aiohttp import web

from bridge.bus import Field
from bridge.config import Rate
from bridge.envelope import Attachment, Conversation, make_envelope
from bridge.text import split_text
from tests.conftest import wait_for
from tests.fakes.wecom_api import FakeWeComAPI

KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"

CONFIG = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "bot"
type = "wecom_webhook"
{rate}
retry_base = 0.05
retry_max = 0.2
max_attempts = 3
key = "{key}"
timeout = 2
backoff = 0.1
{extra}
[[routes]]
from = "in"
to = "bot"
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeComAPI]:
    f = FakeWeComAPI()
    f.base = await f.start()  # type: ignore[attr-defined]
    f.add_webhook_key(KEY)
    yield f
    await f.stop()


@pytest.fixture
async def files() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """A tiny file server: GET /<name> answers the bytes stored under that name."""
    store: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in store:
            return web.Response(status=404)
        return web.Response(body=store[name], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", store
    await runner.cleanup()


async def start(
    write_config: Any, start_daemon: Any, fake: Any, *, rate: str | None = "none", key: str | None = None,
    extra: str = "",
) -> Any:  # fmt: skip
    url = key or f"{fake.base}/cgi-bin/webhook/send?key={KEY}"
    body = CONFIG.format(rate=f'rate = "{rate}"' if rate is not None else "", key=url, extra=extra)
    return await start_daemon(write_config(LOOPBACK_FETCH + body))


#: the test's file server is on loopback: let the sink fetch from it (bridge/egress.py refuses it else)
LOOPBACK_FETCH = 'fetch_hosts = ["127.0.0.1"]\nfetch_private = ["127.0.0.0/8"]\n'


async def publish(d: Any, text: str, **fields: Any) -> None:
    await d.bus.publish(make_envelope("in", Conversation("any", "group"), text, **fields))


async def dead_letters(d: Any) -> list[dict[bytes, bytes]]:
    return [f for _, f in await d.redis.xrange(d.bus.keys.dead)]


def bodies(fake: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(m.msgtype, m.body) for m in fake.delivered_to(KEY)]


async def test_text_with_mentions_from_options_and_meta(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(
        write_config, start_daemon, fake, extra='mentions = ["alice"]\nmention_mobiles = ["13800001111"]'
    )
    meta = {"mentioned_list": "bob, @all", "mentioned_mobile_list": "13900002222"}
    await publish(d, "deploy finished", meta=meta, mentions=["wxid_foreign"])
    await wait_for(lambda: len(fake.delivered_to(KEY)) == 1)
    [(kind, body)] = bodies(fake)
    assert kind == "text" and body["content"] == "deploy finished"
    assert body["mentioned_list"] == [
        "alice",
        "bob",
        "@all",
    ]  # the envelope's own mentions are off by default
    assert body["mentioned_mobile_list"] == ["13800001111", "13900002222"]


async def test_long_text_mentions_ride_on_the_first_part_only(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake, extra="mentions_from_envelope = true")
    text = "告警详情：" + "磁盘使用率超过阈值。" * 300
    await publish(d, text, mentions=["alice"])
    await wait_for(lambda: len(fake.delivered_to(KEY)) == 5)
    got = bodies(fake)
    assert got[0][1]["mentioned_list"] == ["alice"]
    assert all("mentioned_list" not in b for _, b in got[1:])
    chunks = [re.sub(r"^\(\d/5\) ", "", b["content"]) for _, b in got]
    assert "".join(chunks) == text and all(len(b["content"].encode()) <= 2048 for _, b in got)


async def test_markdown_is_split_at_4096_with_inline_mentions(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake)
    text = "# 报告\n\n" + "\n".join(f"- **第{i}项**：一切正常 ✅" for i in range(500))
    meta = {"mentioned_list": "alice,@all", "mentioned_mobile_list": "13800001111"}
    await publish(d, text, format="markdown", meta=meta)
    n = len(split_text(text + "\n\n<@alice>", 4096, markdown=True))
    await wait_for(lambda: len(fake.delivered_to(KEY)) == n + 1)
    got = bodies(fake)
    md = [b["content"] for k, b in got if k == "markdown"]
    assert len(md) >= 3 and all(len(c.encode()) <= 4096 for c in md)
    assert max(len(c.encode()) for c in md) > 3000  # the webhook's 4096, not the app's 2048
    assert md[-1].endswith("<@alice>")
    assert got[-1] == (
        "text",
        {"content": "⬆", "mentioned_list": ["@all"], "mentioned_mobile_list": ["13800001111"]},
    )
    lines = [ln for c in md for ln in c.split("\n") if ln.startswith("- ")]
    assert lines == [f"- **第{i}项**：一切正常 ✅" for i in range(500)]


async def test_images_from_base64_and_url(
    write_config: Any, start_daemon: Any, fake: Any, files: Any
) -> None:
    base, store = files
    store["small.png"] = b"\x89PNG" + b"a" * 1000
    store["big.png"] = b"\x89PNG" + b"b" * (2 * 1024 * 1024 + 10)
    inline = b"\x89PNG-inline"
    d = await start(write_config, start_daemon, fake)
    attachments = [
        Attachment("image", extra={"base64": base64.b64encode(inline).decode()}),
        Attachment("image", url=f"{base}/small.png"),
        Attachment("image", url=f"{base}/big.png", name="big.png"),  # past 2 MB: sent as a file
    ]
    await publish(d, "", attachments=attachments)
    await wait_for(lambda: len(fake.delivered_to(KEY)) == 3)
    got = bodies(fake)
    assert got[0] == (
        "image",
        {"base64": base64.b64encode(inline).decode(), "md5": hashlib.md5(inline).hexdigest()},
    )
    assert got[1][0] == "image" and base64.b64decode(got[1][1]["base64"]) == store["small.png"]
    assert got[2][0] == "file"
    [upload] = fake.sent("/webhook/upload_media")
    assert upload.files["media"] == store["big.png"] and upload.form["media"] == "big.png"


async def test_files_go_through_upload_media(
    write_config: Any, start_daemon: Any, fake: Any, files: Any
) -> None:
    base, store = files
    store["report.pdf"] = b"%PDF-1.4 " + b"x" * 5000
    d = await start(write_config, start_daemon, fake)
    attachments = [
        Attachment("file", url=f"{base}/report.pdf"),
        Attachment("file", name="notes.txt", extra={"base64": base64.b64encode(b"hello notes").decode()}),
        Attachment("file", url=f"{base}/tiny", name="tiny"),
    ]
    store["tiny"] = b"abc"  # under the 6 bytes WeCom takes: its link goes as text instead
    await publish(d, "files", attachments=attachments)
    await wait_for(lambda: len(fake.delivered_to(KEY)) == 4)
    got = bodies(fake)
    assert got[0] == ("text", {"content": "files"})
    assert [k for k, _ in got[1:]] == ["file", "file", "text"]
    assert got[3][1]["content"] == f"[file] tiny {base}/tiny"
    uploads = fake.sent("/webhook/upload_media")
    assert [u.form["media"] for u in uploads] == ["report.pdf", "notes.txt"]
    assert uploads[0].query["type"] == "file" and uploads[1].files["media"] == b"hello notes"


async def test_news_from_links_eight_articles_a_message(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake)
    links = [Attachment("link", url=f"https://example.com/{i}", title=f"T{i}") for i in range(10)]
    await publish(d, "", attachments=links)
    await wait_for(lambda: len(fake.delivered_to(KEY)) == 2)
    (k1, n1), (k2, n2) = bodies(fake)
    assert (k1, k2) == ("news", "news")
    assert [a["title"] for a in n1["articles"] + n2["articles"]] == [f"T{i}" for i in range(10)]


async def test_a_bad_key_dead_letters_without_showing_it(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    with structlog.testing.capture_logs() as logs:
        d = await start(
            write_config, start_daemon, fake, key=f"{fake.base}/cgi-bin/webhook/send?key=not-a-real-key"
        )
        await publish(d, "hello")
        await wait_for(lambda: dead_letters(d))
    [dead] = await dead_letters(d)
    reason = dead[Field.REASON.key].decode()
    assert "errcode 93000" in reason and "copy the robot's webhook URL again" in reason
    assert "not-a-real-key" not in reason and "not-a-real-key" not in repr(logs)


async def test_45009_backs_off_then_succeeds(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake)
    fake.fail_next("/webhook/send", errcode=45009)
    await publish(d, "later")
    await wait_for(lambda: bodies(fake) == [("text", {"content": "later"})])
    assert await dead_letters(d) == []


async def test_default_rate_is_20_a_minute_per_robot(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake, rate=None)
    assert d.runners["bot"].rates == [Rate(20, 60)]
    await publish(d, "first")
    await wait_for(lambda: len(bodies(fake)) == 1)


async def test_every_part_counts_against_the_robot_rate(
    write_config: Any, start_daemon: Any, fake: Any
) -> None:
    d = await start(write_config, start_daemon, fake, rate="5/second")
    await publish(d, "z" * 5000)  # three parts
    for i in range(2):
        await d.bus.publish(make_envelope("in", Conversation(f"other{i}", "group"), f"m{i}"))
    await wait_for(lambda: len(bodies(fake)) == 5, timeout=10)
    times = sorted(r.time for r in fake.sent("/webhook/send"))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 and times[-1] - times[0] >= 0.2 * len(gaps) - 0.1, gaps


async def test_the_key_alone_works_with_api_base(write_config: Any, start_daemon: Any, fake: Any) -> None:
    d = await start(write_config, start_daemon, fake, key=KEY, extra=f'api_base = "{fake.base}"')
    await publish(d, "by key")
    await wait_for(lambda: bodies(fake) == [("text", {"content": "by key"})])
