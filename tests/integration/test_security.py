"""Issue 11: the public endpoints cannot be starved, tricked or made to talk.

One test (or a few) per item of the issue, each named after what it refuses. Each was run against
the code before the change and failed there (see the branch's report for how).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.wechat import parsing
from bridge import logging as blog
from bridge import refusals
from bridge.bus import connect
from bridge.egress import Egress
from bridge.embedded_redis import EmbeddedRedis
from bridge.errors import EgressRefused
from bridge.files import private_dir
from bridge.metrics import Metrics
from bridge.web import build_app
from tests.conftest import CollectSink, wait_for
from tests.integration.test_daemon import free_port
from tests.integration.test_embedded_and_cli import ROOT, cli
from tests.integration.test_wechat_inbound import (
    MakeBridge,
    bridges,
    crypt,
    inbounds,
    inner,
    now,
    outer,
    plain_q,
    post,
    signed_query,
    xml,
)

HOOK_SECRET = "hook-secret-value"
WEBHOOK = f"""
[[inbound]]
name = "hook"
type = "webhook"
path = "/hook"
secret = "{HOOK_SECRET}"
{{extra}}
[[outbound]]
name = "c"
type = "collect"
[[routes]]
from = "hook"
to = "c"
"""


def hook_config(extra: str = "", http: str = "") -> str:
    return http + WEBHOOK.format(extra=extra)


def signed_headers(body: bytes, ts: str | None = None) -> dict[str, str]:
    ts = now() if ts is None else ts
    mac = hmac.new(HOOK_SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Bridge-Timestamp": ts, "X-Bridge-Signature": "sha256=" + mac}


@pytest.fixture
async def make_bridge(redis: Any, write_config: Any, start_daemon: Any) -> Any:
    async with bridges(write_config, start_daemon) as make:
        yield make


async def raw_request(port: int, head: bytes, body: bytes = b"", *, wait: float = 5.0) -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; what comes back until close or ``wait``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                out += chunk
                head_end = out.find(b"\r\n\r\n")
                if head_end >= 0:  # a whole answer (Content-Length framed) is enough
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in out[:head_end].split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(out) >= head_end + 4 + length[0]:
                        break
    except TimeoutError:
        pass
    writer.close()
    return out


# -- 1. verify before parse ------------------------------------------------------------------------


@pytest.fixture
def xml_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every XML parse (both of parse_xml's paths)."""
    calls: list[int] = []
    flat, expat = parsing._parse_flat, parsing._parse_expat

    def counted_flat(data: bytes) -> Any:
        calls.append(len(data))
        return flat(data)

    def counted_expat(data: bytes, what: str) -> Any:
        calls.append(len(data))
        return expat(data, what)

    monkeypatch.setattr(parsing, "_parse_flat", counted_flat)
    monkeypatch.setattr(parsing, "_parse_expat", counted_expat)
    return calls


@pytest.mark.parametrize("type_", ["wecom_app", "wechat_oa"])
async def test_forged_callback_body_is_refused_before_any_xml_parse(
    make_bridge: MakeBridge, xml_parses: list[int], type_: str
) -> None:
    b = await make_bridge()
    path = {"wecom_app": "/wecom/app", "wechat_oa": "/wechat/oa"}[type_]
    enc = crypt(type_).encrypt(inner(type_))
    q = signed_query(type_, enc)
    # 16k-ish empty elements and a well-formed Encrypt the signature does not cover
    forged = b"<xml>" + b"<a/>" * 7000 + b"<Encrypt><![CDATA[" + b"QUJD" * 8 + b"]]></Encrypt></xml>"
    assert len(forged) < 32_768
    status, text = await b.call("POST", path, q, forged)
    assert (status, text) == (403, b"bad signature")
    status, _ = await b.call("POST", path, q, b"<xml>" + b"<a/>" * 7000 + b"</xml>")  # no Encrypt
    assert status == 400
    assert xml_parses == []  # nothing unsigned was parsed
    # two Encrypt elements: the scan refuses rather than guess which one the parse would see
    twice = outer(type_, enc).replace(b"</xml>", b"<Encrypt>QUJD</Encrypt></xml>")
    assert (await b.call("POST", path, q, twice))[0] == 400
    # the genuine one still goes through (and is parsed only then)
    assert (await b.call("POST", path, q, outer(type_, enc)))[0] == 200
    assert xml_parses


