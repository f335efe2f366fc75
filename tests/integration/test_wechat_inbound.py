"""The three WeChat inbound types through the daemon's HTTP endpoints, against real Redis.

Published vectors (tests/vectors/wechat_vectors.py, sources noted there) go through the endpoints,
not only through the crypto: URL verification and message decryption for WeCom and the Official
Account. Every bad-input class is answered with its status code and publishes nothing. Platform
retries are published once. Secrets never reach the log.

The request builders here are also used by test_wechat_inbound_fuzz.py and test_simulate.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import structlog
import yarl
from Crypto.Cipher import AES
from defusedxml import ElementTree as DefusedET

from adapters.wechat.crypto import WXBizMsgCrypt, decode_aes_key, plain_signature
from bridge import logging as blog
from bridge.bus import Field
from bridge.daemon import Daemon
from bridge.envelope import Envelope, decode_envelope, stable_id
from tests.vectors.wechat_vectors import (
    OA_MSG,
    OA_MSG_CPP,
    OPEN_PLATFORM_MSG,
    OPEN_PLATFORM_PLAIN_SIGNATURE,
    WECHATPY_ECHO,
    WECHATPY_MSG,
    WECOM_JSON_MSG,
    WECOM_MSG,
    WECOM_PY_MSG,
    WECOM_PY_URL_VERIFY,
    WECOM_URL_VERIFY,
    CallbackVector,
)

TOKEN = "bridgeTestToken42"
KEY = "d2VjaGF0LWJyaWRnZSB0ZXN0IGtleSAzMiBieXRlcyE"
CORP = "wwbridgetest0001"
APPID = "wxbridgetest0001"
PATHS = {"wecom_app": "/wecom/app", "wecom_aibot": "/wecom/bot", "wechat_oa": "/wechat/oa"}
NAMES = {"wecom_app": "app", "wecom_aibot": "bot", "wechat_oa": "oa"}
RECEIVE_IDS = {"wecom_app": CORP, "wecom_aibot": "", "wechat_oa": APPID}

INBOUNDS = f"""
[[inbound]]
name = "app"
type = "wecom_app"
path = "/wecom/app"
token = "{TOKEN}"
encoding_aes_key = "{KEY}"
corp_id = "{CORP}"
{{extra}}
[[inbound]]
name = "bot"
type = "wecom_aibot"
path = "/wecom/bot"
token = "{TOKEN}"
encoding_aes_key = "{KEY}"
{{extra}}
{{bot_extra}}
[[inbound]]
name = "oa"
type = "wechat_oa"
path = "/wechat/oa"
token = "{TOKEN}"
encoding_aes_key = "{KEY}"
app_id = "{APPID}"
{{extra}}
[[inbound]]
name = "oa_plain"
type = "wechat_oa"
path = "/wechat/oa-plain"
token = "{TOKEN}"
{{extra}}
"""


def inbounds(extra: str = "", bot_extra: str = "") -> str:
    return INBOUNDS.format(extra=extra, bot_extra=bot_extra)


# -- request builders ----------------------------------------------------------------------------


def now() -> str:
    return str(int(time.time()))


def crypt(type_: str, receive_id: str | None = None) -> WXBizMsgCrypt:
    return WXBizMsgCrypt(TOKEN, KEY, RECEIVE_IDS[type_] if receive_id is None else receive_id)


def cdata(v: str) -> str:
    return "<![CDATA[" + v.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def xml(**fields: str) -> bytes:
    return (
        "<xml>"
        + "".join(f"<{k}>{v if v.isdigit() else cdata(v)}</{k}>" for k, v in fields.items())
        + "</xml>"
    ).encode()


def inner(type_: str, msg_id: str = "1234567890123456", text: str = "hello", **extra: Any) -> bytes:
    """A valid decrypted message of each type."""
    if type_ == "wecom_aibot":
        body: dict[str, Any] = {"msgid": msg_id, "aibotid": "AIBOT", "chattype": "single", "from": {"userid": "lisi"},
                                "response_url": "https://example.invalid/r", "msgtype": "text", "text": {"content": text}}  # fmt: skip
        return json.dumps(body | extra, ensure_ascii=False).encode()
    to = CORP if type_ == "wecom_app" else "gh_0123456789ab"
    fields = {"ToUserName": to, "FromUserName": "zhangsan", "CreateTime": now(), "MsgType": "text", "Content": text,
              "MsgId": msg_id} | extra  # fmt: skip
    if type_ == "wecom_app":
        fields["AgentID"] = "1000002"
    return xml(**fields)


def outer(type_: str, enc: str) -> bytes:
    if type_ == "wecom_aibot":
        return json.dumps({"encrypt": enc}).encode()
    if type_ == "wecom_app":
        return xml(ToUserName=CORP, Encrypt=enc, AgentID="1000002")
    return xml(ToUserName="gh_0123456789ab", Encrypt=enc)


def signed_query(type_: str, enc: str, ts: str | None = None, nonce: str = "1372623149") -> dict[str, str]:
    ts = now() if ts is None else ts
    sig = WXBizMsgCrypt(TOKEN, KEY, "").signature(ts, nonce, enc)
    if type_ == "wechat_oa":
        return {"signature": plain_signature(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
                "openid": "zhangsan", "encrypt_type": "aes", "msg_signature": sig}  # fmt: skip
    return {"msg_signature": sig, "timestamp": ts, "nonce": nonce}


def post(
    type_: str, plain: bytes, *, ts: str | None = None, receive_id: str | None = None
) -> tuple[dict[str, str], bytes]:
    """A correctly signed, encrypted POST of ``plain``: (query, body)."""
    enc = crypt(type_, receive_id).encrypt(plain)
    return signed_query(type_, enc, ts), outer(type_, enc)


def verify_query(type_: str, echo: str = "5927782489442352469", ts: str | None = None) -> dict[str, str]:
    ts = now() if ts is None else ts
    if type_ == "wechat_oa":
        return {
            "signature": plain_signature(TOKEN, ts, "42"),
            "timestamp": ts,
            "nonce": "42",
            "echostr": echo,
        }
    enc = crypt(type_).encrypt(echo.encode())
    return signed_query(type_, enc, ts) | {"echostr": enc}


def raw_cipher(plain: bytes) -> str:
    """AES-CBC of ``plain`` (already padded as the test wants) with the test key, base64."""
    key = decode_aes_key(KEY)
    return base64.b64encode(AES.new(key, AES.MODE_CBC, iv=key[:16]).encrypt(plain)).decode()


def framed(msg: bytes, receive_id: str, *, length: int | None = None, pad: int | None = None) -> bytes:
    """random(16) + len + msg + receive_id, padded to 32 with ``pad`` (a bad value when given)."""
    body = b"R" * 16 + struct.pack(">I", len(msg) if length is None else length) + msg + receive_id.encode()
    n = 32 - len(body) % 32
    if pad is None:
        return body + bytes((n,)) * n
    body += b"\x00" * ((-len(body)) % 16 or 16)
    return body[:-1] + bytes((pad,))


# -- the client ------------------------------------------------------------------------------------


class Bridge:
    def __init__(self, d: Daemon, session: aiohttp.ClientSession) -> None:
        self.d = d
        self.session = session
        self.base = f"http://127.0.0.1:{d.port}"

    async def call(
        self, method: str, path: str, query: dict[str, str] | str = "", body: Any = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:  # fmt: skip
        q = query if isinstance(query, str) else urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        url = yarl.URL(f"{self.base}{path}" + (f"?{q}" if q else ""), encoded=True)
        async with self.session.request(method, url, data=body, headers=headers) as r:
            return r.status, await r.read()

    async def inbound_len(self) -> int:
        n: int = await self.d.redis.xlen(self.d.bus.keys.inbound)  # type: ignore[union-attr]
        return n

    async def envelopes(self) -> list[Envelope]:
        rows = await self.d.redis.xrange(self.d.bus.keys.inbound)  # type: ignore[union-attr]
        return [decode_envelope(f[Field.ENVELOPE.key]) for _, f in rows]


MakeBridge = Callable[..., Awaitable[Bridge]]


@contextlib.asynccontextmanager
async def bridges(write_config: Any, start_daemon: Any) -> AsyncIterator[MakeBridge]:
    """make(config body) → a started daemon with an HTTP client; closes the clients after."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(body: str | None = None, **kw: str) -> Bridge:
        d = await start_daemon(write_config(body if body is not None else inbounds(**kw)))
        s = aiohttp.ClientSession()
        sessions.append(s)
        return Bridge(d, s)

    try:
        yield make
    finally:
        for s in sessions:
            await s.close()


