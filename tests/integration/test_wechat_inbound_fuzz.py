"""Property-based fuzzing (hypothesis) of the three WeChat handlers through a running daemon.

* arbitrary bodies and queries: never a 500, never a publish;
* mutations of valid requests (signature, timestamp, nonce, the ciphertext, the query): never a 500,
  never a publish;
* mutations anywhere in a valid body: never a 500; what is published is at most the original message,
  once (bytes outside the signed ciphertext are not the message);
* validly signed and encrypted arbitrary payloads: never a 500; 200 exactly when one envelope was
  published.

Hypothesis drives synchronous functions, so each test runs the daemon on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.wechat.crypto import plain_signature
from bridge.adapter import Registry
from bridge.daemon import Daemon
from tests.conftest import REDIS_URL
from tests.integration.test_wechat_inbound import (
    PATHS,
    TOKEN,
    Bridge,
    crypt,
    decrypt_reply,
    inbounds,
    inner,
    now,
    outer,
    post,
    signed_query,
)

T = TypeVar("T")
TYPES = list(PATHS)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REFUSED = {400, 403, 413}


class Harness:
    """A daemon and a client on a private loop; ``run`` drives one coroutine to its end."""

    def __init__(self, d: Daemon, loop: asyncio.AbstractEventLoop, prefix: str) -> None:
        self.d = d
        self.loop = loop
        self.prefix = prefix
        self.b: Bridge

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def call(self, method: str, path: str, query: dict[str, str] | str, body: bytes) -> tuple[int, bytes]:
        return self.run(self.b.call(method, path, query, body))

    def published(self) -> int:
        return self.run(self.b.inbound_len())


@pytest.fixture
def harness(write_config: Any, registry: Registry, prefix: str) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    d = Daemon(write_config(inbounds()), registry)
    h = Harness(d, loop, prefix)

    async def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    try:
        h.run(d.start())
        h.b = Bridge(d, h.run(session()))
        yield h
    finally:
        if getattr(h, "b", None) is not None:
            h.run(h.b.session.close())
        h.run(d.stop())
        h.run(_delete_keys(prefix))
        loop.close()


async def _delete_keys(prefix: str) -> None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


# -- strategies --------------------------------------------------------------------------------------

PARAMS = [
    "msg_signature",
    "msgsignature",
    "signature",
    "timestamp",
    "nonce",
    "echostr",
    "encrypt_type",
    "openid",
]
hexes = st.text(alphabet="0123456789abcdef", min_size=0, max_size=41)
values = st.one_of(
    st.text(max_size=60), hexes, st.integers(0, 2**40).map(str), st.sampled_from(["aes", "raw", ""])
)
queries = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(PARAMS), st.text(max_size=10)), values, max_size=8),
    st.text(alphabet=string.ascii_letters + string.digits + "%&=+/._-~", max_size=200),  # raw query strings
)
xmlish = st.lists(
    st.one_of(st.sampled_from(["<xml>", "</xml>", "<Encrypt>", "</Encrypt>", "<![CDATA[", "]]>", "<!DOCTYPE xml>",
                               "<!ENTITY e 'x'>", "&e;", "&amp;", "<?xml version='1.0'?>", "<a>", "</a>"]),
              st.text(max_size=20)),
    max_size=20,
).map(lambda parts: "".join(parts).encode())  # fmt: skip
jsonish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["encrypt", "msgtype", "x"]), c, max_size=4)
    ),
    max_leaves=10,
).map(lambda v: json.dumps(v).encode())
bodies = st.one_of(st.binary(max_size=3000), xmlish, jsonish)


@pytest.mark.parametrize("path", [*PATHS.values(), "/wechat/oa-plain"])
def test_arbitrary_requests_are_refused(harness: Harness, path: str) -> None:
    @FUZZ
    @given(method=st.sampled_from(["GET", "POST"]), query=queries, body=bodies)
    def check(method: str, query: dict[str, str] | str, body: bytes) -> None:
        status, _ = harness.call(method, path, query, body)
        assert status in REFUSED, (status, method, query, body[:80])

    check()
    assert harness.published() == 0


def _mutate(s: str, data: st.DataObject) -> str:
    """A different string: one character replaced, a cut, or text inserted."""
    how = data.draw(st.sampled_from(["replace", "cut", "insert"]))
    if how == "cut" or not s:
        i = data.draw(st.integers(0, max(len(s) - 1, 0)))
        out = s[:i]
    elif how == "replace":
        i = data.draw(st.integers(0, len(s) - 1))
        c = data.draw(st.characters().filter(lambda c: c != s[i]))
        out = s[:i] + c + s[i + 1 :]
    else:
        i = data.draw(st.integers(0, len(s)))
        out = s[:i] + data.draw(st.text(min_size=1, max_size=8)) + s[i:]
    return out if out != s else s + "x"


SIGNED = {
    "wecom_app": ["msg_signature", "timestamp", "nonce"],
    "wecom_aibot": ["msg_signature", "timestamp", "nonce"],
    "wechat_oa": ["msg_signature", "timestamp", "nonce", "encrypt_type"],
}


@pytest.mark.parametrize("type_", TYPES)
def test_mutated_valid_requests_are_refused(harness: Harness, type_: str) -> None:
    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        plain = inner(type_, msg_id=str(data.draw(st.integers(1, 10**12))))
        enc = crypt(type_).encrypt(plain)
        query = signed_query(type_, enc)
        target = data.draw(st.sampled_from(["ciphertext", "drop", *SIGNED[type_]]))
        if target == "ciphertext":
            enc = _mutate(enc, data)
        elif target == "drop":
            del query[data.draw(st.sampled_from(SIGNED[type_][:3]))]
        else:
            query[target] = _mutate(query[target], data)
        status, _ = harness.call("POST", PATHS[type_], query, outer(type_, enc))
        assert status in REFUSED, (status, target)

    check()
    assert harness.published() == 0


@pytest.mark.parametrize("type_", TYPES)
def test_mutated_bodies_publish_at_most_the_original_once(harness: Harness, type_: str) -> None:
    plain = inner(type_, msg_id="424242")

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        q, body = post(type_, plain)
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(body) - 1))
        if how == "flip":
            body = body[:i] + bytes([body[i] ^ data.draw(st.integers(1, 255))]) + body[i + 1 :]
        elif how == "cut":
            body = body[:i]
        else:
            body = body[:i] + data.draw(st.binary(min_size=1, max_size=16)) + body[i:]
        before = harness.published()
        status, _ = harness.call("POST", PATHS[type_], q, body)
        event(f"HTTP {status}")
        assert status in REFUSED | {200}, status
        assert harness.published() - before <= (1 if status == 200 else 0)

    check()
    assert harness.published() <= 1
    if harness.published():
        [env] = harness.run(harness.b.envelopes())
        assert env.text == "hello"  # the original message, nothing else


def _xml_payload(fields: dict[str, str]) -> bytes:
    esc = {k: v.replace("]]>", "") for k, v in fields.items()}
    return ("<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in esc.items()) + "</xml>").encode()


xml_keys = st.sampled_from(["ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId", "MsgID",
                            "Event", "EventKey", "PicUrl", "MediaId", "Format", "Recognition", "Location_X",
                            "Label", "Url", "Title", "AgentID"])  # fmt: skip
xml_values = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=30),
    st.sampled_from(
        ["text", "image", "voice", "video", "shortvideo", "location", "link", "file", "event", "x"]
    ),
    st.integers(0, 2**70).map(str),
)
msg_types = st.sampled_from(
    ["text", "image", "voice", "video", "shortvideo", "location", "link", "file", "event", "x"]
)
xml_messages = st.builds(  # mostly-valid messages with random fields on top
    lambda base, extra: _xml_payload(base | extra),
    st.fixed_dictionaries(
        {"FromUserName": st.text(min_size=1, max_size=20).filter(str.strip), "MsgType": msg_types,
         "CreateTime": st.one_of(st.integers(0, 2**70).map(str), st.text(max_size=5))},
        optional={"MsgId": st.integers(0, 2**64).map(str), "ToUserName": st.text(max_size=10),
                  "Event": st.text(max_size=10), "EventKey": st.text(max_size=10)},
    ),
    st.dictionaries(xml_keys, xml_values, max_size=5),
)  # fmt: skip
xml_payloads = st.one_of(
    xml_messages,
    st.dictionaries(xml_keys, xml_values, max_size=10).map(_xml_payload),
    xmlish,
    st.binary(max_size=500),
)
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_keys = st.sampled_from(["msgid", "msgtype", "chatid", "chattype", "from", "userid", "text", "content",
                             "image", "url", "mixed", "msg_item", "voice", "file", "event", "eventtype", "stream",
                             "id", "quote", "response_url", "create_time", "aibotid"])  # fmt: skip
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(json_keys, c, max_size=5),
                           max_leaves=20)  # fmt: skip
json_messages = st.builds(
    lambda base, extra: json.dumps(base | extra).encode(),
    st.fixed_dictionaries(
        {"msgtype": st.sampled_from(["text", "image", "mixed", "voice", "file", "event", "stream", "x"]),
         "from": st.fixed_dictionaries({"userid": st.text(min_size=1, max_size=10)}),
         "chattype": st.sampled_from(["single", "group", "x"])},
        optional={"msgid": st.one_of(st.text(max_size=20), st.integers()), "chatid": st.text(max_size=10),
                  "stream": st.fixed_dictionaries({"id": st.text(max_size=140)}),
                  "create_time": json_leaf, "response_url": st.text(max_size=20)},
    ),
    st.dictionaries(json_keys, json_values, max_size=4),
)  # fmt: skip
json_payloads = st.one_of(
    json_messages,
    st.dictionaries(json_keys, json_values, max_size=8).map(lambda v: json.dumps(v).encode()),
    jsonish,
    st.binary(max_size=500),
)


@pytest.mark.parametrize("type_", TYPES)
def test_signed_arbitrary_payloads_never_fail(harness: Harness, type_: str) -> None:
    payloads = json_payloads if type_ == "wecom_aibot" else xml_payloads

    @FUZZ
    @given(payload=payloads)
    def check(payload: bytes) -> None:
        q, body = post(type_, payload)
        before = harness.published()
        status, answer = harness.call("POST", PATHS[type_], q, body)
        event(f"HTTP {status}")
        assert status in (200, 400), (status, payload[:100])
        assert harness.published() - before in ((0, 1) if status == 200 else (0,))
        if status == 200 and answer and type_ == "wecom_aibot":
            assert decrypt_reply(answer)["msgtype"] == "stream"

    check()


def test_plaintext_mode_arbitrary_bodies_never_fail(harness: Harness) -> None:
    """In plaintext mode the signature does not cover the body: any body may be parsed."""

    nonces = iter(range(10**6))

    @FUZZ
    @given(payload=xml_payloads)
    def check(payload: bytes) -> None:
        ts, nonce = now(), f"9{next(nonces)}"  # a nonce each: one signed query carries one body
        q = {"signature": plain_signature(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}
        before = harness.published()
        status, _ = harness.call("POST", "/wechat/oa-plain", q, payload)
        event(f"HTTP {status}")
        assert status in (200, 400), (status, payload[:100])
        assert harness.published() - before in ((0, 1) if status == 200 else (0,))

    check()
