"""An answer the AI bot cannot carry back goes through the sink's ``fallback`` (bridge/fallback.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.config import load
from bridge.errors import ConfigError
from tests.conftest import CollectSink, wait_for
from tests.integration.test_wechat_inbound import KEY, TOKEN, MakeBridge, bridges
from tests.integration.test_wechat_inbound_aibot import Receiver, dead, message, receiver, send

__all__ = ["receiver"]  # the fixture

CONFIG = f"""
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
fallback = "app"
fallback_conversation = "user:{{{{sender}}}}"
[[outbound]]
name = "app"
type = "collect"
[[outbound]]
name = "ai"
type = "collect"
[[routes]]
name = "ask"
from = "bot"
to = "ai"
reply = true
"""


@pytest.fixture
async def make_bridge(redis: Any, write_config: Any, start_daemon: Any) -> AsyncIterator[MakeBridge]:
    async with bridges(write_config, start_daemon) as make:
        yield make


async def test_an_answer_too_long_for_the_bot_goes_to_the_member_through_the_fallback(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b = await make_bridge(CONFIG.format(window=60))
    CollectSink.instances["ai"].reply_text = "x" * 45_000 + "{text}"
    await send(b, message("f1", "!", receiver.url))
    app = CollectSink.instances["app"]
    await wait_for(lambda: len(app.sent) == 1)
    [d] = app.sent
    assert d.conversation == "user:lisi" and d.envelope.text == "x" * 45_000 + "!"
    assert d.envelope.kind == "reply" and d.envelope.origin is not None
    assert await dead(b) == [] and receiver.posts == []
    assert b.d.runners["bot_reply"].dead == 0


async def test_a_closed_window_without_response_url_goes_through_the_fallback(
    make_bridge: MakeBridge, receiver: Receiver
) -> None:
    b = await make_bridge(CONFIG.format(window=1))
    CollectSink.instances["ai"].reply_text = "late answer"
    CollectSink.instances["ai"].delay = 1.5  # the stream window closes first
    body = json.loads(message("f2", "q", ""))
    del body["response_url"]
    await send(b, json.dumps(body).encode())
    app = CollectSink.instances["app"]
    await wait_for(lambda: len(app.sent) == 1)
    assert app.sent[0].envelope.text == "late answer" and app.sent[0].conversation == "user:lisi"
    assert await dead(b) == []


def test_a_fallback_must_name_another_outbound(tmp_path: Any) -> None:
    p = tmp_path / "b.toml"
    p.write_text('[[outbound]]\nname = "a"\ntype = "log"\nfallback = "nope"\n')
    with pytest.raises(ConfigError, match=r"outbound.a.fallback: no other outbound named 'nope'"):
        load(p, env={})
    p.write_text('[[outbound]]\nname = "a"\ntype = "log"\nfallback = "a"\n')
    with pytest.raises(ConfigError, match=r"outbound.a.fallback"):
        load(p, env={})
    p.write_text('[[outbound]]\nname = "a"\ntype = "log"\n[[outbound]]\nname = "b"\ntype = "log"\n'
                 'fallback = "a"\nfallback_conversation = "{who}"\n')  # fmt: skip
    with pytest.raises(ConfigError, match=r"outbound.b.fallback_conversation"):
        load(p, env={})