async def test_default_body_cap_refuses_what_wechat_never_sends(make_bridge: MakeBridge) -> None:
    b = await make_bridge()
    q, _ = post("wecom_app", inner("wecom_app"))
    status, _ = await b.call("POST", "/wecom/app", q, b"<xml>" + b" " * 40_000 + b"</xml>")
    assert status == 413  # 40 KB: over the 32 KiB default (the old 64 KiB cap let it through)


# -- 2. headers before the body --------------------------------------------------------------------


async def test_unsigned_webhook_is_refused_before_its_body_is_read(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config())
    head = (
        b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
    )
    started = time.monotonic()
    answer = await raw_request(b.d.port or 0, head, b"{" * 1000, wait=5.0)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
    assert time.monotonic() - started < 4  # answered without waiting for the other 1,047,576 bytes
    assert b"missing signature" in answer


async def test_webhook_body_over_its_cap_is_refused_while_streaming(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config("max_body = 4096"))

    async def chunks() -> Any:
        for _ in range(64):
            yield b"x" * 1024

    status, _ = await b.call("POST", "/hook", body=chunks(), headers=signed_headers(b"whatever"))
    assert status == 413
    body = json.dumps({"conversation": "c", "text": "ok"}).encode()
    assert (await b.call("POST", "/hook", body=body, headers=signed_headers(body)))[0] == 200


# -- 3. deadlines and counts ------------------------------------------------------------------------


