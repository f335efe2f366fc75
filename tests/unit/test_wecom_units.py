"""Pure parts of the WeCom/OA sinks: targets, webhook keys, errcode mapping, rendering, options."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.official_account.customer_service import openid_of
from adapters.official_account.customer_service import render as oa_render
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wechat.parts import attachment_line, text_parts
from adapters.wecom.app_sink import Target, render, target_of
from adapters.wecom.webhook_sink import parse_key
from bridge.adapter import Registry
from bridge.envelope import Attachment, Conversation, Delivery, make_envelope
from bridge.errors import ConfigError, PermanentError, RetryableError


def delivery(conv: str | None, env_conv: str = "alice", kind: str = "direct") -> Delivery:
    env = make_envelope("in", Conversation(env_conv, kind), "x")  # type: ignore[arg-type]
    return Delivery("d", "app", env, conv)


@pytest.mark.parametrize(
    ("conv", "env_conv", "kind", "target"),
    [
        ("chat:wrOps", "alice", "direct", Target("chat", "wrOps")),
        ("user:bob", "g1", "group", Target("user", "bob")),
        ("user:a|b", "g1", "group", Target("user", "a|b")),
        ("party:2", "g1", "group", Target("party", "2")),
        ("tag:7", "g1", "group", Target("tag", "7")),
        (None, "alice", "direct", Target("user", "alice")),  # no target: the envelope's own
        (None, "wrHome", "group", Target("chat", "wrHome")),
        ("alice", "alice", "direct", Target("user", "alice")),  # a reply going home
        ("wrHome", "wrHome", "group", Target("chat", "wrHome")),
        (None, "chat:wrX", "direct", Target("chat", "wrX")),  # a prefix always wins
    ],
)
def test_targets(conv: str | None, env_conv: str, kind: str, target: Target) -> None:
    assert target_of(delivery(conv, env_conv, kind)) == target


def test_a_bare_foreign_conversation_is_refused() -> None:
    with pytest.raises(PermanentError, match="write chat:bob or user:bob"):
        target_of(delivery("bob", "alice"))
    with pytest.raises(PermanentError):
        target_of(delivery("unknown:bob", "alice"))


def test_webhook_keys() -> None:
    assert parse_key("abc-123") == ("abc-123", None)
    url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=abc-123"
    assert parse_key(url) == ("abc-123", "https://qyapi.weixin.qq.com")
    assert parse_key(" http://127.0.0.1:8000/cgi-bin/webhook/send?debug=1&key=k ") == (
        "k",
        "http://127.0.0.1:8000",
    )
    for bad in ("", "https://qyapi.weixin.qq.com/cgi-bin/webhook/send", "a/b", "key=abc"):
        with pytest.raises(ValueError, match="key:"):
            parse_key(bad)


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (-1, RetryableError, "busy"),
        (45009, RetryableError, "frequency"),
        (45033, RetryableError, "concurrent"),
        (42001, RetryableError, "rejected again"),
        (60020, PermanentError, "企业可信IP"),
        (93000, PermanentError, "webhook URL"),
        (81013, PermanentError, "visible range"),
        (40058, PermanentError, "text_limit/markdown_limit"),
        (45002, PermanentError, "should not happen"),
        (86001, PermanentError, "appchat create"),
        (86003, PermanentError, "appchat create"),
        (40050, PermanentError, "appchat create"),
        (45015, PermanentError, "48-hour"),
        (12345, PermanentError, "devtool/query?e=12345"),
    ],
)
def test_errcodes(code: int, kind: type[Exception], words: str) -> None:
    err = send_error(ApiError("/cgi-bin/x", code, "whatever, hint: [123]"), backoff=60)
    assert isinstance(err, kind) and words in str(err), str(err)
    assert str(err).startswith(f"/cgi-bin/x: errcode {code}")


def test_backoff_for_frequency_limits() -> None:
    err = send_error(ApiError("/p", 45009), backoff=60)
    assert isinstance(err, RetryableError) and err.retry_after == 60
    err = send_error(ApiError("/p", 45033), backoff=60)
    assert isinstance(err, RetryableError) and err.retry_after == 5


def test_errmsg_is_only_a_hint_and_scrubbed() -> None:
    e = ApiError("/p", 99999, "bad thing at https://x/?access_token=SECRET123&key=K, hint: [1]")
    assert "SECRET123" not in str(send_error(e)) and "K," not in e.errmsg


def test_text_parts_numbered_only_when_split() -> None:
    assert [p.payload for p in text_parts("short", markdown=False, text_limit=2048, markdown_limit=2048)] == [
        {"content": "short"}
    ]
    parts = text_parts("字" * 1500, markdown=False, text_limit=2048, markdown_limit=2048)
    assert [p.payload["content"][:6] for p in parts] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert text_parts("", markdown=False, text_limit=2048, markdown_limit=2048) == []
    md = text_parts("```py\n" + "x = 1\n" * 800 + "```", markdown=True, text_limit=2048, markdown_limit=2048)
    assert all(p.msgtype == "markdown" and len(p.payload["content"].encode()) <= 2048 for p in md)
    assert all(p.payload["content"].rstrip().endswith("```") for p in md)  # fences closed in each part


def test_app_render_keeps_order_and_never_drops() -> None:
    big = "t" * 200  # a title WeCom would truncate (128 bytes): sent as text instead
    env = make_envelope(
        "in", Conversation("a"), "hello",
        attachments=[
            Attachment("link", url="https://l/1", title="one"),
            Attachment("video", media_id="V", title="clip"),
            Attachment("link", url="https://l/2", title=big),
            Attachment("voice", url="https://v/1.amr"),
        ],
    )  # fmt: skip
    parts = render(env, text_limit=2048, markdown_limit=2048, markdown=True, number_parts=True)
    assert [p.msgtype for p in parts] == ["text", "news", "video"]
    assert parts[0].payload["content"] == f"hello\n[link] {big} https://l/2\n[voice] https://v/1.amr"
    assert parts[2].payload == {"media_id": "V", "title": "clip"}
    env.format = "markdown"
    md = render(env, text_limit=2048, markdown_limit=2048, markdown=False, number_parts=True)
    assert md[0].msgtype == "text"  # markdown = false: sent as text


def test_oa_render_and_openid() -> None:
    env = make_envelope(
        "in", Conversation("oA"), "", attachments=[Attachment("location", extra={"lat": 1, "lng": 2})]
    )
    assert [p.payload for p in oa_render(env, text_limit=2048, number_parts=True)] == [
        {"content": "[location] 1,2"}
    ]
    assert openid_of(delivery("openid:oB")) == "oB" and openid_of(delivery(None, "oC")) == "oC"
    assert attachment_line(Attachment("other")) == "[other]"


BASE = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "app"
type = "{type}"
{opts}
[[routes]]
from = "in"
to = "app"
"""

