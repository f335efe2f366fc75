"""Access policies, pairing and session commands through a running daemon (real Redis).

Each inbound below is a ``manual`` one with its own policy, routed to the ``agent`` collect sink;
answers of the bridge (refusals, pairing codes, commands) go back through ``reply_via`` to the
``back`` collect sink. Messages are judged in order by the one router, so a last message on the
open inbound that reaches the agent means every message before it was judged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bridge import cli, refusals
from bridge.adapter import Registry
from bridge.commands import SESSION_GEN
from bridge.config import Config
from bridge.daemon import Daemon
from bridge.envelope import Conversation, Delivery, Sender, make_envelope
from tests.conftest import CollectSink, wait_for

CONFIG = """
[[outbound]]
name = "agent"
type = "session_collect"
[[outbound]]
name = "back"
type = "collect"

[[inbound]]
name = "open"
type = "manual"
reply_via = "back"

[[inbound]]
name = "allow"
type = "manual"
reply_via = "back"
[inbound.access]
dm_policy = "allowlist"
group_policy = "allowlist"
allow_senders = ["alice"]
allow_groups = ["g-ok", "g-some"]
group_senders = {g-some = ["alice"]}
admins = ["boss"]
refusal_reply = "Sorry, not for you."
refusal_rate = "1/hour"

[[inbound]]
name = "closed"
type = "manual"
reply_via = "back"
[inbound.access]
dm_policy = "disabled"
group_policy = "disabled"
admins = ["boss"]

[[inbound]]
name = "pair"
type = "manual"
reply_via = "back"
[inbound.access]
dm_policy = "pairing"
pairing_ttl = 600

[[inbound]]
name = "mention"
type = "manual"
reply_via = "back"

[commands.status]
names = ["/status", "/st"]
[commands.new]
names = ["/new", "/reset"]
admins_only = false
[commands.stop]
names = ["/stop"]
admins_only = true

