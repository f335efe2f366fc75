"""Units of the WeChat inbound handlers: query decoding, timestamps, XML/JSON parsing, normalization
to envelopes, options checks. The handlers themselves are tested through HTTP in
tests/integration/test_wechat_inbound*.py."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.wechat.callback import check_timestamp, parse_query, xml_message
from adapters.wechat.parsing import CallbackRefused, field, parse_json_object, parse_xml
from adapters.wechat.simulate import _xml
from adapters.wecom.aibot import aibot_envelope, fit
from bridge.adapter import Registry
from bridge.config import Config
from bridge.envelope import Attachment, Conversation, stable_id
from bridge.errors import ConfigError

KEY = "d2VjaGF0LWJyaWRnZSB0ZXN0IGtleSAzMiBieXRlcyE"


def q(query: str) -> dict[str, str]:
    return parse_query(make_mocked_request("GET", f"/p?{query}"))


def refused(fn: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(CallbackRefused) as e:
        fn()
    return e.value.status, e.value.reason


# -- query -------------------------------------------------------------------------------------


def test_query_is_decoded_once_and_plus_stays_plus() -> None:
    assert q("echostr=a+b%2Bc%2F%3D&nonce=1") == {"echostr": "a+b+c/=", "nonce": "1"}
    assert q("x=%252B") == {"x": "%2B"}  # once, not twice
    assert q("a=%E4%BD%A0&&flag&b=") == {"a": "你", "flag": "", "b": ""}
    assert q("") == {}


def test_query_refusals() -> None:
    assert refused(lambda: q("timestamp=1&timestamp=2")) == (400, "query parameter 'timestamp' is repeated")
    assert refused(lambda: q("echostr=%FF")) == (400, "query is not UTF-8")


def test_timestamp_tolerance() -> None:
    check_timestamp("anything", 0)  # off
    check_timestamp("1000", 300, now=1300)
    check_timestamp("1600", 300, now=1300)
    assert refused(lambda: check_timestamp("999", 300, now=1300)) == (403, "stale timestamp")
    assert refused(lambda: check_timestamp("1601", 300, now=1300)) == (403, "stale timestamp")
    for bad in ("", "12a", "-5", "１２３", "1" * 13):
        assert refused(partial(check_timestamp, bad, 300)) == (403, "bad timestamp")


# -- XML / JSON ----------------------------------------------------------------------------------


def test_parse_xml_keeps_text_exactly_and_nests() -> None:
    doc = (
        b"<xml>\n<Content><![CDATA[  two  spaces ]]]]><![CDATA[> <b> ]]></Content>\n<Plain>\xe4\xbd\xa0</Plain>"
        b"<SendPicsInfo><Count>2</Count><PicList><item><PicMd5Sum>a</PicMd5Sum></item>"
        b"<item><PicMd5Sum>b</PicMd5Sum></item></PicList></SendPicsInfo><Empty/></xml>"
    )
    assert parse_xml(doc, "m") == {
        "Content": "  two  spaces ]]> <b> ",
        "Plain": "你",
        "SendPicsInfo": {"Count": "2", "PicList": {"item": [{"PicMd5Sum": "a"}, {"PicMd5Sum": "b"}]}},
        "Empty": "",
    }


@pytest.mark.parametrize(
    "doc,reason",
    [
        (b"", "m: malformed XML"),
        (b"<xml><a></xml>", "m: malformed XML"),
        (b'<?xml version="1.0" encoding="bogus"?><xml/>', "m: malformed XML"),
        (b"<xml>&undefined;</xml>", "m: malformed XML"),
        (b"<!DOCTYPE xml><xml/>", "m: DTD or entity refused"),
        (b'<!DOCTYPE xml [<!ENTITY e "x">]><xml>&e;</xml>', "m: DTD or entity refused"),
        (b'<!DOCTYPE xml [<!ENTITY e SYSTEM "http://x/">]><xml>&e;</xml>', "m: DTD or entity refused"),
        (b"<other/>", "m: root element is not <xml>"),
        (b"<xml>" + b"<a>" * 20 + b"</a>" * 20 + b"</xml>", "XML nested too deeply"),
    ],
)
def test_parse_xml_refusals(doc: bytes, reason: str) -> None:
    assert refused(lambda: parse_xml(doc, "m")) == (400, reason)


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": [1, {"b": null}]}', "m") == {"a": [1, {"b": None}]}
    for bad in (b"", b"[1]", b'"x"', b"{", b'{"a": "\xff"}', b"[" * 100_000, b'{"a": NaN}'):
        assert refused(partial(parse_json_object, bad, "m"))[0] == 400


def test_field_only_gives_leaves() -> None:
    d = {"s": "x", "i": 5, "f": 1.5, "b": True, "d": {"x": 1}, "l": [1], "n": None}
    assert [field(d, k) for k in ("s", "i", "f", "b", "d", "l", "n", "missing")] == [
        "x",
        "5",
        "1.5",
        "",
        "",
        "",
        "",
        "",
    ]


def test_simulate_xml_round_trips() -> None:
    assert parse_xml(_xml([("A", "x ]]> y"), ("N", "42"), ("E", "")]), "m") == {
        "A": "x ]]> y",
        "N": "42",
        "E": "",
    }


# -- XML messages → envelopes ----------------------------------------------------------------------


def msg(**fields: str) -> dict[str, Any]:
    return {"ToUserName": "to", "FromUserName": "u", "CreateTime": "1700000000", **fields}


def env_of(m: dict[str, Any]) -> Any:
    env, key = xml_message("src", m, Conversation("u"), {"to": "to"})
    assert env.id == key
    return env


def test_xml_message_kinds() -> None:
    e = env_of(msg(MsgType="text", Content="hi", MsgId="1"))
    assert (e.kind, e.text, e.created_at, e.id) == (
        "message",
        "hi",
        1700000000.0,
        stable_id("src", "msg", "1"),
    )
    assert e.meta == {"to": "to", "msg_type": "text", "msg_id": "1"} and e.raw["Content"] == "hi"
    assert env_of(msg(MsgType="image", PicUrl="p", MediaId="m", MsgId="2")).attachments == [
        Attachment("image", url="p", media_id="m")
    ]
    v = env_of(msg(MsgType="voice", MediaId="m", Format="amr", Recognition="words", MsgId="3"))
    assert v.text == "words" and v.attachments == [Attachment("voice", media_id="m", extra={"format": "amr"})]
    assert env_of(msg(MsgType="file", MediaId="m", Title="a.pdf", MsgId="4")).attachments == [
        Attachment("file", media_id="m", name="a.pdf")
    ]
    odd = env_of(msg(MsgType="miniprogrampage", MsgId="5"))
    assert odd.attachments == [Attachment("other", extra={"msg_type": "miniprogrampage"})]
    assert env_of(msg(MsgType="text", Content="", MsgId="6", CreateTime="later")).created_at != 0


def test_xml_dedupe_keys() -> None:
    assert env_of(msg(MsgType="event", Event="TEMPLATESENDJOBFINISH", MsgID="77")).id == stable_id(
        "src", "msg", "77"
    )
    click = env_of(msg(MsgType="event", Event="click", EventKey="k"))
    assert click.id == stable_id("src", "event", "u", "1700000000", "click", "k")
    assert click.meta["event_key"] == "k" and click.event == "click" and click.kind == "event"
    assert env_of(msg(MsgType="event", Event="click", EventKey="other")).id != click.id
    # no MsgId on a message: the whole payload is the key (a retry repeats it exactly)
    a = env_of(msg(MsgType="text", Content="x"))
    assert a.id == env_of(msg(MsgType="text", Content="x")).id != env_of(msg(MsgType="text", Content="y")).id


# -- AI bot messages → envelopes -------------------------------------------------------------------


def bot(**fields: Any) -> dict[str, Any]:
    return {"msgid": "M", "aibotid": "B", "from": {"userid": "u"}, **fields}


def test_aibot_conversations_and_mentions() -> None:
    g, key = aibot_envelope(
        "s", bot(chattype="group", chatid="c", msgtype="text", text={"content": "@B x"}), True
    )
    assert key == g.id == stable_id("s", "msg", "M") == g.meta["stream_id"]
    assert (g.conversation, g.mentions, g.mentions_me, g.text) == (
        Conversation("c", "group"),
        ["B"],
        True,
        "@B x",
    )
    single, _ = aibot_envelope("s", bot(chattype="single", msgtype="text", text={"content": "x"}), False)
    assert single.conversation == Conversation("u", "direct") and single.mentions == [] and single.mentions_me
    assert "stream_id" not in single.meta
    nochat, _ = aibot_envelope("s", bot(chattype="group", msgtype="text", text={"content": "x"}), True)
    assert nochat.conversation == Conversation("u", "direct")
    assert refused(lambda: aibot_envelope("s", {"msgtype": "text", "chattype": "single"}, True)) == (
        400, "payload has no from.userid"
    )  # fmt: skip


def test_aibot_kinds() -> None:
    def one(**f: Any) -> Any:
        return aibot_envelope("s", bot(chattype="single", **f), True)[0]

    mixed = one(msgtype="mixed", mixed={"msg_item": [{"msgtype": "text", "text": {"content": "a"}}, "junk", 3,
                                                      {"msgtype": "image", "image": {"url": "U"}}, {"msgtype": "text"}]})  # fmt: skip
    assert mixed.text == "a" and mixed.attachments == [
        Attachment("image", url="U", extra={"encrypted": True})
    ]
    assert one(msgtype="mixed", mixed={"msg_item": "nope"}).text == ""
    assert one(msgtype="voice", voice={"content": "said"}).text == "said"
    assert one(msgtype="file", file={"url": "F"}).attachments[0].kind == "file"
    assert one(msgtype="image", image="not a dict").attachments == [
        Attachment("image", extra={"encrypted": True})
    ]
    assert one(msgtype="weird").attachments == [Attachment("other", extra={"msg_type": "weird"})]
    quoted = one(msgtype="text", text={"content": "x"}, quote={"msgtype": "voice", "voice": {"content": "q"}})
    assert quoted.meta["quote_msg_type"] == "voice" and quoted.meta["quote_text"] == "q"
    ev = one(msgtype="event", create_time=1700000001, event={"eventtype": "feedback_event"})
    assert (ev.kind, ev.event, ev.created_at, ev.mentions_me, "stream_id" in ev.meta) == (
        "event", "feedback_event", 1700000001.0, False, False
    )  # fmt: skip
    assert one(msgtype="event", create_time=True).created_at != 1.0
    nomsgid, key = aibot_envelope("s", {"msgtype": "text", "from": {"userid": "u"}}, True)
    assert key == nomsgid.id != stable_id("s", "msg", "")


def test_fit_cuts_on_code_points() -> None:
    assert fit("abc", 3) == "abc"
    assert fit("你好", 5) == "你"
    assert fit("a你", 3) == "a"
    assert len(fit("é" * 20000).encode()) <= 20480


# -- options ----------------------------------------------------------------------------------------


def check(write_config: Callable[..., Config], body: str) -> str:
    with pytest.raises(ConfigError) as e:
        Registry.from_module("adapters").validate(write_config(body))
    return str(e.value).split(": ", 1)[1]


APP = f'[[inbound]]\nname = "a"\ntype = "wecom_app"\npath = "/a"\ntoken = "t"\nencoding_aes_key = "{KEY}"\n'


def test_options_errors_name_the_key(write_config: Callable[..., Config]) -> None:
    assert check(write_config, APP) == "inbound.a.corp_id: required key is missing"
    assert check(write_config, APP + 'corp_id = ""') == "inbound.a.corp_id: must not be empty"
    assert (
        check(write_config, APP.replace('"/a"', '"a"') + 'corp_id = "c"')
        == "inbound.a.path: must start with '/'"
    )
    bad_key = APP.replace(KEY, "short") + 'corp_id = "c"'
    assert check(write_config, bad_key) == (
        "inbound.a.encoding_aes_key: must be the 43-character EncodingAESKey from the console"
    )
    assert "short" not in check(write_config, bad_key)
    assert check(write_config, APP + 'corp_id = "c"\nmax_body = 10') == (
        "inbound.a.max_body: must be between 1024 and 16777216 bytes"
    )
    assert check(write_config, APP + 'corp_id = "c"\ntimestamp_tolerance = -1').startswith(
        "inbound.a.timestamp_tolerance"
    )
    assert check(write_config, APP + 'corp_id = "c"\nsecret = "x"') == "inbound.a.secret: unknown key"
    bot = APP.replace("wecom_app", "wecom_aibot")
    assert (
        check(write_config, bot + "stream_window = 361")
        == "inbound.a.stream_window: must be between 1 and 360 seconds"
    )
    oa = APP.replace("wecom_app", "wechat_oa")
    assert (
        check(write_config, oa)
        == "inbound.a.app_id: required with encoding_aes_key (the receive id of safe mode)"
    )
    plain = '[[inbound]]\nname = "a"\ntype = "wechat_oa"\npath = "/a"\ntoken = "t"\nallow_plaintext = true\n'
    assert check(write_config, plain).startswith("inbound.a.allow_plaintext")
    sink = '[[outbound]]\nname = "o"\ntype = "wecom_aibot"\npoll_interval = 0\n'
    assert check(write_config, sink) == "outbound.o.poll_interval: must be between 0.01 and 5 seconds"


def test_valid_options_with_defaults(write_config: Callable[..., Config]) -> None:
    body = APP + 'corp_id = "c"\n' + (
        '[[inbound]]\nname = "b"\ntype = "wechat_oa"\npath = "/b"\ntoken = "t"\n'
        f'[[inbound]]\nname = "c"\ntype = "wecom_aibot"\npath = "/c"\ntoken = "t"\nencoding_aes_key = "{KEY}"\n'
        '[[outbound]]\nname = "o"\ntype = "wecom_aibot"\n'
    )  # fmt: skip
    opts = Registry.from_module("adapters").validate(write_config(body))
    a, b, c = opts["a"], opts["b"], opts["c"]
    assert (a.timestamp_tolerance, a.dedupe_ttl, a.max_body) == (300, 86400, 32768)
    assert b.encoding_aes_key is None and b.app_id == "" and not b.allow_plaintext
    assert (c.stream, c.stream_window) == (True, 330)
    assert (opts["o"].timeout, opts["o"].poll_interval) == (10.0, 0.2)
    assert "d2VjaGF0" not in repr(a) and "d2VjaGF0" not in str(msgspec.to_builtins(a, enc_hook=str))


# -- parse_xml against an independent oracle ----------------------------------------------------------
# parse_xml builds its dict on expat directly; the oracle is the straightforward way — defusedxml's
# ElementTree (forbid_dtd) and a walk of the tree — which parse_xml replaced for speed. Both must give
# the same dict, or refuse with the same status, on any input.


def _oracle(data: bytes) -> tuple[str, Any]:
    import xml.etree.ElementTree as ET

    from defusedxml import DefusedXmlException
    from defusedxml import ElementTree as DefusedET

    def walk(el: ET.Element, depth: int) -> Any:
        if len(el) == 0:
            return el.text or ""
        if depth >= 16:
            raise ValueError("deep")
        out: dict[str, Any] = {}
        for child in el:
            v = walk(child, depth + 1)
            if child.tag in out:
                prev = out[child.tag]
                out[child.tag] = [*prev, v] if isinstance(prev, list) else [prev, v]
            else:
                out[child.tag] = v
        return out

    try:
        root = DefusedET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        return "refused", "DTD or entity refused"
    except (ET.ParseError, ValueError, LookupError, RecursionError):
        return "refused", "malformed XML"
    if root.tag != "xml":
        return "refused", "root element is not <xml>"
    try:
        value = walk(root, 0)
    except ValueError:
        return "refused", "nested"
    return "ok", value if isinstance(value, dict) else {}


def _ours(data: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse_xml(data, "m")
    except CallbackRefused as e:
        assert e.status == 400
        reason = e.reason.removeprefix("m: ")
        return "refused", "nested" if reason == "XML nested too deeply" else reason


_names = st.sampled_from(["xml", "A", "B", "item", "MsgType", "n:a", "x:y"])
_texts = st.text(alphabet=st.sampled_from(list("ab <>&;]]x你\n\t'\"#=")), max_size=8)


@st.composite
def _xml_docs(draw: Any, depth: int = 0) -> str:
    """An XML-ish document: nested elements, text, CDATA, comments, attributes, entities, junk."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 3 if depth < 18 else 0))):
        kind = draw(st.sampled_from(["el", "el", "el", "text", "cdata", "comment", "entity", "junk"]))
        if kind == "el":
            name = draw(_names)
            attr = draw(st.sampled_from(["", ' a="1"', " xmlns:n='urn:n'", " b='&amp;'"]))
            inner = draw(_xml_docs(depth + 1)) if depth < 18 else ""
            parts.append(
                f"<{name}{attr}>{inner}</{name}>" if inner or draw(st.booleans()) else f"<{name}{attr}/>"
            )
        elif kind == "text":
            parts.append(draw(_texts).replace("<", "&lt;").replace("&", "&amp;"))
        elif kind == "cdata":
            parts.append(f"<![CDATA[{draw(_texts).replace(']]>', '')}]]>")
        elif kind == "comment":
            parts.append("<!-- c -->")
        elif kind == "entity":
            parts.append(draw(st.sampled_from(["&amp;", "&#20320;", "&#x41;", "&lt;", "&e;", "&#0;"])))
        else:
            parts.append(draw(_texts))
    return "".join(parts)


