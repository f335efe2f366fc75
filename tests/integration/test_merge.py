"""Bursts within ``merge_window`` become one agent turn, and nothing held is lost (bridge/merge.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bridge.bus import ROUTER_GROUP, Bus, Keys
from bridge.config import Config
from bridge.daemon import Daemon
from bridge.envelope import Conversation, Sender, make_envelope
from bridge.merge import MERGED
from tests.conftest import CollectSink, wait_for

CONFIG = """
[[outbound]]
name = "agent"
type = "collect"
[[outbound]]
name = "back"
type = "collect"
[[inbound]]
name = "m"
type = "manual"
reply_via = "back"
merge_window = {window}
[[routes]]
from = "m"
to = "agent"
"""


async def say(d: Daemon, conv: str, text: str, sender: str = "alice", group: bool = False) -> str:
    env = make_envelope("m", Conversation(conv, "group" if group else "direct"), text, sender=Sender(sender))
    assert d.bus is not None and await d.bus.publish(env)
    return env.id


async def test_a_burst_is_one_turn_and_another_sender_ends_it(
    write_config: Callable[..., Config], start_daemon: Callable[[Config], Awaitable[Daemon]]
) -> None:
    d = await start_daemon(write_config(CONFIG.format(window=0.8)))
    agent = CollectSink.instances["agent"]
    for t in ("so", "about that", "meeting"):
        await say(d, "dm-a", t)
    await say(d, "g", "one", "alice", group=True)
    await say(d, "g", "two", "alice", group=True)
    await say(d, "g", "mine", "bob", group=True)  # someone else: alice's burst goes first
    await say(d, "g", "/status", "bob", group=True)  # a command ends bob's burst, and is answered
    await wait_for(lambda: len(agent.sent) == 3, timeout=10)
    await asyncio.sleep(1.0)
    assert len(agent.sent) == 3
    by_conv: dict[str, list[str]] = {}
    for x in agent.sent:
        by_conv.setdefault(x.envelope.conversation.id, []).append(x.envelope.text)
    assert by_conv == {"dm-a": ["so\nabout that\nmeeting"], "g": ["one\ntwo", "mine"]}
    merged = next(x for x in agent.sent if x.envelope.conversation.id == "dm-a")
    assert merged.envelope.meta[MERGED] == "3"
    await wait_for(lambda: len(CollectSink.instances["back"].sent) == 1)
    # a message after the window is a turn of its own
    await say(d, "dm-a", "later")
    await wait_for(lambda: len(agent.sent) == 4)
    assert agent.sent[-1].envelope.text == "later" and MERGED not in agent.sent[-1].envelope.meta
    assert d.bus is not None and d.redis is not None
    await wait_for(lambda: _pending(d, 0))


async def _pending(d: Daemon, n: int) -> bool:
    assert d.redis is not None and d.bus is not None
    return int((await d.redis.xpending(d.bus.keys.inbound, ROUTER_GROUP))["pending"]) == n


async def test_a_daemon_killed_mid_window_loses_nothing(
    write_config: Callable[..., Config], start_daemon: Callable[[Config], Awaitable[Daemon]], redis: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    # first life: the real daemon in its own process (its agent is a log sink), SIGKILLed mid-window
    cfg = write_config(CONFIG.format(window=6).replace('type = "collect"', 'type = "log"'), name="first.toml")
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "--config", str(cfg.path), "run"],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        bus = Bus(redis, Keys(cfg.redis.prefix))
        await wait_for(lambda: _groups(redis, bus), timeout=30)
        for t in ("first", "second", "third"):
            env = make_envelope("m", Conversation("dm-k", "direct"), t, sender=Sender("alice"))
            assert await bus.publish(env)
        await wait_for(lambda: _pending_n(redis, bus, 3), timeout=30)  # read, held, not acked
        await asyncio.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert await redis.xlen(bus.keys.out("agent")) == 0  # nothing routed yet
    # the next life (same instance name) reads its pending entries again: one turn with all three
    d2 = await start_daemon(write_config(CONFIG.format(window=6)))
    agent = CollectSink.instances["agent"]
    await wait_for(lambda: len(agent.sent) == 1, timeout=40)
    [x] = agent.sent
    assert x.envelope.text == "first\nsecond\nthird" and x.envelope.meta[MERGED] == "3"
    await wait_for(lambda: _pending(d2, 0))


async def _groups(redis: Any, bus: Bus) -> bool:
    try:
        return any(g["name"] == ROUTER_GROUP.encode() for g in await redis.xinfo_groups(bus.keys.inbound))
    except Exception:
        return False


async def _pending_n(redis: Any, bus: Bus, n: int) -> bool:
    return int((await redis.xpending(bus.keys.inbound, ROUTER_GROUP))["pending"]) == n
