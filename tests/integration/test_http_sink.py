"""The `http` sink against a local receiver: signature, 2xx, 429/5xx with Retry-After, other 4xx."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge.bus import Field
from bridge.envelope import Conversation, make_envelope
from tests.conftest import wait_for


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, str], bytes]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((time.monotonic(), dict(request.headers), body))
        if self.answers:
            status, headers = self.answers.pop(0)
            return web.Response(status=status, headers=headers, text="nope")
        return web.json_response({"id": f"r{len(self.got)}"})


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/in", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rec, f"http://127.0.0.1:{port}/in"
    await runner.cleanup()


def cfg_text(url: str) -> str:
    return f"""
        [[inbound]]
        name = "in"
        type = "manual"
        [[outbound]]
        name = "dash"
        type = "http"
        url = "{url}"
        secret = "sink-signing-secret"
        retry_base = 0.05
        max_attempts = 4
        [[routes]]
        from = "in"
        to = "dash"
        """


async def test_posts_signed_json(
    write_config: Any, start_daemon: Any, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    d = await start_daemon(write_config(cfg_text(url)))
    env = make_envelope("in", Conversation("g1", "group", "Team"), "hello 你好")
    await d.bus.publish(env)
    await wait_for(lambda: len(rec.got) == 1)
    await wait_for(lambda: d.runners["dash"].sent == 1)
    _, headers, body = rec.got[0]
    ts = headers["X-Bridge-Timestamp"]
    expected = hmac.new(b"sink-signing-secret", ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Bridge-Signature"] == f"sha256={expected}"
    assert abs(int(ts) - time.time()) < 5
    payload = json.loads(body)
    assert payload["envelope"]["text"] == "hello 你好" and payload["sink"] == "dash"
    assert headers["X-Bridge-Delivery"] == payload["id"]
    mark = await d.redis.get(d.bus.keys.mark("dash", payload["id"]))
    assert mark == b"done:r1"  # the receiver's id is the remote id


async def test_429_and_5xx_retry_honouring_retry_after(
    write_config: Any, start_daemon: Any, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.answers = [(429, {"Retry-After": "1"}), (503, {})]
    d = await start_daemon(write_config(cfg_text(url)))
    await d.bus.publish(make_envelope("in", Conversation("g1"), "x"))
    await wait_for(lambda: len(rec.got) == 3, timeout=15)
    await wait_for(lambda: d.runners["dash"].sent == 1)
    assert rec.got[1][0] - rec.got[0][0] >= 0.95  # Retry-After: 1
    assert await d.redis.xlen(d.bus.keys.dead) == 0


async def test_other_4xx_is_permanent(
    write_config: Any, start_daemon: Any, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.answers = [(422, {})]
    d = await start_daemon(write_config(cfg_text(url)))
    await d.bus.publish(make_envelope("in", Conversation("g1"), "x"))
    await wait_for(lambda: d.redis.xlen(d.bus.keys.dead))
    [(_, fields)] = await d.redis.xrange(d.bus.keys.dead)
    assert fields[Field.REASON.key].startswith(b"permanent: HTTP 422 from the receiver")
    assert len(rec.got) == 1


async def test_unreachable_receiver_is_retried_then_dead(write_config: Any, start_daemon: Any) -> None:
    d = await start_daemon(write_config(cfg_text("http://127.0.0.1:1/in")))
    await d.bus.publish(make_envelope("in", Conversation("g1"), "x"))
    await wait_for(lambda: d.redis.xlen(d.bus.keys.dead), timeout=15)
    [(_, fields)] = await d.redis.xrange(d.bus.keys.dead)
    assert fields[Field.REASON.key].startswith(b"gave up after 4 attempts: cannot reach the receiver")
    assert b"sink-signing-secret" not in fields[Field.REASON.key] + fields[Field.DELIVERY.key]