@given(
    body=_xml_docs(),
    prolog=st.sampled_from(
        ["", '<?xml version="1.0" encoding="utf-8"?>', "<!DOCTYPE xml>", " ", "<!-- x -->"]
    ),
    root=st.sampled_from(["xml", "xml", "other"]),
)
@settings(max_examples=400, deadline=None)
def test_parse_xml_agrees_with_the_elementtree_oracle(body: str, prolog: str, root: str) -> None:
    doc = f"{prolog}<{root}>{body}</{root}>".encode()
    ours, oracle = _ours(doc), _oracle(doc)
    if ours == ("refused", "nested") and oracle[0] == "refused":
        return  # too deep and refused for another reason too: we stop at the depth (both 400)
    assert ours == oracle


@given(base=_xml_docs(), cuts=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=4))
@settings(max_examples=400, deadline=None)
def test_parse_xml_agrees_with_the_oracle_on_mutations(base: str, cuts: list[tuple[int, bytes]]) -> None:
    doc = bytearray(f"<xml>{base}</xml>".encode())
    for at, junk in cuts:
        i = at % (len(doc) + 1)
        doc[i : i + len(junk)] = junk
    ours, oracle = _ours(bytes(doc)), _oracle(bytes(doc))
    if ours == ("refused", "nested") and oracle[0] == "refused":
        return  # too deep and refused for another reason too: we stop at the depth (both 400)
    assert ours == oracle