@pytest.fixture
async def make_bridge(redis: Any, write_config: Any, start_daemon: Any) -> AsyncIterator[MakeBridge]:
    # `redis` first: its teardown (deleting this test's keys) runs after the daemons stopped
    async with bridges(write_config, start_daemon) as make:
        yield make


@pytest.fixture
async def bridge(make_bridge: MakeBridge) -> Bridge:
    return await make_bridge()


def decrypt_reply(body: bytes, receive_id: str = "") -> dict[str, Any]:
    r = json.loads(body)
    plain = WXBizMsgCrypt(TOKEN, KEY, receive_id).verify_and_decrypt(
        r["msgsignature"], r["timestamp"], r["nonce"], r["encrypt"]
    )
    out: dict[str, Any] = json.loads(plain)
    return out


# -- published vectors through the endpoints ---------------------------------------------------


VECTORS = """
[[inbound]]
name = "v_qdg"
type = "wecom_app"
path = "/v/qdg"
token = "QDG6eK"
encoding_aes_key = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
corp_id = "wx5823bf96d3bd56c7"
timestamp_tolerance = 0
[[inbound]]
name = "v_hjq"
type = "wecom_app"
path = "/v/hjq"
token = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
encoding_aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
corp_id = "ww1436e0e65a779aee"
timestamp_tolerance = 0
[[inbound]]
name = "v_wechatpy"
type = "wecom_app"
path = "/v/wechatpy"
token = "123456"
encoding_aes_key = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
corp_id = "wx49f0ab532d5d035a"
timestamp_tolerance = 0
[[inbound]]
name = "v_hjq_bot"
type = "wecom_aibot"
path = "/v/hjq-bot"
token = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
encoding_aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
timestamp_tolerance = 0
[[inbound]]
name = "v_oa"
type = "wechat_oa"
path = "/v/oa"
token = "spamtest"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
app_id = "wx2c2769f8efd9abc2"
timestamp_tolerance = 0
[[inbound]]
name = "v_open"
type = "wechat_oa"
path = "/v/open"
token = "AAAAA"
encoding_aes_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
app_id = "wx134c8103faa5a59e"
timestamp_tolerance = 0
"""
VECTOR_PATH = {
    WECOM_URL_VERIFY.name: "/v/qdg", WECOM_MSG.name: "/v/qdg",
    WECOM_PY_URL_VERIFY.name: "/v/hjq", WECOM_PY_MSG.name: "/v/hjq",
    WECHATPY_ECHO.name: "/v/wechatpy", WECHATPY_MSG.name: "/v/wechatpy",
}  # fmt: skip