async def test_slow_headers_connection_is_closed_at_its_deadline(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config(http="header_timeout = 0.5\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", b.d.port)
    writer.write(b"POST /hook HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed_after = None
    for _ in range(40):  # a header byte every 0.1 s: never finishes
        await asyncio.sleep(0.1)
        if reader.at_eof() or writer.is_closing():
            break
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            break
        try:
            async with asyncio.timeout(0.01):
                if await reader.read(1) == b"":
                    break
        except TimeoutError:
            pass
        except ConnectionError:  # reset: closed by the daemon
            break
    closed_after = time.monotonic() - started
    writer.close()
    assert closed_after < 2.5, closed_after
    assert refusals.counts().get(("http.header_timeout", "public", "no request in time"), 0) >= 1


async def test_connections_past_the_cap_are_closed_and_counted(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config(http="max_connections = 3\n"))
    held = [await asyncio.open_connection("127.0.0.1", b.d.port) for _ in range(3)]
    await asyncio.sleep(0.1)
    r4, w4 = await asyncio.open_connection("127.0.0.1", b.d.port)
    async with asyncio.timeout(2):
        assert await r4.read(1) == b""  # closed as it arrived
    w4.close()
    assert refusals.counts()[("http.connection_refused", "public", "too many connections")] == 1
    for _, w in held:
        w.close()
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{b.d.port}/healthz") as r:
        assert r.status == 200  # room again once they are gone


async def test_callback_that_goes_stale_while_its_body_trickles_is_refused(make_bridge: MakeBridge) -> None:
    b = await make_bridge(inbounds(extra="timestamp_tolerance = 1"))
    q, body = post("wecom_app", inner("wecom_app"))

    async def slow() -> Any:
        yield body[:10]
        await asyncio.sleep(2.6)  # past the 1 s tolerance once the body is complete
        yield body[10:]

    status, text = await b.call("POST", "/wecom/app", q, slow())
    assert (status, text) == (403, b"stale timestamp")
    assert await b.inbound_len() == 0


async def test_accept_failures_are_counted_not_logged_each_time(
    make_bridge: MakeBridge, caplog: pytest.LogCaptureFixture
) -> None:
    b = await make_bridge(hook_config())
    loop = asyncio.get_running_loop()
    emfile = OSError(24, "Too many open files")
    with structlog.testing.capture_logs() as logs:
        for _ in range(500):  # what asyncio's accept loop reports when it runs out of descriptors
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": emfile}
            )
    assert [r for r in caplog.records if "accept" in r.getMessage()] == []  # no traceback per failure
    assert len([e for e in logs if e["event"] == "http.accept_failed"]) == 1
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{b.d.port}/metrics") as r:
        text = await r.text()
    assert 'event="http.accept_failed",reason="Too many open files",source="listener"} 500.0' in text


# -- 4. no 500 from any input ------------------------------------------------------------------------


async def test_malformed_webhook_headers_and_bodies_get_4xx_not_500(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config())
    body = json.dumps({"conversation": "c", "text": "x"}).encode()
    good = signed_headers(body)
    cases = [
        ({**good, "X-Bridge-Timestamp": "²"}, body, 401),
        ({**good, "X-Bridge-Timestamp": "9" * 5000}, body, 401),
        ({**good, "X-Bridge-Signature": "sha256=" + "é" * 64}, body, 401),
        (
            signed_headers(b'{"conversation": "c", "text": "\xff\xfe"}'),
            b'{"conversation": "c", "text": "\xff\xfe"}',
            400,
        ),
    ]
    for headers, payload, want in cases:
        raw_headers = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
        status, _ = await b.call("POST", "/hook", body=payload, headers=raw_headers)
        assert status == want, (headers, status)


async def test_aibot_create_time_past_any_clock_gets_400_not_500(make_bridge: MakeBridge) -> None:
    b = await make_bridge()
    base = {"aibotid": "A", "chattype": "single", "from": {"userid": "u"}, "msgtype": "text",
            "text": {"content": "hi"}}  # fmt: skip
    for digits in ("1" + "0" * 400, "9" * 5000):  # 10**400, and past int()'s 4,300-digit limit
        plain = json.dumps(base | {"msgid": f"big-{len(digits)}", "create_time": 0})
        plain = plain.replace('"create_time": 0', f'"create_time": {digits}')
        q, body = post("wecom_aibot", plain.encode())
        status, text = await b.call("POST", "/wecom/bot", q, body)
        assert status == 400, text  # 10**400: "bad create_time"; 5,000 digits: the JSON decoder refuses
    # a 5,000-digit msgid: no 500 either
    plain = json.dumps(base | {"msgid": 1}).replace('"msgid": 1', '"msgid": ' + "7" * 5000)
    q, body = post("wecom_aibot", plain.encode())
    assert (await b.call("POST", "/wecom/bot", q, body))[0] in (200, 400)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_header_text = st.one_of(
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=80),
    # digits Python's isdigit() accepts and int() does not; past int()'s 4,300 digits; non-ASCII
    st.sampled_from(["²", "١٢٣", "9" * 5000, "sha256=" + "é" * 64, "\xff" * 10]),
)


@given(
    ts=st.one_of(_header_text, st.integers(-(10**30), 10**30).map(str), st.just("")),
    sig=st.one_of(_header_text, st.just("sha256=" + "0" * 64)),
    extra=st.dictionaries(
        st.sampled_from(["Content-Type", "X-Bridge-Delivery", "Transfer-Encoding", "Expect"]),
        _header_text,
        max_size=2,
    ),
    body=st.binary(max_size=300),
)
@FUZZ
def test_fuzzed_webhook_headers_never_get_a_500(
    write_config: Any, registry: Any, ts: str, sig: str, extra: dict[str, str], body: bytes
) -> None:
    headers = {**extra, "X-Bridge-Timestamp": ts, "X-Bridge-Signature": sig}
    status = _fuzz_harness(write_config, registry).call(headers, body)
    assert status in (400, 401, 408, 413, 417), (headers, status)