[[routes]]
from = ["open", "allow", "closed", "pair"]
to = "agent"
[[routes]]
from = "mention"
to = "agent"
match = {mentions_only = true}
"""

Send = Callable[..., Awaitable[str]]


class SessionCollect(CollectSink):
    """A collect sink that keeps agent sessions (so the router stamps ``session_gen`` for it)."""

    keeps_sessions = True


@pytest.fixture
def registry(registry: Registry) -> Registry:
    registry.sinks["session_collect"] = SessionCollect
    return registry


@pytest.fixture
async def bridge(
    write_config: Callable[..., Config], start_daemon: Callable[[Config], Awaitable[Daemon]]
) -> tuple[Daemon, Config]:
    cfg = write_config(CONFIG)
    return await start_daemon(cfg), cfg


async def send(d: Daemon, source: str, conv: str, text: str, *, sender: str = "alice",
               group: bool = False, mention: bool = False) -> str:  # fmt: skip
    env = make_envelope(
        source, Conversation(conv, "group" if group else "direct"), text,
        sender=Sender(sender), mentions_me=mention,
    )  # fmt: skip
    assert d.bus is not None
    if d not in RUNNING:
        RUNNING.append(d)
    assert await d.bus.publish(env)
    return env.id


async def settle(d: Daemon) -> None:
    """Every message published so far has been judged and its deliveries sent: a marker went through
    the open inbound, and then the router's and the sinks' groups have nothing unread or unacked."""
    mark = await send(d, "open", "marker", "marker")
    await wait_for(lambda: any(x.envelope.id == mark for x in agent()))
    await wait_for(lambda: _idle(d), timeout=20)


async def _idle(d: Daemon) -> bool:
    assert d.bus is not None and d.redis is not None
    streams = [(d.bus.keys.inbound, "router")]
    streams += [(s, "runner") for sink in ("agent", "back") for s in d.bus.out_streams(sink)]
    for stream, group in streams:
        if not await d.redis.exists(stream):
            continue
        for g in await d.redis.xinfo_groups(stream):
            if g["name"].decode() == group and (int(g["pending"]) or int(g.get("lag") or 0)):
                return False
    return True


#: the daemons of the running test (a sink's deliveries may be sent by any of them)
RUNNING: list[Daemon] = []


@pytest.fixture(autouse=True)
def _running() -> None:
    RUNNING.clear()


def _sent(sink: str) -> list[Delivery]:
    out: list[Delivery] = []
    for d in RUNNING:
        s = d.sinks.get(sink)
        if isinstance(s, CollectSink):
            out += s.sent
    return out


def agent() -> list[Delivery]:
    return _sent("agent")


def back() -> list[Delivery]:
    return _sent("back")


def reached(ids: list[str]) -> list[bool]:
    seen = {x.envelope.id for x in agent()}
    return [i in seen for i in ids]


# -- each policy × conversation kind --------------------------------------------------------------------

# (source, conversation, group?, sender, mention?) → reaches the agent?
MATRIX = [
    ("open", "dm-bob", False, "bob", False, True),
    ("open", "g-any", True, "bob", True, True),
    ("allow", "dm-alice", False, "alice", False, True),
    ("allow", "dm-bob", False, "bob", False, False),
    ("allow", "dm-boss", False, "boss", False, True),
    ("allow", "g-ok", True, "bob", True, True),
    ("allow", "g-no", True, "alice", True, False),
    ("allow", "g-no", True, "boss", True, True),
    ("allow", "g-some", True, "alice", True, True),
    ("allow", "g-some", True, "bob", True, False),
    ("closed", "dm-alice", False, "alice", False, False),
    ("closed", "g-ok", True, "alice", True, False),
    ("closed", "dm-boss", False, "boss", False, True),
    ("pair", "g-any", True, "stranger", True, True),
    ("pair", "dm-stranger", False, "stranger", False, False),
]


async def test_each_policy_and_conversation_kind(bridge: tuple[Daemon, Config]) -> None:
    d, _ = bridge
    ids = [
        await send(d, src, conv, f"hello {i}", sender=who, group=group, mention=mention)
        for i, (src, conv, group, who, mention, _) in enumerate(MATRIX)
    ]
    await settle(d)
    expected = [row[-1] for row in MATRIX]
    assert reached(ids) == expected, [(row, got) for row, got in zip(MATRIX, reached(ids), strict=True)]
    assert d.router is not None
    refused = sum(1 for r in MATRIX if not r[-1])
    assert d.router.gate.refused == refused


async def test_refusals_are_logged_without_text(
    bridge: tuple[Daemon, Config], capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = bridge
    refusals.reset()
    await send(d, "allow", "dm-bob", "my secret words", sender="bob")
    await settle(d)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    lines = [ln for ln in out.splitlines() if "access.refused" in ln]
    assert lines and "bob" in lines[0] and "dm_not_allowed" in lines[0]
    assert "my secret words" not in out
    assert refusals.counts()[("access.refused", "allow", "dm_not_allowed")] == 1


async def test_refusal_reply_is_rate_limited_per_sender(bridge: tuple[Daemon, Config]) -> None:
    d, _ = bridge
    for i in range(4):
        await send(d, "allow", "dm-bob", f"try {i}", sender="bob")
    await send(d, "allow", "dm-carol", "hi", sender="carol")
    # a group message that does not mention the bot is refused silently (not addressed to it)
    await send(d, "allow", "g-no", "chatter", sender="dave", group=True)
    await settle(d)
    await wait_for(lambda: len(back()) >= 2)
    await settle(d)
    replies = [(x.conversation, x.envelope.text, x.envelope.kind) for x in back()]
    assert sorted(replies) == [
        ("dm-bob", "Sorry, not for you.", "reply"),
        ("dm-carol", "Sorry, not for you.", "reply"),
    ]
    origin = back()[0].envelope.origin
    assert origin is not None and origin.source == "allow"
    assert not any(x.envelope.source == "allow" for x in agent())


# -- session commands -------------------------------------------------------------------------------------


async def test_commands_are_answered_by_the_bridge_and_never_routed(bridge: tuple[Daemon, Config]) -> None:
    d, _ = bridge
    before = await send(d, "open", "dm-1", "first")
    new = await send(d, "open", "dm-1", "/RESET")
    after = await send(d, "open", "dm-1", "second")
    status = await send(d, "open", "dm-1", "/st")
    unknown = await send(d, "open", "dm-1", "/weather tomorrow")
    stop = await send(d, "open", "dm-1", "/stop", sender="alice")
    helped = await send(d, "open", "dm-1", "/help")
    await settle(d)
    assert reached([before, new, after, status, unknown, stop, helped]) == [
        True, False, True, False, True, False, False,
    ]  # fmt: skip
    await wait_for(lambda: len(back()) == 4)
    by_origin = {x.envelope.reply_to: x.envelope.text for x in back()}
    assert by_origin[new].startswith("New conversation started")
    assert "session #1" in by_origin[status]
    assert "agent: no agent session; " in by_origin[status]
    assert by_origin[stop] == "/stop is for admins only."
    assert "/new / /reset" in by_origin[helped] and "(admins only)" in by_origin[helped]
    gens = {x.envelope.id: x.envelope.meta.get(SESSION_GEN) for x in agent()}
    assert gens[before] is None and gens[after] == "1" and gens[unknown] == "1"


async def test_a_group_command_needs_a_mention_where_mentions_only_is_on(
    bridge: tuple[Daemon, Config],
) -> None:
    d, _ = bridge
    plain = await send(d, "mention", "g1", "/status", group=True)
    mentioned = await send(d, "mention", "g1", "@bot /status", group=True, mention=True)
    other = await send(d, "open", "g2", "/status", group=True)  # no mentions_only there
    await settle(d)
    assert reached([plain, mentioned, other]) == [False, False, False]
    await wait_for(lambda: len(back()) == 2)
    assert {x.envelope.reply_to for x in back()} == {mentioned, other}


async def test_new_is_per_conversation_and_survives_a_restart(
    write_config: Callable[..., Config], start_daemon: Callable[[Config], Awaitable[Daemon]]
) -> None:
    cfg = write_config(CONFIG)
    d = await start_daemon(cfg)
    await send(d, "open", "dm-a", "/new")
    await send(d, "open", "dm-a", "/new")
    await settle(d)
    await d.stop()
    d2 = await start_daemon(cfg)
    a = await send(d2, "open", "dm-a", "x")
    b = await send(d2, "open", "dm-b", "y")
    await settle(d2)
    gens = {x.envelope.id: x.envelope.meta.get(SESSION_GEN) for x in agent()}
    assert gens[a] == "2" and gens[b] is None


# -- pairing ---------------------------------------------------------------------------------------------


async def _cli(cfg: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """``wechat-bridge pairing …`` as the CLI runs it (its parser and command), minus main()'s log
    set-up, which would reconfigure structlog for the tests that follow."""
    capsys.readouterr()
    args = cli.build_parser().parse_args(list(argv))
    code = await cli._pairing(cfg, args)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


async def test_pairing_end_to_end_through_the_cli_across_a_restart_and_two_instances(
    write_config: Callable[..., Config],
    start_daemon: Callable[[Config], Awaitable[Daemon]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg1 = write_config(CONFIG)
    cfg2 = write_config(CONFIG, name="two.toml")
    cfg2.bridge.instance = "t2"
    d1 = await start_daemon(cfg1)
    first = await send(d1, "pair", "dm-eve", "hello", sender="eve")
    await settle(d1)
    await wait_for(lambda: len(back()) == 1)
    code_text = back()[0].envelope.text
    rc, listed = await _cli(cfg1, capsys, "pairing", "list")
    assert rc == 0
    [pending] = listed["pending"]
    assert pending["inbound"] == "pair" and pending["sender"] == "eve"
    code = pending["code"]
    assert code in code_text and len(code) == 8
    # asking again gives the same code (rate-limited: no second answer within refusal_rate)
    await send(d1, "pair", "dm-eve", "hello?", sender="eve")
    await settle(d1)
    assert len(back()) == 1
    # the bridge restarts, and a second instance joins: the code is still there, shared
    await d1.stop()
    d1 = await start_daemon(cfg1)
    d2 = await start_daemon(cfg2)
    RUNNING.extend([d1, d2])
    rc, listed = await _cli(cfg2, capsys, "pairing", "list")
    assert [p["code"] for p in listed["pending"]] == [code]
    rc, bad = await _cli(cfg1, capsys, "pairing", "approve", "AAAAAAAA")
    assert rc == 1 and bad is None
    rc, ok = await _cli(cfg1, capsys, "pairing", "approve", code.lower())
    assert rc == 0 and ok == {"approved": "eve", "inbound": "pair"}
    rc, _ = await _cli(cfg1, capsys, "pairing", "approve", code)
    assert rc == 1  # one-time
    # from the next message on, eve passes — through either instance
    later = [await send(d, "pair", "dm-eve", f"now {i}", sender="eve") for i, d in enumerate((d1, d2))]
    await settle(d1)
    await settle(d2)
    await wait_for(lambda: all(reached(later)))
    assert reached([first]) == [False]
    rc, listed = await _cli(cfg1, capsys, "pairing", "list")
    assert listed == {"pending": [], "paired": {"pair": ["eve"]}}
    rc, revoked = await _cli(cfg1, capsys, "pairing", "revoke", "eve")
    assert rc == 0 and revoked == {"revoked": "eve", "inbounds": ["pair"]}
    gone = await send(d1, "pair", "dm-eve", "still here?", sender="eve")
    await settle(d1)
    await settle(d2)
    assert reached([gone]) == [False]


async def test_events_follow_the_policy_silently(bridge: tuple[Daemon, Config]) -> None:
    d, _ = bridge
    assert d.bus is not None
    for src, sender in (("allow", "bob"), ("allow", "alice"), ("pair", "stranger")):
        env = make_envelope(src, Conversation(f"dm-{sender}", "direct"), "", kind="event", event="subscribe",
                            sender=Sender(sender))  # fmt: skip
        assert await d.bus.publish(env)
    await settle(d)
    assert d.router is not None and d.router.gate.refused == 2
    assert back() == []  # an event is never answered: no refusal, no pairing code
    assert d.redis is not None
    assert await d.redis.hlen(d.router.gate.pairing.keys.pending("pair")) == 0