def vector_query(v: CallbackVector, **extra: str) -> dict[str, str]:
    return {"msg_signature": v.msg_signature, "timestamp": v.timestamp, "nonce": v.nonce, **extra}


@pytest.mark.parametrize("v", [WECOM_URL_VERIFY, WECOM_PY_URL_VERIFY, WECHATPY_ECHO], ids=lambda v: v.name)
async def test_wecom_url_verification_with_published_vectors(
    make_bridge: MakeBridge, v: CallbackVector
) -> None:
    b = await make_bridge(VECTORS)
    path = VECTOR_PATH[v.name]
    # as Tencent sends it: echostr percent-encoded ("+" as %2B), decoded exactly once
    status, body = await b.call("GET", path, vector_query(v, echostr=v.encrypt))
    assert (status, body) == (200, v.expected)
    # a raw "+" (not percent-encoded) is a "+", never a space
    raw = (
        urllib.parse.urlencode(vector_query(v))
        + "&echostr="
        + v.encrypt.replace("/", "%2F").replace("=", "%3D")
    )
    assert "+" in raw
    assert await b.call("GET", path, raw) == (200, v.expected)
    # the same data with one digit of the nonce changed is refused (wechatpy's should_fail case)
    bad = vector_query(v, echostr=v.encrypt) | {"nonce": v.nonce[:-1] + str((int(v.nonce[-1]) + 9) % 10)}
    assert (await b.call("GET", path, bad))[0] == 403
    assert await b.inbound_len() == 0


def _fields(plain: bytes) -> dict[str, str]:
    return {c.tag: c.text or "" for c in DefusedET.fromstring(plain)}


@pytest.mark.parametrize("v", [WECOM_MSG, WECOM_PY_MSG, WECHATPY_MSG], ids=lambda v: v.name)
async def test_wecom_app_messages_with_published_vectors(make_bridge: MakeBridge, v: CallbackVector) -> None:
    b = await make_bridge(VECTORS)
    f = _fields(v.expected)
    body = xml(ToUserName=v.receive_id, Encrypt=v.encrypt, AgentID=f["AgentID"])
    assert await b.call("POST", VECTOR_PATH[v.name], vector_query(v), body) == (200, b"")
    [env] = await b.envelopes()
    name = {"/v/qdg": "v_qdg", "/v/hjq": "v_hjq", "/v/wechatpy": "v_wechatpy"}[VECTOR_PATH[v.name]]
    assert env.id == stable_id(name, "msg", f["MsgId"])
    assert env.source == name and env.kind == "message"
    assert env.text == f["Content"]
    assert env.sender is not None and env.sender.id == f["FromUserName"]
    assert env.conversation.id == f["FromUserName"] and env.conversation.kind == "direct"
    assert env.created_at == float(f["CreateTime"])
    assert env.meta["agent_id"] == f["AgentID"] and env.meta["msg_id"] == f["MsgId"]
    assert env.raw == f
    # the platform's retry of the same callback is not a second message
    assert await b.call("POST", VECTOR_PATH[v.name], vector_query(v), body) == (200, b"")
    assert await b.inbound_len() == 1


@pytest.mark.parametrize(
    "v,mode", [(OA_MSG, "compatible"), (OA_MSG_CPP, "safe")], ids=["python-sample", "cpp-sample"]
)
async def test_official_account_messages_with_published_vectors(
    make_bridge: MakeBridge, v: CallbackVector, mode: str
) -> None:
    b = await make_bridge(VECTORS)
    f = _fields(v.expected)
    # compatible mode carries the plain fields too (with a forged Content: only the decrypted copy counts)
    plain = {**f, "Content": "forged"} if mode == "compatible" else {"ToUserName": f["ToUserName"]}
    body = xml(**plain, Encrypt=v.encrypt)
    query = vector_query(v, encrypt_type="aes", openid=f["FromUserName"])
    assert await b.call("POST", "/v/oa", query, body) == (200, b"success")
    [env] = await b.envelopes()
    assert env.text == f["Content"] == "abcdteT"
    assert env.id == stable_id("v_oa", "msg", f["MsgId"])
    assert env.conversation.id == f["FromUserName"] and env.meta["mode"] == mode
    assert env.raw == f
    tampered = query | {"msg_signature": "0" * 40}
    assert (await b.call("POST", "/v/oa", tampered, body))[0] == 403
    assert await b.inbound_len() == 1


