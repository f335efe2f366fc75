"""Shared fixtures: a real Redis (never fakeredis), unique key prefixes, a daemon in-process.

The Redis comes from ``WB_TEST_REDIS_URL`` (set by scripts/test.sh), else redis://127.0.0.1:6379/9
(database 9: the benchmarks use 0).
Each test gets its own key prefix, so tests never see each other's keys and leave none behind.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge import logging as blog
from bridge import refusals
from bridge.adapter import Registry, SendContext, Sink
from bridge.config import Config, load
from bridge.daemon import Daemon
from bridge.envelope import Delivery
from bridge.errors import PermanentError, RetryableError

REDIS_URL = os.environ.get("WB_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

blog.setup("debug", "console")


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(autouse=True)
def _fresh_refusal_counts() -> None:
    """Each test starts with no refusal counted or logged (bridge/refusals.py keeps them per process)."""
    refusals.reset()


@pytest.fixture
def prefix() -> str:
    return f"wbt-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class CollectSink(Sink):
    """A test sink: records what it sent; ``script`` holds errors to raise on the next sends."""

    instances: dict[str, CollectSink] = {}

    def __init__(self, name: str, options: Any, ctx: Any) -> None:
        super().__init__(name, options, ctx)
        self.sent: list[Delivery] = []
        self.attempts: list[float] = []
        self.script: list[Exception] = []
        self.delay = 0.0
        self.reply_text: str | None = None
        CollectSink.instances[name] = self

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        self.attempts.append(asyncio.get_running_loop().time())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            raise self.script.pop(0)
        self.sent.append(delivery)
        if self.reply_text is not None:
            await ctx.reply(self.reply_text.format(text=delivery.envelope.text))
        return f"c{len(self.sent)}"


__all__ = ["CollectSink", "PermanentError", "RetryableError"]


@pytest.fixture
def registry() -> Registry:
    reg = Registry.from_module("adapters")
    reg.sinks["collect"] = CollectSink
    return reg


@pytest.fixture
def write_config(tmp_path: Path, prefix: str) -> Callable[..., Config]:
    """Write a config with the test Redis, prefix and a free port, then load it."""

    def make(
        body: str, *, redis: bool = True, name: str = "bridge.toml", env: dict[str, str] | None = None
    ) -> Config:
        head = f'[bridge]\ninstance = "t1"\ndata_dir = "{tmp_path / "var"}"\nlog_format = "console"\nshutdown_timeout = 5\n'
        if redis:
            head += f'[redis]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n'
        head += '[http]\nlisten = "127.0.0.1:0"\n'
        p = tmp_path / name
        p.write_text(head + textwrap.dedent(body))
        return load(p, env=env if env is not None else dict(os.environ))

    return make


@pytest.fixture
async def start_daemon(
    registry: Registry, redis: Any
) -> AsyncIterator[Callable[[Config], Awaitable[Daemon]]]:
    """Start daemons; stop them at the end — before ``redis`` (set up first, torn down last) deletes
    the test's keys, so nothing a daemon writes while stopping is left behind."""
    started: list[Daemon] = []

    async def start(cfg: Config) -> Daemon:
        d = Daemon(cfg, registry)
        started.append(d)
        await d.start()
        return d

    yield start
    for d in reversed(started):
        await d.stop()


async def wait_for(pred: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> None:
    """Poll until ``pred()`` (sync or async) is truthy; fail with a clear message after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)