@given(
    query=st.dictionaries(
        st.sampled_from(["msg_signature", "timestamp", "nonce", "encrypt_type", "signature"]),
        _header_text,
        max_size=5,
    ),
    headers=st.dictionaries(
        st.sampled_from(["Content-Type", "Content-Encoding", "Transfer-Encoding", "Expect"]),
        _header_text,
        max_size=3,
    ),
)
@FUZZ
def test_fuzzed_callback_headers_never_get_a_500(
    write_config: Any, registry: Any, query: dict[str, str], headers: dict[str, str]
) -> None:
    h = _fuzz_harness(write_config, registry)
    for path in ("/wecom/app", "/wechat/oa", "/wecom/bot"):
        status = h.call(headers, b"<xml><Encrypt>QUJD</Encrypt></xml>", path=path, query=query)
        assert status in (400, 401, 403, 408, 413, 417), (path, query, headers, status)


class _FuzzHarness:
    """One daemon for all the examples of a test, on a loop of its own (hypothesis is synchronous)."""

    def __init__(self, write_config: Any, registry: Any) -> None:
        from bridge.daemon import Daemon

        self.loop = asyncio.new_event_loop()
        self.d = Daemon(write_config(hook_config() + inbounds()), registry)
        self.loop.run_until_complete(self.d.start())
        self.session = self.loop.run_until_complete(_session())

    def call(self, headers: dict[str, str], body: bytes, path: str = "/hook", query: Any = None) -> int:
        async def go() -> int:
            try:
                async with self.session.post(
                    f"http://127.0.0.1:{self.d.port}{path}", data=body, headers=headers, params=query,
                    skip_auto_headers=["Content-Type"],
                ) as r:  # fmt: skip
                    await r.read()
                    return r.status
            except aiohttp.ClientError:
                return 400  # the client refused to send it (a header it will not write)
            except ValueError:
                return 400

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(self.d.stop())
        self.loop.close()


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


_harnesses: dict[int, _FuzzHarness] = {}


def _fuzz_harness(write_config: Any, registry: Any) -> _FuzzHarness:
    key = id(write_config)
    if key not in _harnesses:
        for h in _harnesses.values():
            h.close()
        _harnesses.clear()
        _harnesses[key] = _FuzzHarness(write_config, registry)
    return _harnesses[key]


@pytest.fixture(autouse=True)
def _close_fuzz_harness() -> Any:
    yield
    for h in _harnesses.values():
        h.close()
    _harnesses.clear()


# -- 5. replays the protocol allows ------------------------------------------------------------------


async def test_oa_plaintext_query_replayed_with_another_body_is_refused(make_bridge: MakeBridge) -> None:
    b = await make_bridge()
    q = plain_q("424242")
    genuine = xml(
        ToUserName="gh_1", FromUserName="alice", CreateTime=now(), MsgType="text", Content="hi", MsgId="11"
    )
    forged = xml(
        ToUserName="gh_1", FromUserName="boss", CreateTime=now(), MsgType="text", Content="pay", MsgId="12"
    )
    assert (await b.call("POST", "/wechat/oa-plain", q, genuine))[0] == 200
    assert (await b.call("POST", "/wechat/oa-plain", q, genuine))[0] == 200  # a platform retry
    status, text = await b.call("POST", "/wechat/oa-plain", q, forged)
    assert (status, text) == (403, b"nonce replayed with another body")
    envs = await b.envelopes()
    assert [e.sender.id if e.sender else None for e in envs] == ["alice"]


async def test_webhook_without_id_replayed_is_published_once(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config())
    body = json.dumps({"conversation": "c", "text": "deploy done"}).encode()
    headers = signed_headers(body)
    first = await b.call("POST", "/hook", body=body, headers=headers)
    again = await b.call("POST", "/hook", body=body, headers=headers)
    assert first[0] == again[0] == 200
    assert json.loads(again[1])["duplicate"] is True
    assert await b.inbound_len() == 1


# -- 6. no SSRF ---------------------------------------------------------------------------------------


