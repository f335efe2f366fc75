from __future__ import annotations

from pathlib import Path

from bridge.config import load
from bridge.envelope import Conversation, Origin, Sender, delivery_id, make_envelope
from bridge.router import plan

CFG = """
[[inbound]]
name = "corp"
type = "manual"
reply_via = "corp-out"
[[inbound]]
name = "oa"
type = "manual"
[[outbound]]
name = "corp-out"
type = "log"
[[outbound]]
name = "claw"
type = "log"
[[outbound]]
name = "ops"
type = "log"
default_conversation = "ops-room"
[[outbound]]
name = "audit"
type = "log"
[[routes]]
name = "ai"
from = ["corp", "oa"]
to = "claw"
match = {mentions_only = true}
reply = true
[[routes]]
name = "ops"
from = "corp"
to = [{sink = "ops"}, {sink = "corp-out", conversation = "wr-fixed"}]
match = {text = "(?i)alert", conversations = ["g1"]}
[[routes]]
name = "audit-replies"
from = "claw"
to = "audit"
"""


def cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "b.toml"
    p.write_text(CFG)
    return load(p, env={})


def test_mentions_only_applies_to_groups(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    group = make_envelope("corp", Conversation("g1", "group"), "hello")
    assert plan(c, group) == []
    mentioned = make_envelope("corp", Conversation("g1", "group"), "hello", mentions_me=True)
    assert [d.sink for d in plan(c, mentioned)] == ["claw"]
    direct = make_envelope("corp", Conversation("u1", "direct"), "hello")
    assert [d.sink for d in plan(c, direct)] == ["claw"]


def test_text_and_conversation_match_and_targets(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    env = make_envelope("corp", Conversation("g1", "group"), "ALERT: disk full")
    ds = {d.sink: d for d in plan(c, env)}
    assert set(ds) == {"ops", "corp-out"}
    assert ds["ops"].conversation == "ops-room"  # the sink's default_conversation
    assert ds["corp-out"].conversation == "wr-fixed"
    other = make_envelope("corp", Conversation("g2", "group"), "ALERT")
    assert plan(c, other) == []


def test_delivery_ids_are_deterministic(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    env = make_envelope("corp", Conversation("u1"), "x")
    assert [d.id for d in plan(c, env)] == [d.id for d in plan(c, env)]
    assert plan(c, env)[0].id == delivery_id(env.id, "claw", None)


def test_events_are_not_routed_unless_asked(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    env = make_envelope("corp", Conversation("u1"), "", kind="event", event="subscribe")
    assert plan(c, env) == []


def test_reply_goes_home_through_reply_via(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    conv = Conversation("g1", "group", "Team")
    origin = Origin("corp", conv, "e1", Sender("u1"))
    reply = make_envelope("claw", conv, "the answer", kind="reply", origin=origin, reply_to="e1", hops=1)
    ds = {d.sink: d for d in plan(c, reply)}
    assert set(ds) == {"corp-out", "audit"}
    assert ds["corp-out"].conversation == "g1"


def test_reply_to_origin_without_reply_via_is_dropped_with_a_warning(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    conv = Conversation("u9")
    reply = make_envelope("claw", conv, "x", kind="reply", origin=Origin("oa", conv, "e1"), hops=1)
    assert [d.sink for d in plan(c, reply)] == ["audit"]


def test_loops_stop(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    env = make_envelope("corp", Conversation("u1"), "x", hops=99)
    assert plan(c, env) == []