async def test_official_account_push_from_the_open_platform_doc(make_bridge: MakeBridge) -> None:
    """The doc's whole worked example: its push URL verbatim, its body, its event."""
    b = await make_bridge(VECTORS)
    v = OPEN_PLATFORM_MSG
    query = (
        "signature=cc0c594499c1634947d5b502f158ee518947db27&timestamp=1715943329&nonce=1590219412"
        "&openid=o9AgO5Kd5ggOC-bXrbNODIiE3bGY&encrypt_type=aes&msg_signature=6c12a4205838198b8fa631b3220723bb07f1015c"
    )
    body = xml(ToUserName="gh_97417a04a28d", Encrypt=v.encrypt)
    assert await b.call("POST", "/v/open", query, body) == (200, b"success")
    [env] = await b.envelopes()
    assert env.kind == "event" and env.event == "debug_demo"
    assert env.raw["debug_str"] == "hello world"
    assert env.id == stable_id(
        "v_open", "event", "o9AgO5Kd5ggOC-bXrbNODIiE3bGY", "1715943329", "debug_demo", ""
    )
    # its URL verification: the plaintext-mode signature of the same doc
    s = OPEN_PLATFORM_PLAIN_SIGNATURE
    q = {"signature": s.signature, "timestamp": s.timestamp, "nonce": s.nonce, "echostr": "8765309"}
    assert await b.call("GET", "/v/open", q) == (200, b"8765309")
    assert (await b.call("GET", "/v/open", q | {"nonce": "1590219413"}))[0] == 403


async def test_aibot_refuses_published_data_with_another_receive_id(make_bridge: MakeBridge) -> None:
    """Tencent's JSON callback sample carries the CorpID as receive id; an AI bot's is ""."""
    b = await make_bridge(VECTORS)
    v = WECOM_JSON_MSG
    status, body = await b.call("POST", "/v/hjq-bot", vector_query(v), json.dumps({"encrypt": v.encrypt}))
    assert (status, body) == (400, b"cannot decrypt: receive id mismatch")
    assert await b.inbound_len() == 0


# -- messages of every kind --------------------------------------------------------------------


async def test_wecom_app_message_kinds(bridge: Bridge) -> None:
    ts = now()
    base = {"ToUserName": CORP, "FromUserName": "zhangsan", "CreateTime": ts, "AgentID": "1000002"}
    cases: list[tuple[dict[str, str], Callable[[Envelope], object]]] = [
        ({"MsgType": "image", "PicUrl": "https://p/1.jpg", "MediaId": "m1", "MsgId": "11"},
         lambda e: _att(e, "image", url="https://p/1.jpg", media_id="m1")),
        ({"MsgType": "voice", "MediaId": "m2", "Format": "amr", "MsgId": "12"},
         lambda e: _att(e, "voice", media_id="m2", extra={"format": "amr"})),
        ({"MsgType": "video", "MediaId": "m3", "ThumbMediaId": "t3", "MsgId": "13"},
         lambda e: _att(e, "video", media_id="m3", extra={"thumb_media_id": "t3"})),
        ({"MsgType": "location", "Location_X": "23.1", "Location_Y": "113.3", "Scale": "15", "Label": "Guangzhou",
          "MsgId": "14"},
         lambda e: _att(e, "location", title="Guangzhou", extra={"latitude": "23.1", "longitude": "113.3", "scale": "15"})),
        ({"MsgType": "link", "Title": "T", "Description": "D", "Url": "https://l/", "PicUrl": "https://p/", "MsgId": "15"},
         lambda e: _att(e, "link", url="https://l/", title="T", description="D", extra={"pic_url": "https://p/"})),
        ({"MsgType": "event", "Event": "enter_agent", "EventKey": ""},
         lambda e: (e.kind, e.event) == ("event", "enter_agent") or _fail(e)),
        ({"MsgType": "event", "Event": "click", "EventKey": "menu_1"},
         lambda e: (e.kind, e.event, e.meta["event_key"]) == ("event", "click", "menu_1") or _fail(e)),
        ({"MsgType": "update_button", "MsgId": "16"}, lambda e: _att(e, "other", extra={"msg_type": "update_button"})),
    ]  # fmt: skip
    for fields, _check in cases:
        q, body = post("wecom_app", xml(**base, **fields))
        assert await b_call(bridge, "wecom_app", q, body) == (200, b"")
    envs = await bridge.envelopes()
    assert len(envs) == len(cases)
    for env, (_, check) in zip(envs, cases, strict=True):
        check(env)
        assert env.conversation.id == "zhangsan" and env.created_at == float(ts)


