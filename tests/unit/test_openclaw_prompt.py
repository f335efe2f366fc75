"""Session keys safe under the gateway's lowercasing, and the message text the agent gets."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.openclaw import prompt
from bridge.envelope import Attachment, Conversation, Sender, make_envelope


def test_plain_lowercase_ids_are_kept_as_they_are() -> None:
    for v in ("alice", "wrkx9q", "room-1", "a_b", "x" * 64):
        assert prompt.safe_component(v) == v


def test_ids_whose_case_matters_are_hashed_not_folded() -> None:
    upper, lower = prompt.safe_component("wrKx9QAbC"), prompt.safe_component("wrkx9qabc")
    assert lower == "wrkx9qabc"
    assert upper == "wrkx9qabc." + hashlib.sha256(b"wrKx9QAbC").hexdigest()[:16]
    assert upper != lower
    # OpenIDs differing only in case get different sessions
    assert prompt.safe_component("oAbCdEf") != prompt.safe_component("oABCDEF")


def test_unsafe_characters_and_long_ids_are_escaped_readably() -> None:
    v = prompt.safe_component("Team Chat: 运维 @ops.example")
    readable, _, digest = v.rpartition(".")
    assert readable == "team_chat_ops_example"
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert prompt.safe_component("y" * 65).startswith("y" * 40 + ".")
    assert prompt.safe_component("").startswith("id.")
    assert prompt.safe_component("运维") == "id." + hashlib.sha256("运维".encode()).hexdigest()[:16]


@given(st.text(max_size=80), st.text(max_size=80))
def test_distinct_ids_never_share_a_key_and_keys_survive_lowercasing(a: str, b: str) -> None:
    ka, kb = prompt.safe_component(a), prompt.safe_component(b)
    assert ka == ka.lower() and ":" not in ka
    assert (ka == kb) == (a == b)


def test_session_key_template() -> None:
    key = prompt.session_key(
        "wechat:{source}:{kind}:{conversation}",
        source="corp",
        conversation="wrGROUP1",
        kind="group",
        sender="x",
    )
    assert key == "wechat:corp:group:wrgroup1." + hashlib.sha256(b"wrGROUP1").hexdigest()[:16]
    assert (
        prompt.session_key("wechat:{sender}", source="s", conversation="c", kind="direct", sender=None)
        == "wechat:-"
    )


@pytest.mark.parametrize(
    "template,error",
    [
        ("WeChat:{conversation}", "lowercase"),
        ("wechat:{room}", "unknown placeholder {room}"),
        ("agent:main:{conversation}", "must not start with agent:"),
        ("wechat:{conversation!r}", "no format specs"),
        ("wechat:{conversation", "not a valid template"),
        ("", "must not be empty"),
        ("wechat key:{conversation}", "lowercase"),
    ],
)
def test_bad_session_key_templates_are_refused(template: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        prompt.check_session_template(template)


def test_message_templates_are_checked() -> None:
    prompt.check_template("{sender} in {group}: {text}")
    with pytest.raises(ValueError, match=re.escape("must contain {text}")):
        prompt.check_template("{sender} said something")
    with pytest.raises(ValueError, match=re.escape("unknown placeholder {who}")):
        prompt.check_template("{who}: {text}")


def shape(env: object, **kw: object) -> str:
    args: dict[str, object] = {
        "group_template": "{sender} in {group}: {text}",
        "direct_template": "{sender}: {text}",
        "bot_names": [],
    }
    args.update(kw)
    return prompt.shape(env, **args)  # type: ignore[arg-type]


def test_sender_name_and_group_title_are_in_the_message() -> None:
    env = make_envelope(
        "bot", Conversation("wrG1", "group", "运维值班群"), "服务器挂了吗?", sender=Sender("zhangsan", "张三")
    )
    assert shape(env) == "张三 in 运维值班群: 服务器挂了吗?"
    untitled = make_envelope("bot", Conversation("wrG1", "group"), "hi", sender=Sender("zhangsan"))
    assert shape(untitled) == "zhangsan in wrG1: hi"
    direct = make_envelope("app", Conversation("lisi"), "hello", sender=Sender("lisi", "李四"))
    assert shape(direct) == "李四: hello"
    assert shape(direct, direct_template="{text}") == "hello"
    assert (
        shape(untitled, group_template="[{source}/{conversation}] {sender_id}: {text}")
        == "[bot/wrG1] zhangsan: hi"
    )


def test_the_bots_own_mention_is_stripped() -> None:
    env = make_envelope(
        "bot", Conversation("wrG1", "group", "群"), "@小助手\u2005帮我查一下 @张三 的工单", sender=Sender("u", "U"),
        mentions=["AIBOTID"], mentions_me=True,
    )  # fmt: skip
    assert shape(env, bot_names=["小助手"]) == "U in 群: 帮我查一下 @张三 的工单"
    # mid-text and at the end; a longer name that merely starts like the bot's stays
    assert prompt.strip_mentions("hi @bot how are you @bot", ["bot"]) == "hi how are you"
    assert prompt.strip_mentions("@botany is a science", ["bot"]) == "@botany is a science"
    # the mention ids the inbound recorded are stripped too when the message mentions the bot
    env2 = make_envelope("bot", Conversation("g"), "@AIBOTID ping", mentions=["AIBOTID"], mentions_me=True)
    assert shape(env2, direct_template="{text}") == "ping"


def test_attachments_become_short_placeholders() -> None:
    atts = [
        Attachment("image", url="https://x/img.jpg", media_id="m1"),
        Attachment("file", name="季度报告.pdf", media_id="m2"),
        Attachment("voice", media_id="m3"),
        Attachment("link", url="https://example.com/a", title="An article"),
        Attachment("location", title="Guangzhou Tower", extra={"latitude": "23.1", "longitude": "113.3"}),
        Attachment("other", extra={"msg_type": "miniprogram"}),
    ]
    env = make_envelope("app", Conversation("u1"), "look", sender=Sender("u1"), attachments=atts)
    assert shape(env, direct_template="{text}").splitlines() == [
        "look",
        "[image]",
        "[file: 季度报告.pdf]",
        "[voice]",
        "[link: An article https://example.com/a]",
        "[location: Guangzhou Tower (23.1, 113.3)]",
        "[other: miniprogram]",
    ]
    only_image = make_envelope("app", Conversation("u1"), "", sender=Sender("u1"), attachments=atts[:1])
    assert shape(only_image) == "u1: [image]"


def test_events_and_empty_messages() -> None:
    event = make_envelope("oa", Conversation("oX"), kind="event", event="subscribe", sender=Sender("oX"))
    assert shape(event) == "oX: [event: subscribe]"
    empty = make_envelope("bot", Conversation("g", "group"), "@小助手", sender=Sender("u"), mentions_me=True)
    with pytest.raises(ValueError, match="nothing to send"):
        shape(empty, bot_names=["小助手"])
