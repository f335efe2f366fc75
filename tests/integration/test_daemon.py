"""The daemon's lifecycle: readiness, Redis outages, graceful stop, sd_notify, supervision."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.generic.http_sink import sign
from bridge.daemon import Supervisor
from bridge.envelope import Conversation, make_envelope
from tests.conftest import CollectSink, wait_for

WEBHOOK = """
[[inbound]]
name = "hook"
type = "webhook"
path = "/hook"
secret = "hook-secret-value"
[[outbound]]
name = "c"
type = "collect"
[[routes]]
from = "hook"
to = "c"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server we can stop and start again on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        assert binary, "redis-server is needed (scripts/test.sh installs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.time() + 10
        while time.time() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


async def post_hook(port: int, body: dict[str, Any], secret: str = "hook-secret-value") -> tuple[int, str]:
    raw = json.dumps(body).encode()
    ts = str(int(time.time()))
    headers = {"X-Bridge-Timestamp": ts, "X-Bridge-Signature": sign(secret, ts, raw)}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/hook", data=raw, headers=headers) as r,
    ):
        return r.status, await r.text()


async def test_redis_down_gives_503_then_recovers(
    private_redis: RedisServer, write_config: Any, start_daemon: Any
) -> None:
    cfg = write_config(WEBHOOK.replace('name = "hook"', 'name = "hook"', 1), redis=False)
    cfg.redis.url = private_redis.url
    cfg.redis.socket_timeout = 1.0
    d = await start_daemon(cfg)
    status, _ = await post_hook(d.port, {"id": "m1", "conversation": "g1", "text": "before"})
    assert status == 200
    sink = CollectSink.instances["c"]
    await wait_for(lambda: len(sink.sent) == 1)

    private_redis.stop()
    status, body = await post_hook(d.port, {"id": "m2", "conversation": "g1", "text": "during"})
    assert status == 503, body
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{d.port}/readyz") as r:
        assert r.status == 503
        assert "redis" in (await r.json())["not_ready"]

    private_redis.start()  # an empty Redis (no persistence): the daemon must recreate its groups
    await wait_for(lambda: _ready(d.port), timeout=15)
    status, _ = await post_hook(d.port, {"id": "m2", "conversation": "g1", "text": "after"})
    assert status == 200
    await wait_for(lambda: len(sink.sent) == 2, timeout=20)
    assert [x.envelope.text for x in sink.sent] == ["before", "after"]


async def _ready(port: int) -> bool:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status == 200


async def test_webhook_refuses_bad_signatures_and_dedupes(write_config: Any, start_daemon: Any) -> None:
    d = await start_daemon(write_config(WEBHOOK))
    status, _ = await post_hook(d.port, {"conversation": "g1", "text": "x"}, secret="forged")
    assert status == 401
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{d.port}/hook", data=b"{}") as r:
        assert r.status == 401  # unsigned
    status, _ = await post_hook(d.port, {"conversation": 5})
    assert status == 400
    assert await d.redis.xlen(d.bus.keys.inbound) == 0
    for _ in range(2):
        status, body = await post_hook(d.port, {"id": "same", "conversation": "g1", "text": "x"})
        assert status == 200
    assert json.loads(body)["duplicate"] is True
    assert await d.redis.xlen(d.bus.keys.inbound) == 1


async def test_readyz_names_what_is_not_ready(write_config: Any, start_daemon: Any) -> None:
    d = await start_daemon(write_config(WEBHOOK))

    async def not_ready() -> str:
        return "gateway token rejected"

    CollectSink.instances["c"].ready = not_ready  # type: ignore[method-assign]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{d.port}/readyz") as r:
            assert r.status == 503
            assert (await r.json())["not_ready"] == {"c": "gateway token rejected"}
        async with s.get(f"http://127.0.0.1:{d.port}/healthz") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{d.port}/metrics") as r:
            assert "wechat_bridge_delivered_total" in await r.text()


async def test_stop_drains_sends_in_flight(write_config: Any, start_daemon: Any) -> None:
    d = await start_daemon(write_config(WEBHOOK))
    sink = CollectSink.instances["c"]
    sink.delay = 1.0
    await d.bus.publish(make_envelope("hook", Conversation("g1"), "slow"))
    await wait_for(lambda: len(sink.attempts) == 1)
    await d.stop()  # while the send is in flight
    assert [x.envelope.text for x in sink.sent] == ["slow"]
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(d.config.redis.url)
    pending = await d.bus.out_pending("c", r)
    await r.aclose()
    assert pending == 0


async def test_sd_notify(write_config: Any, start_daemon: Any, tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    d = await start_daemon(write_config(WEBHOOK))
    await asyncio.sleep(0.3)
    await d.stop()
    got = []
    while True:
        try:
            got.append(srv.recv(4096).decode())
        except BlockingIOError:
            break
    srv.close()
    assert got[0].startswith("READY=1")
    assert "WATCHDOG=1" in got
    assert got[-1] == "STOPPING=1"


async def test_supervisor_restarts_a_crashed_task() -> None:
    sup = Supervisor()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(10)

    sup.spawn("flaky", flaky)
    await wait_for(lambda: len(runs) == 3, timeout=5)
    assert sup.crashes["flaky"] == 2
    await sup.stop(0.1)


async def test_warns_when_redis_keeps_nothing_on_disk(
    private_redis: RedisServer, write_config: Any, start_daemon: Any, capfd: Any
) -> None:
    cfg = write_config(WEBHOOK, redis=False)
    cfg.redis.url = private_redis.url  # started with --save "" --appendonly no
    await start_daemon(cfg)
    assert "redis.no_persistence" in capfd.readouterr().err


async def test_the_embedded_redis_warning_says_what_it_can_lose(
    write_config: Any, start_daemon: Any, capfd: Any
) -> None:
    await start_daemon(write_config(WEBHOOK, redis=False))
    err = capfd.readouterr().err
    assert "embedded_redis.started" in err and "redis.no_persistence" not in err
    assert "redis.fsync_everysec" in err and "up to ~1 s" in err  # appendonly yes, everysec