def _fail(e: Envelope) -> bool:
    raise AssertionError(e)


def _att(e: Envelope, kind: str, **want: Any) -> None:
    assert e.kind == "message" and e.text == ""
    [a] = e.attachments
    assert a.kind == kind
    for k, v in want.items():
        assert getattr(a, k) == v, (k, getattr(a, k), v)


async def b_call(b: Bridge, type_: str, q: dict[str, str], body: bytes) -> tuple[int, bytes]:
    return await b.call("POST", PATHS[type_], q, body)


async def test_aibot_message_kinds_and_conversations(bridge: Bridge) -> None:
    base = {"aibotid": "AIBOT", "from": {"userid": "lisi"}, "response_url": "https://r/1"}
    group = {"chatid": "wrGROUP", "chattype": "group"}
    single = {"chattype": "single"}
    cases: list[dict[str, Any]] = [
        group | {"msgid": "b1", "msgtype": "text", "text": {"content": "@bot hi"},
                 "quote": {"msgtype": "text", "text": {"content": "quoted"}}},
        single | {"msgid": "b2", "msgtype": "image", "image": {"url": "https://img/1"}},
        group | {"msgid": "b3", "msgtype": "mixed", "mixed": {"msg_item": [
            {"msgtype": "text", "text": {"content": "look"}}, {"msgtype": "image", "image": {"url": "https://img/2"}},
            {"msgtype": "text", "text": {"content": "here"}}]}},
        single | {"msgid": "b4", "msgtype": "voice", "voice": {"content": "spoken words"}},
        single | {"msgid": "b5", "msgtype": "file", "file": {"url": "https://f/1"}},
        single | {"msgid": "b6", "msgtype": "event", "create_time": 1700000000,
                  "event": {"eventtype": "enter_chat"}},
    ]  # fmt: skip
    for c in cases:
        q, body = post("wecom_aibot", json.dumps(base | c).encode())
        status, answer = await b_call(bridge, "wecom_aibot", q, body)
        assert status == 200
        if c["msgtype"] == "event":
            assert answer == b""
        else:
            reply = decrypt_reply(answer)
            assert reply == {"msgtype": "stream", "stream": {"id": stable_id("bot", "msg", c["msgid"]),
                                                              "finish": False, "content": ""}}  # fmt: skip
    e1, e2, e3, e4, e5, e6 = await bridge.envelopes()
    assert (e1.conversation.id, e1.conversation.kind, e1.text) == ("wrGROUP", "group", "@bot hi")
    assert e1.mentions == ["AIBOT"] and e1.mentions_me and e1.sender is not None and e1.sender.id == "lisi"
    assert e1.meta["response_url"] == "https://r/1" and e1.meta["quote_text"] == "quoted"
    assert e1.meta["stream_id"] == e1.id == stable_id("bot", "msg", "b1") and e1.meta["chat_type"] == "group"
    assert (e2.conversation.id, e2.conversation.kind) == ("lisi", "direct") and e2.mentions == []
    assert [(a.kind, a.url) for a in e2.attachments] == [("image", "https://img/1")]
    assert e3.text == "look\nhere" and [a.url for a in e3.attachments] == ["https://img/2"]
    assert e4.text == "spoken words" and e4.attachments == []
    assert [(a.kind, a.url) for a in e5.attachments] == [("file", "https://f/1")]
    assert (e6.kind, e6.event, e6.created_at, e6.mentions_me) == ("event", "enter_chat", 1700000000.0, False)
    assert e6.raw["event"] == {"eventtype": "enter_chat"}


async def test_official_account_kinds_in_plaintext_and_safe_mode(bridge: Bridge) -> None:
    ts = now()
    base = {"ToUserName": "gh_0123456789ab", "FromUserName": "oOPENID", "CreateTime": ts}
    msgs = [
        {"MsgType": "text", "Content": "你好", "MsgId": "21", "MsgDataId": "99", "Idx": "1"},
        {"MsgType": "voice", "MediaId": "m", "Format": "speex", "Recognition": "recognised", "MsgId": "22"},
        {"MsgType": "shortvideo", "MediaId": "m", "ThumbMediaId": "t", "MsgId": "23"},
        {"MsgType": "event", "Event": "subscribe"},
        {"MsgType": "event", "Event": "CLICK", "EventKey": "V1001"},
    ]
    for m in msgs:
        q, body = post("wechat_oa", xml(**base, **m))
        assert await bridge.call("POST", "/wechat/oa", q, body) == (200, b"success")
    # plaintext mode: only `signature`, which covers token/timestamp/nonce (not the body)
    pq = {"signature": plain_signature(TOKEN, ts, "7"), "timestamp": ts, "nonce": "7", "openid": "oOPENID"}
    plain = xml(**base, MsgType="text", Content="plain", MsgId="24")
    assert await bridge.call("POST", "/wechat/oa-plain", pq, plain) == (200, b"success")
    e = await bridge.envelopes()
    assert [x.text for x in e] == ["你好", "recognised", "", "", "", "plain"]
    assert e[0].raw["MsgDataId"] == "99" and e[0].meta["mode"] == "safe"
    assert e[2].attachments[0].kind == "video"
    assert (e[3].kind, e[3].event) == ("event", "subscribe") and e[4].meta["event_key"] == "V1001"
    assert e[5].meta["mode"] == "plaintext" and e[5].source == "oa_plain"