APP = 'corp_id = "ww1"\ncorp_secret = "s"\nagent_id = 1\n'


@pytest.mark.parametrize(
    ("type_", "opts", "error"),
    [
        ("wecom_app", APP + "text_limit = 4096", "outbound.app.text_limit: must be between 64 and 2048"),
        (
            "wecom_app",
            APP + "markdown_limit = 4096",
            "outbound.app.markdown_limit: must be between 64 and 2048",
        ),
        ("wecom_app", APP + 'member_rate = "lots"', "outbound.app.member_rate:"),
        ("wecom_app", APP + "duplicate_check_interval = 99999", "duplicate_check_interval"),
        ("wecom_app", APP + "agentid = 1", "outbound.app.agentid: unknown key"),
        ("wecom_app", 'corp_id = "ww1"\nagent_id = 1', "outbound.app.corp_secret: required key is missing"),
        ("wecom_webhook", 'key = "https://x/send"', "outbound.app.key: the webhook URL has no key="),
        ("wecom_webhook", 'key = "k"\nmarkdown_limit = 5000', "markdown_limit: must be between 64 and 4096"),
        ("wechat_oa", 'app_id = "wx1"\napp_secret = "s"\ntext_limit = 3000', "text_limit: must be between"),
    ],
)
def test_options_are_checked(write_config: Any, type_: str, opts: str, error: str) -> None:
    cfg = write_config(BASE.format(type=type_, opts=opts))
    with pytest.raises(ConfigError, match=error.replace("?", r"\?")):
        Registry.from_module("adapters").validate(cfg)


def test_good_options_pass_and_secrets_are_masked(write_config: Any) -> None:
    cfg = write_config(
        BASE.format(type="wecom_webhook", opts='key = "https://h/cgi-bin/webhook/send?key=sekrit"')
    )
    opts = Registry.from_module("adapters").validate(cfg)["app"]
    assert "sekrit" not in repr(opts)
