"""``wechat-bridge simulate``: every type and message kind reaches the inbound stream.

Most tests call the command's coroutine in-process against a daemon on the test's loop (the same
code path as the CLI after argument parsing); the last ones run the real CLI in a subprocess and
read the result back with ``wechat-bridge tail inbound``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.wechat import simulate as sim
from bridge.bus import Field
from bridge.envelope import stable_id
from tests.integration.test_wechat_inbound import Bridge, MakeBridge, bridges, inbounds


@pytest.fixture
async def make_bridge(redis: Any, write_config: Any, start_daemon: Any) -> AsyncIterator[MakeBridge]:
    async with bridges(write_config, start_daemon) as make:
        yield make


@pytest.fixture
async def bridge(make_bridge: MakeBridge) -> Bridge:
    b = await make_bridge()
    b.d.config.http.listen = f"127.0.0.1:{b.d.port}"  # what simulate reads to find the daemon
    return b


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sim.configure(p)
    return p.parse_args(list(argv))


async def simulate(b: Bridge, *argv: str) -> int:
    return await sim.simulate(parse(*argv), b.d.config)


CASES: list[tuple[str, str, tuple[str, ...], str, str | None]] = [
    # inbound, kind, extra args, expected envelope kind, attachment kind (or event name for events)
    ("app", "text", (), "message", None),
    ("app", "image", (), "message", "image"),
    ("app", "voice", (), "message", "voice"),
    ("app", "video", (), "message", "video"),
    ("app", "location", (), "message", "location"),
    ("app", "link", (), "message", "link"),
    ("app", "event", ("--event", "click", "--event-key", "menu_1"), "event", "click"),
    ("oa", "text", (), "message", None),
    ("oa", "text", ("--mode", "compatible"), "message", None),
    ("oa_plain", "text", (), "message", None),
    ("oa", "image", (), "message", "image"),
    ("oa", "voice", (), "message", "voice"),
    ("oa", "video", (), "message", "video"),
    ("oa", "shortvideo", (), "message", "video"),
    ("oa", "location", (), "message", "location"),
    ("oa", "link", (), "message", "link"),
    ("oa", "event", (), "event", "subscribe"),
    ("oa_plain", "event", ("--event", "SCAN", "--event-key", "123"), "event", "SCAN"),
    ("bot", "text", (), "message", None),
    ("bot", "text", ("--chat", "wrGROUP"), "message", None),
    ("bot", "image", (), "message", "image"),
    ("bot", "voice", (), "message", None),
    ("bot", "file", (), "message", "file"),
    ("bot", "mixed", ("--chat", "wrGROUP"), "message", "image"),
    ("bot", "event", (), "event", "enter_chat"),
]


@pytest.mark.parametrize(
    "inbound,kind,extra,env_kind,detail",
    CASES,
    ids=[f"{c[0]}-{c[1]}{'-' + c[2][1] if c[2] else ''}" for c in CASES],
)
async def test_every_type_and_kind_reaches_the_inbound_stream(
    bridge: Bridge,
    capsys: pytest.CaptureFixture[str],
    inbound: str,
    kind: str,
    extra: tuple[str, ...],
    env_kind: str,
    detail: str | None,
) -> None:
    code = await simulate(
        bridge, "--inbound", inbound, "--kind", kind, "--text", "你好 simulate", "--from", "u1", *extra
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("HTTP 200")
    [env] = await bridge.envelopes()
    assert env.source == inbound and env.kind == env_kind
    assert env.sender is not None and env.sender.id == "u1"
    if env_kind == "event":
        assert env.event == detail
    elif detail is not None:
        assert [a.kind for a in env.attachments] == [detail]
    if kind == "text" or (inbound == "bot" and kind in ("voice", "mixed")):
        assert env.text == "你好 simulate"
    if "--chat" in extra:
        assert (env.conversation.id, env.conversation.kind) == ("wrGROUP", "group")
    else:
        assert (env.conversation.id, env.conversation.kind) == ("u1", "direct")
    if inbound == "bot" and env_kind == "message":
        reply = json.loads(out.split("reply: ", 1)[1])
        assert reply == {"msgtype": "stream", "stream": {"id": env.id, "finish": False, "content": ""}}


async def test_stream_refresh_and_retries(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):  # a retried message: same msgid, stored once, same stream
        assert await simulate(bridge, "--inbound", "bot", "--text", "q", "--msgid", "MSG-1") == 0
    assert await bridge.inbound_len() == 1
    sid = stable_id("bot", "msg", "MSG-1")
    await bridge.d.sources["bot"].ctx.set_draft(sid, "thinking…")
    capsys.readouterr()
    assert await simulate(bridge, "--inbound", "bot", "--kind", "stream", "--stream-id", sid) == 0
    reply = json.loads(capsys.readouterr().out.split("reply: ", 1)[1])
    assert reply["stream"] == {"id": sid, "finish": False, "content": "thinking…"}
    assert await bridge.inbound_len() == 1  # refreshes are not messages
    for inbound in ("app", "oa"):
        for _ in range(2):
            assert await simulate(bridge, "--inbound", inbound, "--msgid", "9001") == 0
    assert await bridge.inbound_len() == 3


@pytest.mark.parametrize("inbound", ["app", "bot", "oa", "oa_plain"])
async def test_url_verification(bridge: Bridge, capsys: pytest.CaptureFixture[str], inbound: str) -> None:
    assert await simulate(bridge, "--inbound", inbound, "--verify") == 0
    out = capsys.readouterr().out
    assert out.startswith("HTTP 200") and "URL verification OK" in out
    assert await bridge.inbound_len() == 0


async def test_url_override_and_failures(
    bridge: Bridge, make_bridge: MakeBridge, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{bridge.d.port}/wecom/app"
    assert await simulate(bridge, "--inbound", "app", "--url", url, "--text", "via --url") == 0
    assert [e.text for e in await bridge.envelopes()] == ["via --url"]
    capsys.readouterr()
    # usage errors
    assert await simulate(bridge, "--inbound", "nope") == 1
    assert await simulate(bridge, "--inbound", "app", "--kind", "shortvideo") == 2
    assert await simulate(bridge, "--inbound", "app", "--chat", "g") == 2
    assert await simulate(bridge, "--inbound", "bot", "--kind", "stream") == 2
    assert await simulate(bridge, "--inbound", "oa_plain", "--mode", "safe") == 2
    err = capsys.readouterr().err
    assert "no inbound named 'nope'" in err and "a wecom_app sends text, image" in err
    # the daemon refuses (an inbound with another token at the same path): exit 1, status shown
    other = await make_bridge(inbounds().replace("bridgeTestToken42", "anotherToken", 1))
    wrong = f"http://127.0.0.1:{other.d.port}/wecom/app"
    assert await simulate(bridge, "--inbound", "app", "--url", wrong) == 1
    assert capsys.readouterr().out.startswith("HTTP 403\nbad signature")
    # nothing listening
    assert await simulate(bridge, "--inbound", "app", "--url", "http://127.0.0.1:1/x", "--timeout", "2") == 1
    assert "cannot reach http://127.0.0.1:1/x" in capsys.readouterr().err
    assert await bridge.inbound_len() == 1  # (both daemons share the test's prefix)


async def _cli(*argv: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await p.communicate()
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def test_the_cli_command_and_tail_inbound(bridge: Bridge) -> None:
    cfg = str(bridge.d.config.path)
    url = f"http://127.0.0.1:{bridge.d.port}/wecom/bot"
    code, out, err = await _cli(
        "--config", cfg, "simulate", "--inbound", "bot", "--url", url, "--chat", "wrG", "--from", "alice",
        "--text", "hello from the CLI",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("HTTP 200\n") and '"msgtype":"stream"' in out
    code, out, err = await _cli("--config", cfg, "tail", "inbound")
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    env: dict[str, Any] = row[Field.ENVELOPE]
    assert env["text"] == "hello from the CLI" and env["source"] == "bot"
    assert env["conversation"] == {"id": "wrG", "kind": "group"} and env["sender"] == {"id": "alice"}
    code, out, _ = await _cli(
        "--config", cfg, "simulate", "--inbound", "bot", "--url", url.replace("/bot", "/nope")
    )
    assert code == 1 and out.startswith("HTTP 404")