# -- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["wecom_app", "wecom_aibot", "wechat_oa"])
async def test_platform_retries_are_published_once(bridge: Bridge, type_: str) -> None:
    plain = inner(type_, msg_id="777")
    answers = []
    for _ in range(3):  # each retry is encrypted afresh (new random prefix, new nonce)
        q, body = post(type_, plain)
        status, answer = await b_call(bridge, type_, q, body)
        assert status == 200
        answers.append(answer)
    assert await bridge.inbound_len() == 1
    if type_ == "wecom_aibot":  # a retry gets the same stream
        assert len({decrypt_reply(a)["stream"]["id"] for a in answers}) == 1
    # another message id is another message
    q, body = post(type_, inner(type_, msg_id="778"))
    assert (await b_call(bridge, type_, q, body))[0] == 200
    assert await bridge.inbound_len() == 2


async def test_events_dedupe_on_sender_time_event_and_key(bridge: Bridge) -> None:
    ts = now()
    ev = {
        "ToUserName": CORP,
        "FromUserName": "zhangsan",
        "CreateTime": ts,
        "MsgType": "event",
        "AgentID": "1",
    }
    for fields in ({"Event": "click", "EventKey": "a"}, {"Event": "click", "EventKey": "a"},
                   {"Event": "click", "EventKey": "b"}, {"Event": "enter_agent"}):  # fmt: skip
        q, body = post("wecom_app", xml(**ev, **fields))
        assert (await b_call(bridge, "wecom_app", q, body))[0] == 200
    assert [e.meta.get("event_key") or e.event for e in await bridge.envelopes()] == ["a", "b", "enter_agent"]


# -- bad input -------------------------------------------------------------------------------------

NO_SENDER: dict[str, Any] = {"from": {}}


