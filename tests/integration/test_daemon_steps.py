"""Start-up as named steps: a failing step undoes exactly the earlier ones, in reverse, and the log
names it; a stop undoes them all; the web app sees the daemon only through its status interface."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import pytest
import structlog

from bridge.adapter import Registry, SendContext, Sink
from bridge.daemon import Daemon, Lifecycle, Step, Supervisor, run_loop
from bridge.envelope import Conversation, Delivery, make_envelope
from bridge.errors import ConfigError, PermanentError
from bridge.metrics import Metrics
from bridge.web import build_app
from tests.conftest import CollectSink, wait_for

TWO_SINKS = """
[[inbound]]
name = "hook"
type = "webhook"
path = "/hook"
secret = "hook-secret-value"
[[outbound]]
name = "a"
type = "recording"
[[outbound]]
name = "b"
type = "recording"
[[routes]]
from = "hook"
to = "a"
"""

events: list[str] = []


class RecordingSink(Sink):
    """Records its start and close in ``events``; the one named in ``fail_start`` refuses to start."""

    fail_start = ""

    async def start(self) -> None:
        events.append(f"start:{self.name}")
        if self.name == RecordingSink.fail_start:
            raise RuntimeError(f"{self.name} cannot start")

    async def close(self) -> None:
        events.append(f"close:{self.name}")

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        return "x"


@pytest.fixture
def recording(registry: Registry) -> Registry:
    events.clear()
    RecordingSink.fail_start = ""
    registry.sinks["recording"] = RecordingSink
    return registry


def recorder(done: list[str], name: str, lifecycle: Lifecycle, *, fail: bool = False) -> Step:
    async def run() -> None:
        done.append(f"do:{name}")

        async def undo() -> None:
            done.append(f"undo:{name}")

        lifecycle.on_stop(name, undo)
        if fail:
            raise RuntimeError(f"{name} failed")

    return Step(name, run)


async def test_a_failing_step_undoes_the_earlier_ones_in_reverse() -> None:
    lc = Lifecycle()
    done: list[str] = []
    steps = [recorder(done, n, lc) for n in ("one", "two", "three")]
    steps.append(recorder(done, "four", lc, fail=True))  # registers its own undo, then fails
    steps.append(recorder(done, "five", lc))
    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError, match="four failed"):
        await lc.start(steps)
    assert done == [
        "do:one",
        "do:two",
        "do:three",
        "do:four",
        "undo:four",
        "undo:three",
        "undo:two",
        "undo:one",
    ]
    failed = [e for e in logs if e["event"] == "daemon.step_failed"]
    assert [e["step"] for e in failed] == ["four"]
    assert lc.pending == []
    await lc.stop()  # nothing left to undo: a second stop does nothing
    assert done[-1] == "undo:one"


async def test_stop_undoes_everything_in_reverse_and_goes_on_past_a_failing_undo() -> None:
    lc = Lifecycle()
    done: list[str] = []

    async def broken() -> None:
        raise OSError("socket already gone")

    async def with_broken_undo() -> None:
        lc.on_stop("broken", broken)

    await lc.start([recorder(done, "one", lc), Step("two", with_broken_undo), recorder(done, "three", lc)])
    assert lc.pending == ["three", "broken", "one"]
    with structlog.testing.capture_logs() as logs:
        await lc.stop()
    assert done == ["do:one", "do:three", "undo:three", "undo:one"]
    failed = [e for e in logs if e["event"] == "daemon.shutdown_step_failed"]
    assert [(e["step"], e["started_by"]) for e in failed] == [("broken", "two")]


async def test_a_config_error_is_logged_without_a_traceback() -> None:
    lc = Lifecycle()

    async def bad() -> None:
        raise ConfigError("bridge.toml: outbound.x.rate: not a rate")

    with structlog.testing.capture_logs() as logs, pytest.raises(ConfigError):
        await lc.start([Step("validate_config", bad)])
    assert [(e["event"], e["step"], e["error"]) for e in logs] == [
        ("daemon.step_failed", "validate_config", "bridge.toml: outbound.x.rate: not a rate")
    ]
    assert "exc_info" not in logs[0]


async def test_an_adapter_failing_to_start_undoes_the_earlier_adapters_and_redis(
    recording: Registry, write_config: Any, redis: Any
) -> None:
    RecordingSink.fail_start = "b"
    d = Daemon(write_config(TWO_SINKS), recording)
    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError, match="b cannot start"):
        await d.start()
    assert events == ["start:a", "start:b", "close:a"]  # b never started: nothing of it to undo
    assert [e["step"] for e in logs if e["event"] == "daemon.step_failed"] == ["adapters"]
    assert d.lifecycle.pending == []
    assert d.app_runner is None and not d.supervisor.tasks  # later steps never ran
    assert [e["what"] for e in logs if e["event"] == "daemon.undo"] == ["adapter:a", "redis"]
    await d.stop()  # what a caller does after a failed start: harmless
    assert events == ["start:a", "start:b", "close:a"]


async def test_the_steps_undo_in_the_order_of_the_old_shutdown_list(
    recording: Registry, write_config: Any, start_daemon: Any
) -> None:
    d = await start_daemon(write_config(TWO_SINKS))
    assert [s.name for s in d.steps()][:3] == ["validate_config", "data_dir", "redis"]
    pending = [p for p in d.lifecycle.pending if p != "unfreeze_gc"]
    assert pending == [
        "stop_accepting", "http_server", "accept_guard", "heartbeat", "workers", "http_client",
        "adapter:hook", "adapter:b", "adapter:a", "redis",
    ]  # fmt: skip
    await d.stop()
    assert events == ["start:a", "start:b", "close:b", "close:a"]
    assert d.lifecycle.pending == []


async def test_a_crashed_task_is_logged_with_its_name_and_count() -> None:
    sup = Supervisor()

    async def crash() -> None:
        raise ValueError("bad frame")

    with structlog.testing.capture_logs() as logs:
        sup.spawn("source:feed", crash, restart=False)
        await wait_for(lambda: sup.crashes.get("source:feed") == 1)
        await sup.stop(1.0)
    crashed = [e for e in logs if e["event"] == "task.crashed"]
    assert crashed and crashed[0]["task"] == "source:feed" and crashed[0]["crashes"] == 1
    assert "source:feed" in sup.tasks  # the supervisor keeps its reference


class FakeStatus:
    """A status that is not a daemon: the web app asks nothing more of it."""

    instance = "probe"

    async def readiness(self) -> dict[str, str]:
        return {"feed": "token rejected"}

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.metrics.delivered.labels("s").inc(2)

    async def exposition(self) -> bytes:
        return self.metrics.render()


async def test_the_web_app_needs_only_the_status_interface() -> None:
    from aiohttp import web

    status = FakeStatus()
    runner = web.AppRunner(build_app(status, max_body=1024))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
                assert await r.json() == {
                    "ready": False,
                    "instance": "probe",
                    "not_ready": {"feed": "token rejected"},
                }
            async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert await r.json() == {"status": "alive"}  # no instance (host) name: issue 11
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=")
                assert 'wechat_bridge_delivered_total{sink="s"} 2.0' in (await r.text()).splitlines()
    finally:
        await runner.cleanup()


async def test_the_daemon_reports_its_counters(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(TWO_SINKS.replace('"recording"', '"collect"')))
    c = d.counters()
    assert c.sent == {"a": 0, "b": 0} and c.dead == {"a": 0, "b": 0} and c.routed == 0
    CollectSink.instances["a"].script.append(PermanentError("no such user"))
    assert d.bus is not None
    await d.bus.publish(make_envelope("hook", Conversation("g1"), "x"))
    await wait_for(lambda: d.counters().dead["a"] == 1 and d.counters().routed == 1)


async def test_gc_freeze_is_a_step_that_can_be_turned_off(
    write_config: Any, start_daemon: Any, monkeypatch: Any
) -> None:
    d = await start_daemon(write_config(TWO_SINKS.replace('"recording"', '"collect"')))
    assert d.lifecycle.pending[0] == "unfreeze_gc" and gc.get_freeze_count() > 0
    await d.stop()
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv("WECHAT_BRIDGE_GC_FREEZE", "0")
    d = await start_daemon(write_config(TWO_SINKS.replace('"recording"', '"collect"'), name="b.toml"))
    assert "unfreeze_gc" not in d.lifecycle.pending and gc.get_freeze_count() == 0


def test_run_loop_picks_the_loop_the_environment_asks_for(monkeypatch: Any) -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    monkeypatch.setenv("WECHAT_BRIDGE_LOOP", "asyncio")
    assert run_loop(loop_module()) == "asyncio"
    monkeypatch.setenv("WECHAT_BRIDGE_LOOP", "tokio")
    coro = loop_module()
    with pytest.raises(ValueError, match="WECHAT_BRIDGE_LOOP='tokio'"):
        run_loop(coro)
    coro.close()
    try:
        import uvloop  # noqa: F401
    except ImportError:
        monkeypatch.setenv("WECHAT_BRIDGE_LOOP", "uvloop")
        coro = loop_module()
        with pytest.raises(ImportError):
            run_loop(coro)
        coro.close()
    else:
        for choice in ("uvloop", "auto"):
            monkeypatch.setenv("WECHAT_BRIDGE_LOOP", choice)
            assert run_loop(loop_module()) == "uvloop"
