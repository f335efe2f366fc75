"""The access decision (pure), command words and the config's access/commands checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.access import Decision, addressed, decide
from bridge.commands import command_word
from bridge.config import AccessConfig, load
from bridge.envelope import Conversation, Sender, make_envelope
from bridge.errors import ConfigError


def env(kind: str, conv: str, sender: str | None, mention: bool = False) -> object:
    return make_envelope(
        "in", Conversation(conv, "group" if kind == "group" else "direct"), "hi",
        sender=Sender(sender) if sender else None, mentions_me=mention,
    )  # fmt: skip


A = AccessConfig(
    dm_policy="allowlist", group_policy="allowlist", allow_senders=["al"], allow_groups=["g1", "g2"],
    group_senders={"g2": ["al"]}, admins=["boss"],
)  # fmt: skip


@pytest.mark.parametrize(
    ("access", "kind", "conv", "sender", "want"),
    [
        (AccessConfig(), "direct", "d", "x", Decision.ALLOW),
        (AccessConfig(), "group", "g", "x", Decision.ALLOW),
        (AccessConfig(), "direct", "d", None, Decision.ALLOW),
        (A, "direct", "d", "al", Decision.ALLOW),
        (A, "direct", "d", "bob", Decision.REFUSE_DM_NOT_ALLOWED),
        (A, "direct", "d", None, Decision.REFUSE_NO_SENDER),
        (A, "direct", "d", "boss", Decision.ALLOW),
        (A, "group", "g1", "bob", Decision.ALLOW),
        (A, "group", "g3", "al", Decision.REFUSE_GROUP_NOT_ALLOWED),
        (A, "group", "g3", "boss", Decision.ALLOW),
        (A, "group", "g2", "al", Decision.ALLOW),
        (A, "group", "g2", "bob", Decision.REFUSE_GROUP_SENDER),
        (A, "group", "g2", None, Decision.REFUSE_GROUP_SENDER),
        (AccessConfig(dm_policy="disabled"), "direct", "d", "al", Decision.REFUSE_DM_DISABLED),
        (AccessConfig(dm_policy="disabled"), "group", "g", "al", Decision.ALLOW),
        (AccessConfig(group_policy="disabled"), "group", "g", "al", Decision.REFUSE_GROUP_DISABLED),
        (AccessConfig(group_policy="disabled"), "direct", "d", "al", Decision.ALLOW),
        (AccessConfig(dm_policy="pairing"), "direct", "d", "new", Decision.PAIRING),
        (AccessConfig(dm_policy="pairing", allow_senders=["al"]), "direct", "d", "al", Decision.ALLOW),
        (AccessConfig(dm_policy="pairing"), "group", "g", "new", Decision.ALLOW),
    ],
)
def test_decide(access: AccessConfig, kind: str, conv: str, sender: str | None, want: Decision) -> None:
    assert decide(access, env(kind, conv, sender)) is want  # type: ignore[arg-type]


def test_addressed() -> None:
    assert addressed(env("direct", "d", "x"))  # type: ignore[arg-type]
    assert addressed(env("group", "g", "x", mention=True))  # type: ignore[arg-type]
    assert not addressed(env("group", "g", "x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("/new", "/new"), ("  /New please", "/new"), ("@bot /status", "/status"),
        ("@bot\u2005/stop", "/stop"), ("hello /new", None), ("", None), ("/", None), ("//x", "//x"),
    ],
)  # fmt: skip
def test_command_word(text: str, word: str | None) -> None:
    assert command_word(text) == word


def _load(tmp_path: Path, body: str) -> None:
    p = tmp_path / "b.toml"
    p.write_text('[[outbound]]\nname = "back"\ntype = "log"\n' + body)
    load(p, env={})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('[[inbound]]\nname = "i"\ntype = "manual"\n[inbound.access]\ndm_policy = "maybe"\n',
         "inbound.i.access.dm_policy"),
        ('[[inbound]]\nname = "i"\ntype = "manual"\n[inbound.access]\ndm_policy = "pairing"\n',
         "inbound.i.access.dm_policy: pairing sends a code back: set reply_via"),
        ('[[inbound]]\nname = "i"\ntype = "manual"\n[inbound.access]\nrefusal_reply = "no"\n',
         "inbound.i.access.refusal_reply: needs reply_via"),
        ('[[inbound]]\nname = "i"\ntype = "manual"\nreply_via = "back"\n[inbound.access]\nrefusal_rate = "lots"\n',
         "inbound.i.access.refusal_rate"),
        ('[[inbound]]\nname = "i"\ntype = "manual"\n[inbound.access]\nallow = ["x"]\n',
         "inbound.i.access.allow: unknown key"),
        ('[[inbound]]\nname = "i"\ntype = "manual"\nreply_via = "back"\n[inbound.access]\n'
         'dm_policy = "pairing"\npairing_reply = "no code here"\n', "pairing_reply: must contain {code}"),
        ('[commands.new]\nnames = ["new"]\n', "commands.new.names: 'new' is not a word starting with '/'"),
        ('[commands.help]\nnames = ["/status"]\n', "commands.help.names: '/status' is also a name of status"),
        ('[commands]\nreset = true\n', "commands.reset: unknown key"),
    ],
)  # fmt: skip
def test_bad_access_and_commands_config_names_the_key(tmp_path: Path, body: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, body)
    assert error in str(e.value)


def test_a_good_access_config_loads(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_text(
        '[[outbound]]\nname = "back"\ntype = "log"\n[[inbound]]\nname = "i"\ntype = "manual"\n'
        'reply_via = "back"\n[inbound.access]\ndm_policy = "pairing"\ngroup_policy = "allowlist"\n'
        'allow_groups = ["g"]\ngroup_senders = {g = ["a"]}\nadmins = ["a"]\n'
        '[commands.stop]\nnames = ["/stop", "/halt"]\nadmins_only = true\n'
    )
    cfg = load(p, env={})
    a = cfg.inbound[0].access
    assert a.dm_policy == "pairing" and a.group_senders == {"g": ["a"]}
    assert cfg.inbound[0].options == {}
    assert cfg.commands.stop.admins_only and cfg.commands.new.names == ["/new", "/reset"]