def bad_requests(type_: str) -> list[tuple[str, str, dict[str, str] | str, bytes, int]]:
    """(case, method, query, body, expected status) for every bad-input class of one type."""
    rid = RECEIVE_IDS[type_]
    good_q, good_body = post(type_, inner(type_))
    enc_good = crypt(type_).encrypt(inner(type_))

    def signed(enc: str, ts: str | None = None) -> tuple[dict[str, str], bytes]:
        return signed_query(type_, enc, ts), outer(type_, enc)

    def enc_post(plain: bytes) -> tuple[dict[str, str], bytes]:
        return post(type_, plain)

    sig_key = "msg_signature"
    old = str(int(time.time()) - 3600)
    out: list[tuple[str, str, dict[str, str] | str, bytes, int]] = [
        ("no signature", "POST", {k: v for k, v in good_q.items() if k != sig_key}, good_body, 403),
        ("forged signature", "POST", good_q | {sig_key: "0" * 40}, good_body, 403),
        ("signature of another body", "POST", signed_query(type_, enc_good), good_body, 403),
        ("no timestamp", "POST", {k: v for k, v in good_q.items() if k != "timestamp"}, good_body, 403),
        ("no nonce", "POST", {k: v for k, v in good_q.items() if k != "nonce"}, good_body, 403),
        ("stale timestamp", "POST", *signed(enc_good, old), 403),
        ("future timestamp", "POST", *signed(enc_good, str(int(time.time()) + 3600)), 403),
        ("timestamp not a number", "POST", *signed(enc_good, "yesterday"), 403),
        ("repeated parameter", "POST", urllib.parse.urlencode(good_q) + "&timestamp=1", good_body, 400),
        ("query not utf-8", "POST", urllib.parse.urlencode(good_q) + "&x=%FF", good_body, 400),
        ("bad base64", "POST", *signed("not*base64!"), 400),
        ("ciphertext one byte short", "POST", *signed(base64.b64encode(base64.b64decode(enc_good)[:-1]).decode()), 400),
        ("ciphertext length not a block", "POST", *signed(base64.b64encode(b"x" * 20).decode()), 400),
        ("pkcs7 pad byte 0", "POST", *signed(raw_cipher(framed(b"<xml/>", rid, pad=0))), 400),
        ("pkcs7 pad byte 33", "POST", *signed(raw_cipher(framed(b"<xml/>", rid, pad=33))), 400),
        ("length field out of bounds", "POST", *signed(raw_cipher(framed(b"<xml/>", rid, length=9999))), 400),
        ("wrong receive id", "POST", *post(type_, inner(type_), receive_id=rid + "x"), 400),
        ("body too large", "POST", good_q, b"<" * 65_537, 413),
        ("malformed payload", "POST", *enc_post(b"<xml><MsgType>text" if type_ != "wecom_aibot" else b'{"msgtype":'), 400),
        ("payload without msgtype", "POST", *enc_post(
            inner(type_, MsgType="") if type_ != "wecom_aibot" else inner(type_, msgtype="")), 400),
        ("payload without sender", "POST", *enc_post(
            inner(type_, FromUserName="") if type_ != "wecom_aibot" else inner(type_, **NO_SENDER)), 400),
        ("GET without signature", "GET", {k: v for k, v in verify_query(type_).items() if k not in (sig_key, "signature")}, b"", 403),
        ("GET forged signature", "GET", verify_query(type_) | {sig_key: "1" * 40, "signature": "1" * 40}, b"", 403),
        ("GET stale timestamp", "GET", verify_query(type_, ts=old), b"", 403),
        ("GET without echostr", "GET", {k: v for k, v in verify_query(type_).items() if k != "echostr"}, b"", 400),
    ]  # fmt: skip
    if type_ == "wecom_aibot":
        out += [
            ("malformed JSON body", "POST", good_q, b'{"encrypt": "abc', 400),
            ("JSON body without encrypt", "POST", good_q, b'{"Encrypt": "abc"}', 400),
            ("JSON body not an object", "POST", good_q, b'["abc"]', 400),
            ("deeply nested JSON body", "POST", good_q, b"[" * 5000 + b"]" * 5000, 400),
            ("payload not an object", "POST", *enc_post(b"[1, 2]"), 400),
            ("payload deeply nested", "POST", *enc_post(b'{"a":' * 3000 + b"1" + b"}" * 3000), 400),
            ("payload not utf-8", "POST", *enc_post(b'{"msgtype": "\xff"}'), 400),
            ("nonce the reply cannot echo", "POST", *signed_q_nonce(type_, enc_good, "a b"), 400),
            ("stream refresh without id", "POST", *enc_post(json.dumps(
                {"msgid": "s", "msgtype": "stream", "from": {"userid": "u"}, "stream": {}}).encode()), 400),
            ("GET echostr not a ciphertext", "GET", signed_query(type_, "AAAA") | {"echostr": "AAAA"}, b"", 400),
        ]  # fmt: skip
    else:
        dtd = b'<!DOCTYPE xml [<!ENTITY e "x">]><xml><Encrypt>&e;</Encrypt></xml>'
        ext = b'<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Encrypt>&e;</Encrypt></xml>'
        lol = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
               b"<xml><MsgType>&lol2;</MsgType></xml>")  # fmt: skip
        out += [
            ("malformed XML body", "POST", good_q, b"<xml><Encrypt>abc</Encrypt>", 403),  # unsigned: never parsed
            ("XML body with a DTD and entity", "POST", good_q, dtd, 400),
            ("XML body with an external entity", "POST", good_q, ext, 400),
            ("XML body with an undefined entity", "POST", good_q, b"<xml><Encrypt>&e;</Encrypt></xml>", 400),
            ("XML body with another root", "POST", good_q, b"<root><Encrypt>x</Encrypt></root>", 403),
            ("XML body without Encrypt", "POST", good_q, b"<xml><ToUserName>x</ToUserName></xml>", 400),
            ("XML body in an unknown encoding", "POST", good_q, b'<?xml version="1.0" encoding="bogus"?><xml/>', 400),
            ("payload with a DTD (billion laughs)", "POST", *enc_post(lol), 400),
            ("payload nested too deeply", "POST", *enc_post(b"<xml>" + b"<a>" * 40 + b"</a>" * 40 + b"</xml>"), 400),
            ("payload with another root", "POST", *enc_post(b"<msg><MsgType>text</MsgType></msg>"), 400),
        ]  # fmt: skip
    if type_ == "wecom_app":
        out.append(
            (
                "GET echostr not a ciphertext",
                "GET",
                signed_query(type_, "AAAA") | {"echostr": "AAAA"},
                b"",
                400,
            )
        )
    if type_ == "wechat_oa":
        ts = now()
        plain_q = {"signature": plain_signature(TOKEN, ts, "5"), "timestamp": ts, "nonce": "5"}
        out += [
            ("plaintext push to a safe-mode account", "POST", plain_q, inner(type_), 403),
            ("unknown encrypt_type", "POST", good_q | {"encrypt_type": "des"}, good_body, 400),
            ("GET echostr with markup", "GET", plain_q | {"echostr": "<script>alert(1)</script>"}, b"", 400),
        ]
    return out


def signed_q_nonce(type_: str, enc: str, nonce: str) -> tuple[dict[str, str], bytes]:
    return signed_query(type_, enc, nonce=nonce), outer(type_, enc)