async def test_internal_and_unlisted_urls_are_refused_by_the_egress_check() -> None:
    e = Egress()
    for url in (
        "http://127.0.0.1:8080/admin", "http://[::1]/", "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/", "https://evil.example.com/r", "file:///etc/passwd", "https://u:p@qyapi.weixin.qq.com/",
        "gopher://qyapi.weixin.qq.com/",
    ):  # fmt: skip
        with pytest.raises(EgressRefused):
            await e.check(url)
    e.check_url("https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=x")  # listed: passes
    # a listed name that resolves to loopback is refused by its address
    local = Egress(hosts=["localhost"])
    with pytest.raises(EgressRefused, match="internal address"):
        await local.check("http://localhost:1/")
    await Egress(hosts=["localhost"], private=["127.0.0.0/8", "::1/128"]).check("http://localhost:1/")


async def test_response_url_to_a_loopback_admin_is_refused(make_bridge: MakeBridge) -> None:
    from tests.integration import test_wechat_inbound_aibot as aibot

    hits: list[str] = []

    async def admin(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"errcode": 0})

    app = web.Application()
    app.router.add_post("/admin", admin)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = aibot.CONFIG.format(window=1, to="ai").split("\n", 2)[2]  # without the loopback allowance
        b = await make_bridge(config)
        CollectSink.instances["ai"].reply_text = "answer"
        await aibot.send(b, aibot.message("m-ssrf", "hi", f"http://127.0.0.1:{port}/admin"))
        await wait_for(lambda: b.d.runners["bot_reply"].dead == 1, timeout=15)
        reasons = b"".join(v for f in await aibot.dead(b) for v in f.values())
        assert b"refused URL" in reasons
    finally:
        await runner.cleanup()
    assert hits == []


# -- 7. nothing leaks ---------------------------------------------------------------------------------


class _Status:
    instance = "probe"

    async def readiness(self) -> dict[str, str]:
        return {"claw": "not connected to ws://admin:hunter2@10.0.0.9:18789/?password=hunter2"}

    async def exposition(self) -> bytes:
        return Metrics().render()


async def test_readyz_and_healthz_do_not_leak_passwords_host_or_versions() -> None:
    runner = web.AppRunner(build_app(_Status(), max_body=1024))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                text = await r.text()
                assert "hunter2" not in text and "not connected to ws://***@10.0.0.9" in text
            for path in ("/healthz", "/nope"):
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert r.headers["Server"] == "wechat-bridge", path
                    if path == "/healthz":
                        assert await r.json() == {"status": "alive"}
    finally:
        await runner.cleanup()


