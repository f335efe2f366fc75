"""``wechat-bridge wecom appchat create|get|update`` against the fake WeCom API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.wecom.cli import run_async
from bridge.cli import build_parser
from bridge.config import Config
from bridge.envelope import Conversation, make_envelope
from bridge.errors import ConfigError
from tests.conftest import wait_for
from tests.fakes.wecom_api import FakeWeComAPI

CONFIG = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "app"
type = "wecom_app"
rate = "none"
retry_base = 0.05
corp_id = "wwfakecorp0001"
corp_secret = "fake-corp-secret"
agent_id = 1000002
api_base = "{base}"
member_rate = "none"
chat_rate = "none"
[[outbound]]
name = "logger"
type = "log"
[[routes]]
from = "in"
to = [{{sink = "app", conversation = "chat:wrOps"}}]
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeComAPI]:
    f = FakeWeComAPI()
    f.base = await f.start()  # type: ignore[attr-defined]
    yield f
    await f.stop()


async def wecom(cfg: Config, *argv: str) -> int:
    args = build_parser().parse_args(["wecom", "appchat", *argv])
    return await run_async(args, cfg)


async def test_create_get_update(write_config: Any, fake: Any, capsys: Any) -> None:
    cfg = write_config(CONFIG.format(base=fake.base))
    assert (
        await wecom(
            cfg, "create", "--sink", "app", "--name", "Ops", "--users", "alice,bob", "--chatid", "wrOps"
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out) == {"chatid": "wrOps"}
    assert 'conversation = "chat:wrOps"' in err
    assert (
        await wecom(cfg, "update", "--sink", "app", "--chatid", "wrOps", "--add", "carol", "--remove", "bob")
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"chatid": "wrOps", "updated": True}
    assert await wecom(cfg, "get", "--sink", "app", "--chatid", "wrOps") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["userlist"] == ["alice", "carol"] and info["owner"] == "alice" and info["name"] == "Ops"
    assert len(fake.token_requests()) == 1  # the token is cached in Redis between commands


async def test_errors_say_what_to_fix(write_config: Any, fake: Any, capsys: Any) -> None:
    cfg = write_config(CONFIG.format(base=fake.base))
    assert await wecom(cfg, "get", "--sink", "app", "--chatid", "wrMissing") == 1
    err = capsys.readouterr().err
    assert "errcode 86003" in err and "chat:wrMissing" in err
    assert await wecom(cfg, "create", "--sink", "app", "--users", "alice") == 1
    assert "errcode 86006" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no wecom_app outbound named 'logger'"):
        await wecom(cfg, "get", "--sink", "logger", "--chatid", "x")


async def test_the_daemon_sends_to_a_chat_the_command_created(
    write_config: Any, start_daemon: Any, fake: Any, capsys: Any
) -> None:
    cfg = write_config(CONFIG.format(base=fake.base))
    assert await wecom(cfg, "create", "--sink", "app", "--users", "alice,bob", "--chatid", "wrOps") == 0
    d = await start_daemon(cfg)
    await d.bus.publish(make_envelope("in", Conversation("x"), "first message"))
    await wait_for(lambda: fake.contents("wrOps") == ["first message"])
    assert len(fake.token_requests()) == 1  # the daemon found the command's token in Redis


async def test_the_command_is_registered(write_config: Any, fake: Any) -> None:
    cfg = write_config(CONFIG.format(base=fake.base))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "--config", str(cfg.path), "wecom", "appchat", "create",
        "--sink", "app", "--users", "alice,dave", "--chatid", "wrCli",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"chatid": "wrCli"}
    assert "fake-corp-secret" not in (out + err).decode()
    assert fake.chats["wrCli"].userlist == ["alice", "dave"]