@pytest.mark.parametrize("type_", ["wecom_app", "wecom_aibot", "wechat_oa"])
async def test_every_bad_input_class_is_refused_and_publishes_nothing(bridge: Bridge, type_: str) -> None:
    cases = bad_requests(type_)
    got = []
    for name, method, query, body, _ in cases:
        status, text = await bridge.call(method, PATHS[type_], query, body)
        got.append((name, status))
        assert status in (400, 403, 413) and b"\n" not in text and len(text) < 100, (name, text)
    assert got == [(c[0], c[4]) for c in cases]
    assert await bridge.inbound_len() == 0
    # and the valid request the cases were made from is accepted
    q, body = post(type_, inner(type_))
    assert (await b_call(bridge, type_, q, body))[0] == 200
    assert await bridge.inbound_len() == 1


def plain_q(nonce: str, ts: str | None = None) -> dict[str, str]:
    ts = now() if ts is None else ts
    return {"signature": plain_signature(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}


async def test_oa_plaintext_mode_bad_inputs(bridge: Bridge) -> None:
    ts = now()
    q = {"signature": plain_signature(TOKEN, ts, "5"), "timestamp": ts, "nonce": "5"}
    good = inner("wechat_oa")
    old = str(int(time.time()) - 3600)
    cases = [
        ({k: v for k, v in q.items() if k != "signature"}, good, 403),
        (q | {"signature": "f" * 40}, good, 403),
        ({"signature": plain_signature(TOKEN, old, "5"), "timestamp": old, "nonce": "5"}, good, 403),
        (plain_q("6"), b"<xml><MsgType>text</MsgType>", 400),  # a nonce each: one body per signed query
        (plain_q("7"), b'<!DOCTYPE xml [<!ENTITY e "x">]><xml><MsgType>&e;</MsgType></xml>', 400),
        (plain_q("8"), xml(MsgType="text"), 400),
        (q | {"encrypt_type": "aes", "msg_signature": "0" * 40}, good, 400),  # no key configured
        (plain_q("9"), b"x" * 65_537, 413),
    ]
    for query, body, want in cases:
        assert (await bridge.call("POST", "/wechat/oa-plain", query, body))[0] == want, (query, body[:40])
    assert await bridge.inbound_len() == 0


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_other_methods_get_405(bridge: Bridge, method: str) -> None:
    for type_ in PATHS:
        q, body = post(type_, inner(type_))
        status, _ = await bridge.call(method, PATHS[type_], q, body)
        assert status == 405
    assert await bridge.inbound_len() == 0


async def test_chunked_body_over_the_cap_is_413(make_bridge: MakeBridge) -> None:
    b = await make_bridge(extra="max_body = 2048")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"<" * 1024

    q, _ = post("wecom_app", inner("wecom_app"))
    status, _ = await b.call("POST", "/wecom/app", q, chunks())
    assert status == 413
    q, body = post("wecom_app", inner("wecom_app"))
    assert len(body) < 2048 and (await b.call("POST", "/wecom/app", q, body))[0] == 200


async def test_timestamp_tolerance_zero_turns_the_check_off(make_bridge: MakeBridge) -> None:
    b = await make_bridge(extra="timestamp_tolerance = 0")
    for type_ in PATHS:
        q, body = post(type_, inner(type_, msg_id=f"old-{type_}"), ts="1409659813")
        assert (await b_call(b, type_, q, body))[0] == 200
    assert await b.inbound_len() == 3


async def test_redis_down_answers_503_and_never_success(write_config: Any, start_daemon: Any) -> None:
    down = '[redis]\nurl = "redis://127.0.0.1:1"\nsocket_timeout = 0.5\n'
    d = await start_daemon(write_config(down + inbounds(), redis=False))
    async with aiohttp.ClientSession() as s:
        b = Bridge(d, s)
        for type_ in PATHS:
            q, body = post(type_, inner(type_))
            status, answer = await b_call(b, type_, q, body)
            assert status == 503 and answer != b"success", type_


# -- logs --------------------------------------------------------------------------------------------


@pytest.fixture
def log_output(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The daemon's log lines, rendered as in production (console renderer, secret masking),
    written to the stderr capsys captures; the previous logging set-up is restored after."""
    saved = structlog.get_config()
    blog.setup("debug", "console")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()))  # type: ignore[arg-type]
    yield capsys
    structlog.configure(**saved)


class _CurrentStderr:
    """Writes to whatever sys.stderr is when a line is logged (capsys swaps it between phases)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


async def test_secrets_and_bodies_never_reach_the_log(
    bridge: Bridge, log_output: pytest.CaptureFixture[str]
) -> None:
    secret_text = "the-message-text-9d2f"
    encs = []
    for type_ in PATHS:
        enc = crypt(type_).encrypt(inner(type_, text=secret_text))
        encs.append(enc)
        assert (await b_call(bridge, type_, signed_query(type_, enc), outer(type_, enc)))[0] == 200
        for _, method, query, bad_body, _ in bad_requests(type_):
            await bridge.call(method, PATHS[type_], query, bad_body)
    await bridge.call("GET", "/wecom/app", verify_query("wecom_app"))
    out, err = log_output.readouterr()
    logs = out + err
    assert "wechat.refused" in logs and "reason=" in logs and "wechat.accepted" in logs
    for secret in (TOKEN, KEY, base64.b64decode(KEY + "=").hex(), secret_text, *encs):
        assert secret not in logs
