"""A WeCom AI bot on its long connection talks to a real OpenClaw agent, with no public URL.

The fake WeCom long-connection server (tests/fakes/wecom_aibot_ws.py) pushes a message callback to
the daemon's socket; the ``openclaw`` sink runs a turn of the real gateway's ``wechat`` agent (its
model: tests/fakes/fake_llm.py, which echoes and streams slowly for ``SLOW<n>``); the answer comes
back on the socket as one stream: the placeholder first, then the answer as it grows, then the whole
answer with ``finish``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.envelope import stable_id
from tests.conftest import wait_for
from tests.e2e.conftest import Gateway
from tests.fakes.wecom_aibot_ws import FakeAIBotServer

pytestmark = pytest.mark.e2e

CONFIG = """
[[inbound]]
name = "bot"
type = "wecom_aibot_ws"
bot_id = "bot1"
secret = "secret-1"
url = "{fake}"
reply_via = "botout"
heartbeat_interval = 2
draft_poll = 0.05
lease_ttl = 1
lease_retry = 0.2
[[outbound]]
name = "botout"
type = "wecom_aibot_ws"
inbound = "bot"
rate = "100/second"
[[outbound]]
name = "claw"
type = "openclaw"
url = "{url}"
token = "{token}"
agent = "wechat"
draft_interval = 0.1
retry_base = 0.5
retry_max = 2
[[routes]]
name = "ai"
from = "bot"
to = "claw"
reply = true
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeAIBotServer]:
    srv = FakeAIBotServer()
    await srv.start()
    yield srv
    await srv.stop()


async def test_a_message_on_the_socket_is_answered_by_the_agent_as_a_stream(
    gateway: Gateway, fake: FakeAIBotServer, write_config: Any, start_daemon: Any
) -> None:
    await start_daemon(write_config(CONFIG.format(fake=fake.url, url=gateway.url, token=gateway.token)))
    await wait_for(lambda: fake.live() is not None, timeout=10)
    user = "s" + uuid.uuid4().hex[:8]
    msgid = uuid.uuid4().hex
    req = await fake.push_message("stream this SLOW3", user=user, msgid=msgid)
    final = f"echo: {user}: stream this SLOW3 | users=1 | prev=-"
    await wait_for(lambda: any(f["finish"] for f in fake.stream_frames(req)), timeout=60, every=0.1)
    frames = fake.stream_frames(req)
    envelope = stable_id("bot", "msg", msgid)
    assert frames[0] == {"id": envelope, "finish": False, "content": "<think></think>"}, frames
    assert frames[-1] == {"id": envelope, "finish": True, "content": final}, frames
    growing = [f["content"] for f in frames[1:-1]]
    assert all(final.startswith(t) for t in growing), frames
    assert len([t for t in growing if t != final]) >= 2, frames  # the answer grew while written
    assert [f["finish"] for f in frames].count(True) == 1
    assert fake.sent() == []  # nothing fell back to a proactive message
