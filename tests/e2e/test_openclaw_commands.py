"""Session commands and quotes against the real OpenClaw gateway (issue 15).

Messages enter through the real WeCom app callback (``wechat-bridge simulate``); commands are
answered by the bridge through the inbound's ``reply_via`` (the ``wecom`` app sink → the fake WeCom
API's ``message/send``) and never reach the agent: the echo model behind the gateway records every
turn it is asked (``users=<n> | prev=<…>`` shows what context the agent had).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.envelope import Conversation, Sender, make_envelope
from tests.conftest import wait_for
from tests.e2e import test_openclaw
from tests.e2e.test_openclaw import Loop

pytestmark = pytest.mark.e2e

#: the daemon + gateway + fake WeCom fixture of test_openclaw.py, shared
make_loop_fixture = test_openclaw.make_loop


def asked(loop: Loop) -> int:
    return len(loop.gw.llm.requests())


async def test_new_starts_a_fresh_session_and_status_answers_without_a_turn(make_loop_fixture: Any) -> None:
    loop: Loop = await make_loop_fixture()
    user = await loop.member()
    assert await loop.simulate("app", "first question", "--from", user) == 0
    assert (await loop.reply(user)).endswith("first question | users=1 | prev=-")
    assert await loop.simulate("app", "second question", "--from", user) == 0
    assert (await loop.reply(user, 2)).endswith(f"second question | users=2 | prev={user}: first question")
    calls = asked(loop)
    assert await loop.simulate("app", "/status", "--from", user) == 0
    status = await loop.reply(user, 3)
    assert "session #0" in status and "agent wechat, session agent:wechat:" in status, status
    assert await loop.simulate("app", "/new", "--from", user) == 0
    assert (await loop.reply(user, 4)).startswith("New conversation started")
    assert asked(loop) == calls  # neither command was an agent turn
    assert await loop.simulate("app", "third question", "--from", user) == 0
    # the agent no longer sees the earlier turns
    assert (await loop.reply(user, 5)) == f"echo: {user}: third question | users=1 | prev=-"
    assert await loop.simulate("app", "/status", "--from", user) == 0
    status = await loop.reply(user, 6)
    assert "session #1" in status and ":g1" in status, status
    assert await loop.simulate("app", "/weather", "--from", user) == 0  # not a command: the agent's
    assert (await loop.reply(user, 7)).endswith(f"/weather | users=2 | prev={user}: third question")


async def test_stop_aborts_the_turn_in_flight(make_loop_fixture: Any) -> None:
    loop: Loop = await make_loop_fixture()
    user = await loop.member()
    assert await loop.simulate("app", "warm up", "--from", user) == 0
    await loop.reply(user)
    assert await loop.simulate("app", "a long story SLOW30", "--from", user) == 0
    await wait_for(lambda: loop.llm_calls("SLOW30") >= 1, timeout=60, every=0.1)
    assert await loop.simulate("app", "/stop", "--from", user) == 0
    assert (await loop.reply(user, 2, timeout=30)) == "claw: stopped the answer in progress."
    await wait_for(loop.drained, timeout=30)
    assert await loop.dead() == []  # stopped on request: no dead letter
    await asyncio.sleep(1.0)
    assert len(loop.replies(user)) == 2  # and no answer of the stopped turn
    assert await loop.simulate("app", "/stop", "--from", user) == 0
    assert (await loop.reply(user, 3, timeout=30)) == "claw: no answer was in progress."


async def test_a_quote_reaches_the_prompt(make_loop_fixture: Any) -> None:
    loop: Loop = await make_loop_fixture()
    user = await loop.member()
    env = make_envelope(
        "app", Conversation(user, "direct"), "what does this mean?", sender=Sender(user),
        meta={"quote_text": "the meeting moved to Friday"},
    )  # fmt: skip
    assert loop.d.bus is not None
    assert await loop.d.bus.publish(env)
    answer = await loop.reply(user)
    assert answer == f"echo: {user}: > the meeting moved to Friday\nwhat does this mean? | users=1 | prev=-"
