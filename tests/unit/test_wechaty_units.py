"""The wechaty adapter's pure parts: payload → envelope mapping, token masking, options, the QR text."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import segno

from adapters.wechaty.client import (
    MESSAGE_TYPES,
    community_ca,
    mask,
    parse_endpoint,
    ssl_context,
    token_server_name,
)
from adapters.wechaty.mapping import file_attachment, message_envelope, room_event_envelope
from adapters.wechaty.options import WechatyOptions, WechatySinkOptions, backoff
from adapters.wechaty.qr import terminal_qr
from bridge.adapter import Registry
from bridge.config import Secret, load


def _msg(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "m1", "type": 7, "talker_id": "alice", "room_id": "r1@chatroom", "listener_id": "",
        "text": "@Bot hello", "mention_ids": ["bot"], "timestamp": 1_700_000_000_123,
    }  # fmt: skip
    base.update(kw)
    return base


def test_a_room_message_with_a_mention() -> None:
    env = message_envelope(
        "wx", message=_msg(), self_id="bot", room={"topic": "Team Room"}, talker={"name": "Alice"}
    )
    assert env.conversation.id == "r1@chatroom" and env.conversation.kind == "group"
    assert env.conversation.title == "Team Room"
    assert env.sender is not None and (env.sender.id, env.sender.name) == ("alice", "Alice")
    assert env.text == "@Bot hello" and env.mentions == ["bot"] and env.mentions_me
    assert env.meta["msg_type"] == "text" and env.meta["message_id"] == "m1"
    assert env.created_at == pytest.approx(1_700_000_000.123)
    assert env.attachments == []
    # deterministic: the same message id is the same envelope id
    again = message_envelope("wx", message=_msg(text="x"), self_id="bot", room=None, talker=None)
    assert again.id == env.id


def test_a_room_message_mentioning_someone_else_does_not_mention_me() -> None:
    env = message_envelope("wx", message=_msg(mention_ids=["bob"]), self_id="bot", room=None, talker=None)
    assert env.mentions == ["bob"] and not env.mentions_me
    assert env.conversation.title is None


def test_a_direct_message_is_addressed_to_the_bot() -> None:
    env = message_envelope(
        "wx", message=_msg(room_id="", listener_id="bot", mention_ids=[]), self_id="bot", room=None,
        talker={"name": "Alice"},
    )  # fmt: skip
    assert env.conversation.id == "alice" and env.conversation.kind == "direct"
    assert env.conversation.title == "Alice" and env.mentions_me
    assert env.meta["listener_id"] == "bot"


@pytest.mark.parametrize(
    ("number", "name", "kind"),
    [(1, "attachment", "file"), (6, "image", "image"), (2, "audio", "voice"), (15, "video", "video"),
     (14, "url", "link"), (3, "contact", "card"), (8, "location", "location"), (0, "unknown", "other")],
)  # fmt: skip
def test_types_follow_the_typescript_numbering(number: int, name: str, kind: str) -> None:
    assert MESSAGE_TYPES[number] == name
    env = message_envelope("wx", message=_msg(type=number, text=""), self_id="bot", room=None, talker=None)
    assert env.meta["msg_type"] == name
    [att] = env.attachments
    assert att.kind == kind and att.media_id == "m1"


def test_a_file_box_becomes_a_reference_without_its_bytes() -> None:
    data = b"quarterly numbers\n"
    box = {
        "type": 1,
        "boxType": 1,
        "name": "report.txt",
        "base64": base64.b64encode(data).decode(),
        "metadata": {},
    }
    att = file_attachment("file", "m9", box)
    assert (att.name, att.size, att.mime, att.media_id) == ("report.txt", len(data), "text/plain", "m9")
    assert att.url is None and att.extra["filebox_type"] == "base64"
    assert "base64" not in str(att.extra) or "not carried" in att.extra["bytes"]
    assert base64.b64encode(data).decode() not in str(att)
    url_box = {"type": 2, "name": "p.png", "url": "https://example.invalid/p.png", "size": 10}
    u = file_attachment("image", "m10", url_box)
    assert (u.url, u.size, u.mime, u.extra["filebox_type"]) == (
        "https://example.invalid/p.png",
        10,
        "image/png",
        "url",
    )
    assert file_attachment("file", "m11", None).name is None


def test_room_events() -> None:
    join = room_event_envelope(
        "wx", "room_join", {"roomId": "r1@chatroom", "inviteeIdList": ["carol"], "inviterId": "alice", "timestamp": 1_700_000_000_000},
        topic="Team Room",
    )  # fmt: skip
    assert join is not None and join.kind == "event" and join.event == "room_join"
    assert join.conversation.title == "Team Room" and join.meta == {"invitees": "carol", "inviter": "alice"}
    assert join.created_at == pytest.approx(1_700_000_000.0)
    leave = room_event_envelope(
        "wx",
        "room_leave",
        {"roomId": "r1@chatroom", "removeeIdList": ["carol"], "removerId": "carol", "timestamp": 5},
    )
    assert leave is not None and leave.text == "carol left" and leave.meta["removees"] == "carol"
    topic = room_event_envelope(
        "wx", "room_topic",
        {"roomId": "r1@chatroom", "changerId": "bob", "oldTopic": "A", "newTopic": "B", "timestamp": 6},
    )  # fmt: skip
    assert topic is not None and topic.conversation.title == "B" and topic.meta["old_topic"] == "A"
    assert room_event_envelope("wx", "room_join", {"inviteeIdList": []}) is None
    with pytest.raises(ValueError):
        room_event_envelope("wx", "room_invite", {"roomId": "r"})


def test_the_token_is_masked_even_when_the_service_quotes_it() -> None:
    text = 'Start: UNAUTHENTICATED: Invalid Wechaty TOKEN "insecure_0123-abcd"'
    assert mask(text, "insecure_0123-abcd") == 'Start: UNAUTHENTICATED: Invalid Wechaty TOKEN "***"'
    assert "0123" not in mask(text, "")  # a token we do not know is still masked where quoted
    assert mask("authorization: Wechaty s3cret", "s3cret") == "authorization: Wechaty ***"


def test_endpoint_and_server_name() -> None:
    assert parse_endpoint("127.0.0.1:8788") == ("127.0.0.1", 8788)
    assert parse_endpoint("[::1]:9") == ("::1", 9)
    assert parse_endpoint("puppet.example.com:443") == ("puppet.example.com", 443)
    for bad in ("127.0.0.1", "http://x:1", "host:0", "host:70000", ""):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    assert token_server_name("insecure_1fa2") == "insecure"
    assert token_server_name("Puppet_PadLocal_abc") == "puppet_padlocal"
    assert token_server_name("notoken") == ""


def test_the_community_ca_loads() -> None:
    ctx = ssl_context(None)
    assert any("wechaty-root-ca" in str(c.get("subject")) for c in ctx.get_ca_certs())


def _opts(**kw: object) -> WechatyOptions:
    base: dict[str, object] = {"endpoint": "127.0.0.1:8788", "token": Secret("insecure_abc")}
    base.update(kw)
    return WechatyOptions(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"endpoint": "nope"}, "endpoint"), ({"token": Secret("")}, "token"),
     ({"token": Secret("plain")}, "server_name"), ({"reconnect_max": 0.5}, "reconnect_max"),
     ({"lease_ttl": 0.5}, "lease_ttl"), ({"timeout": 0}, "timeout"), ({"dedupe_ttl": 5}, "dedupe_ttl")],
)  # fmt: skip
def test_bad_options_name_their_key(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}:"):
        _opts(**kw).check()


def test_good_options() -> None:
    _opts().check()
    _opts(token=Secret("plain"), tls=False).check()  # plaintext needs no server name
    _opts(token=Secret("plain"), server_name="puppet").check()
    WechatySinkOptions(inbound="wx").check()
    with pytest.raises(ValueError, match=r"^per_conversation_rate:"):
        WechatySinkOptions(inbound="wx", per_conversation_rate="lots").check()
    with pytest.raises(ValueError, match=r"^max_bytes:"):
        WechatySinkOptions(inbound="wx", max_bytes=3).check()


def test_backoff_has_jitter_within_bounds() -> None:
    seen = {round(backoff(3, 1.0, 60.0), 6) for _ in range(50)}
    assert len(seen) > 10 and all(1.0 <= s <= 8.0 for s in seen)
    assert all(1.0 <= backoff(50, 1.0, 60.0) <= 60.0 for _ in range(20))


def test_the_terminal_qr_is_the_qr_code() -> None:
    data = "https://login.weixin.qq.com/l/abc123"
    text = terminal_qr(data, border=2)
    matrix = [list(row) for row in segno.make(data, error="l", micro=False).matrix_iter(scale=1, border=2)]
    lines = text.split("\n")
    assert len(lines) == (len(matrix) + 1) // 2 and all(len(line) == len(matrix[0]) for line in lines)
    dark = {"█": (False, False), "▀": (False, True), "▄": (True, False), " ": (True, True)}
    for y, line in enumerate(lines):
        for x, ch in enumerate(line):
            top, bottom = dark[ch]
            assert bool(matrix[2 * y][x]) == top
            if 2 * y + 1 < len(matrix):
                assert bool(matrix[2 * y + 1][x]) == bottom


def test_the_example_config_entries_are_valid(tmp_path: Path) -> None:
    """The commented wechaty entries of config/bridge.example.toml, uncommented, validate."""
    text = (Path(__file__).parents[2] / "config" / "bridge.example.toml").read_text()
    blocks = re.findall(r"^# \[\[(?:in|out)bound\]\]\n(?:# .*\n)+", text, flags=re.M)
    ours = [b for b in blocks if '# type = "wechaty"' in b]
    assert len(ours) == 2
    body = "".join(re.sub(r"^# ", "", b, flags=re.M) + "\n" for b in ours)
    (tmp_path / "wechaty-token").write_text("insecure_0f0f")
    (tmp_path / "wechaty-ca.pem").write_text(community_ca())
    cfg_path = tmp_path / "bridge.toml"
    cfg_path.write_text(f'[bridge]\ndata_dir = "{tmp_path}"\n' + body)
    cfg = load(cfg_path, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    options = Registry.from_module().validate(cfg)
    assert options["wx"].endpoint == "127.0.0.1:8788" and options["wx"].token.reveal() == "insecure_0f0f"
    assert options["wx"].ca == community_ca().strip()
    assert options["wx-out"].inbound == "wx"
    assert cfg.outbound_by_name("wx-out") is not None and cfg.outbound_by_name("wx-out").rate == "20/minute"  # type: ignore[union-attr]