def test_parse_xml_refuses_the_billion_laughs_before_expanding() -> None:
    lol = b'<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa">' + b"".join(
        b'<!ENTITY %c "%s">' % (ord("b") + i, (b"&%c;" % (ord("a") + i)) * 10) for i in range(9)
    )
    doc = lol + b"]><xml><A>&j;</A></xml>"
    assert refused(lambda: parse_xml(doc, "m")) == (400, "m: DTD or entity refused")


# -- the short path for flat documents, against expat --------------------------------------------------

_leaf_names = st.sampled_from(["A", "MsgId", "x.y", "_a-1", "xml", "A" * 64, "A" * 65, "n:a", "1a", "é"])
_safe = st.lists(st.sampled_from([*"ab >[;x你\n\t#!-=/+", "]", "]]"]), max_size=10).map("".join)
_risky = st.lists(st.sampled_from([*"]<&\r\x0b\x00\ufffe\x85", "]]>", "&amp;", "&#65;"]), max_size=3).map(
    "".join
)
_leaf_text = st.one_of(_safe, _safe, _safe, st.tuples(_safe, _risky, _safe).map("".join))


def _mostly(usual: str, *others: str) -> Any:
    return st.sampled_from([usual] * (10 * len(others)) + list(others))


@st.composite
def _flat_docs(draw: Any) -> bytes:
    """Mostly what WeChat sends, with a hazard here and there (each one must send it to expat)."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name, text = draw(_leaf_names), draw(_leaf_text)
        sep = draw(_mostly("", " ", "\n\t", "\r\n", "x"))
        body = draw(_mostly(f"<![CDATA[{text}]]>", text, f"{text}<![CDATA[{text}]]>", ""))
        close = draw(_mostly(f"</{name}>", f"</{name} >", "</other>"))
        parts.append(f"{sep}<{name}>{body}{close}")
    head = draw(_mostly("<xml>", "<xml >", " <xml>", "\ufeff<xml>", '<?xml version="1.0"?><xml>'))
    tail = draw(_mostly("</xml>", "</xml>\n", "</xml>x", "", "</xml><xml></xml>"))
    return str(head + "".join(parts) + tail).encode()


@given(doc=_flat_docs())
@settings(max_examples=1500, deadline=None)
def test_flat_documents_parse_as_expat_parses_them(doc: bytes) -> None:
    from adapters.wechat.parsing import _parse_expat, _parse_flat

    flat = _parse_flat(doc)
    try:
        full: Any = _parse_expat(doc, "m")
    except CallbackRefused as e:
        full = e
    if flat is not None:  # the short path only answers when expat would give that very dict
        assert flat == full


def test_the_short_path_takes_what_wechat_sends() -> None:
    from adapters.wechat.parsing import _parse_flat

    doc = (
        b"<xml><ToUserName><![CDATA[ww1]]></ToUserName>\n<FromUserName><![CDATA[u]]></FromUserName>"
        b"<CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        b"<Content><![CDATA[a]]]]><![CDATA[> b ]] c \xe4\xbd\xa0]]></Content><MsgId>1</MsgId><MsgId>2</MsgId></xml>\n"
    )
    assert _parse_flat(doc) is None  # two CDATA sections in one leaf: expat's
    assert parse_xml(doc, "m")["Content"] == "a]]> b ]] c 你"
    doc = doc.replace(b"<![CDATA[a]]]]><![CDATA[> b", b"<![CDATA[a]] > b")
    assert _parse_flat(doc) == {
        "ToUserName": "ww1",
        "FromUserName": "u",
        "CreateTime": "1700000000",
        "MsgType": "text",
        "Content": "a]] > b ]] c 你",
        "MsgId": ["1", "2"],
    }