def test_check_config_masks_header_values_and_redis_password(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_text(
        '[redis]\nurl = "redis://127.0.0.1:6379/0?password=r3dis-pw"\n'
        '[[outbound]]\nname = "dash"\ntype = "http"\nurl = "https://dash.example/in"\n'
        'headers = { Authorization = "Bearer tok-abc123", X-Api-Key = "key-xyz789" }\n'
        '[[inbound]]\nname = "m"\ntype = "manual"\n'
        '[[routes]]\nfrom = "m"\nto = "dash"\n'
    )
    out = cli("check-config", "--config", str(p), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for secret in ("r3dis-pw", "tok-abc123", "key-xyz789"):
        assert secret not in out.stdout + out.stderr, secret


async def test_admin_listen_keeps_readyz_and_metrics_off_the_public_port(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config(http='admin_listen = "127.0.0.1:0"\n'))
    public, admin = b.d.ports["public"], b.d.ports["admin"]
    assert public != admin
    async with aiohttp.ClientSession() as s:
        for path in ("/readyz", "/metrics"):
            async with s.get(f"http://127.0.0.1:{public}{path}") as r:
                assert r.status == 404, path
            async with s.get(f"http://127.0.0.1:{admin}{path}") as r:
                assert r.status in (200, 503), path
        async with s.get(f"http://127.0.0.1:{public}/healthz") as r:
            assert r.status == 200


# -- 8. files only their owner can read --------------------------------------------------------------


async def test_data_dir_and_redis_files_are_not_readable_by_other_users(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "var"
        er = EmbeddedRedis(data)
        await er.start()
        r = connect(er.url)
        await r.xadd("s", {"text": "a private message"})
        await r.aclose()
        await er.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for p in data.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, (p, oct(mode))
    # and a data_dir an older version left open is closed at start
    loose = tmp_path / "old"
    loose.mkdir(mode=0o755)
    (loose / "appendonly.aof").write_text("x")
    os.chmod(loose / "appendonly.aof", 0o644)
    private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert stat.S_IMODE((loose / "appendonly.aof").stat().st_mode) == 0o600


# -- 9. logs an operator can trust --------------------------------------------------------------------

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\r\n2026-01-01T00:00:00Z [info] forged.line\u2028\u2029\x85\x9b"


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("plain", [False, True])
def test_log_lines_refuse_control_characters_and_line_separators(
    capsys: pytest.CaptureFixture[str], fmt: str, plain: bool
) -> None:
    saved = structlog.get_config()
    try:
        blog.setup("info", fmt, plain=plain)
        blog.get("t").warning("t.hostile", text=HOSTILE, word="x\x1b]0;title\x07\x1b[31mred")
        blog.flush()
        err = capsys.readouterr().err
    finally:
        structlog.configure(**saved)
    assert err.count("\n") == 1, err
    for c in ("\x1b", "\x07", "\r", "\u2028", "\u2029", "\x85", "\x9b"):
        assert c not in err, repr(c)
    assert "\\x1b]0;owned" in err


def test_stdlib_and_aiohttp_records_go_through_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    saved = structlog.get_config()
    try:
        blog.setup("info", "json")
        logging.getLogger("aiohttp.server").error(
            "Error handling request from %s (security test)", "1.2.3.4\x1b[31m"
        )
        for _ in range(50):
            logging.getLogger("aiohttp.server").error(
                "Error handling request from %s (security test)", "5.6.7.8"
            )
        blog.flush()
        err = capsys.readouterr().err
    finally:
        structlog.configure(**saved)
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert len(lines) == 1  # the 50 repeats within the interval are counted, not written
    assert lines[0]["event"] == "log.stdlib" and lines[0]["logger_name"] == "aiohttp.server"
    assert "\x1b" not in lines[0]["message"]


async def test_repeated_refusals_are_logged_once_and_counted(make_bridge: MakeBridge) -> None:
    b = await make_bridge(hook_config())
    with structlog.testing.capture_logs() as logs:
        for _ in range(30):
            assert (await b.call("POST", "/hook", body=b"{}"))[0] == 401
    assert len([e for e in logs if e["event"] == "webhook.refused"]) == 1
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{b.d.port}/metrics") as r:
        text = await r.text()
    assert (
        'wechat_bridge_refused_total{event="webhook.refused",reason="missing signature",source="hook"} 30.0'
        in text
    )


# -- 10. systemd -----------------------------------------------------------------------------------


def test_reload_does_not_stop_the_service(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "wechat-bridge.service").read_text()
    reload_line = next(line for line in unit.splitlines() if line.startswith("ExecReload="))
    assert "-HUP" in reload_line
    for needed in ("PrivateUsers=yes", "PrivateMounts=yes", "IPAddressDeny=any"):
        assert needed in unit, needed
    port = free_port()
    cfg = tmp_path / "demo.toml"
    text = (ROOT / "config" / "demo.toml").read_text()
    cfg.write_text(
        text.replace('"../var/demo"', f'"{tmp_path / "var"}"').replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(cfg)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WECHAT_BRIDGE_LOOP": "asyncio"},
    )  # fmt: skip
    try:
        end = time.time() + 20
        while time.time() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)  # what `systemctl reload` now sends
        time.sleep(1.0)
        assert proc.poll() is None, "SIGHUP stopped the daemon"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    assert code == 0, log
    assert "daemon.reload_checked" in log
