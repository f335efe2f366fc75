"""bridge.held against real Redis: two (or three) HeldConnection objects share one named connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bridge.bus import Keys
from bridge.errors import PermanentError, RetryableError
from bridge.held import HeldConnection
from bridge.lua import source


class Recorder:
    """A handler that records who ran what; ``block`` makes it hang (a holder stuck mid-request)."""

    def __init__(self, who: str, runs: list[tuple[str, str, dict[str, Any]]]) -> None:
        self.who = who
        self.runs = runs
        self.block: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.started.set()
        if self.block is not None:
            await self.block.wait()
        self.runs.append((self.who, op, payload))
        if op == "perm":
            raise PermanentError("refused: bad chat id")
        if op == "retry":
            raise RetryableError("busy", retry_after=2.5)
        if op == "crash":
            raise KeyError("bug")
        return {"by": self.who, "echo": payload.get("n")}


class Node:
    def __init__(self, redis: Any, prefix: str, who: str, runs: list[Any], ttl: float = 1.5) -> None:
        self.handler = Recorder(who, runs)
        self.conn = HeldConnection(
            redis, Keys(prefix), "bot", who, ttl=ttl, handler=self.handler, retry=0.05, poll=0.1
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Node:
        self.task = asyncio.create_task(self.conn.run(self.stop))
        return self

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def kill(self) -> None:
        """Die like kill -9: no release, nothing finished."""

        async def vanish() -> bool:
            return False

        self.conn.lease.release = vanish  # type: ignore[method-assign]
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for t in list(self.conn._tasks):
            t.cancel()
        await asyncio.gather(*self.conn._tasks, return_exceptions=True)


@pytest.fixture
async def nodes(redis: Any, prefix: str) -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    yield made
    for n in made:
        await n.close()


async def two(redis: Any, prefix: str, nodes: list[Node], runs: list[Any]) -> tuple[Node, Node]:
    a = Node(redis, prefix, "a", runs).start()
    nodes.append(a)
    await asyncio.wait_for(a.conn.wait_held(), 3)
    b = Node(redis, prefix, "b", runs).start()
    nodes.append(b)
    return a, b


async def test_local_call_runs_in_the_holder(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    assert a.conn.held and not b.conn.held
    assert await a.conn.call("send", {"n": 1}, request_id="d1", timeout=2) == {"by": "a", "echo": 1}
    assert runs == [("a", "send", {"n": 1})]
    assert await redis.llen(a.conn.request_key) == 0  # nothing went through the list


async def test_relayed_call_runs_in_the_holder(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    assert await b.conn.call("send", {"n": 2}, request_id="d2", timeout=3) == {"by": "a", "echo": 2}
    assert runs == [("a", "send", {"n": 2})]
    assert await redis.exists(a.conn.done_key("d2")) == 1
    assert 0 < await redis.pttl(a.conn.done_key("d2")) <= 86_400_000


async def test_duplicate_request_id_runs_once(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    first = await b.conn.call("send", {"n": 3}, request_id="d3", timeout=3)
    again_b = await b.conn.call("send", {"n": 3}, request_id="d3", timeout=3)
    again_a = await a.conn.call("send", {"n": 3}, request_id="d3", timeout=3)
    assert first == again_b == again_a == {"by": "a", "echo": 3}
    assert len(runs) == 1
    # concurrent duplicates (a retry racing its first attempt) in the holder: still one run
    a.handler.block = asyncio.Event()
    calls = [asyncio.create_task(b.conn.call("send", {"n": 4}, request_id="d4", timeout=3)) for _ in range(3)]
    calls.append(asyncio.create_task(a.conn.call("send", {"n": 4}, request_id="d4", timeout=3)))
    await asyncio.sleep(0.3)
    a.handler.block.set()
    results = await asyncio.gather(*calls)
    assert all(r == {"by": "a", "echo": 4} for r in results)
    assert [r for r in runs if r[2] == {"n": 4}] == [("a", "send", {"n": 4})]


async def test_typed_errors_cross_the_relay(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    with pytest.raises(PermanentError, match="bad chat id"):
        await b.conn.call("perm", {}, request_id="p1", timeout=3)
    with pytest.raises(PermanentError, match="bad chat id"):  # recorded: not run again
        await b.conn.call("perm", {}, request_id="p1", timeout=3)
    assert len(runs) == 1
    with pytest.raises(RetryableError, match="busy") as info:
        await b.conn.call("retry", {}, request_id="r1", timeout=3)
    assert info.value.retry_after == 2.5
    with pytest.raises(RetryableError, match="busy"):  # not recorded: a retry runs again
        await b.conn.call("retry", {}, request_id="r1", timeout=3)
    assert len(runs) == 3
    assert await redis.exists(a.conn.done_key("r1")) == 0
    with pytest.raises(RetryableError, match="crash failed: KeyError"):
        await b.conn.call("crash", {}, request_id="c1", timeout=3)
    with pytest.raises(PermanentError):  # the same errors locally
        await a.conn.call("perm", {}, request_id="p2", timeout=3)


async def test_no_holder_means_retryable(redis: Any, prefix: str) -> None:
    runs: list[Any] = []
    lone = Node(redis, prefix, "b", runs)  # never started: nobody holds the connection
    with pytest.raises(RetryableError, match="no answer"):
        await lone.conn.call("send", {"n": 5}, request_id="d5", timeout=0.3)
    assert runs == []


async def test_holder_dies_mid_request(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    a.handler.block = asyncio.Event()  # a pops the request and hangs in it
    first = asyncio.create_task(b.conn.call("send", {"n": 6}, request_id="d6", timeout=0.5))
    await asyncio.wait_for(a.handler.started.wait(), 3)
    await a.kill()  # a dies before it recorded or answered anything
    with pytest.raises(RetryableError, match="no answer"):
        await first
    await asyncio.wait_for(b.conn.wait_held(), 3)  # b takes over within ttl + retry
    # the runner retries with the same id: the new holder runs it (locally now), exactly once
    assert await b.conn.call("send", {"n": 6}, request_id="d6", timeout=2) == {"by": "b", "echo": 6}
    assert runs == [("b", "send", {"n": 6})]


async def test_takeover_serves_queued_requests_of_a_third(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    a, b = await two(redis, prefix, nodes, runs)
    c = Node(redis, prefix, "c", runs).start()
    nodes.append(c)
    await asyncio.sleep(0.3)
    assert sum(n.conn.held for n in (a, b, c)) == 1
    await a.kill()
    # c's request, made while nobody holds the connection, is served by whoever takes over
    got = await c.conn.call("send", {"n": 7}, request_id="d7", timeout=5)
    assert got["by"] in ("b", "c") and got["echo"] == 7
    assert len(runs) == 1
    await asyncio.sleep(0.3)
    assert sum(n.conn.held for n in (b, c)) == 1


async def test_expired_requests_are_dropped_unrun(redis: Any, prefix: str, nodes: list[Node]) -> None:
    runs: list[Any] = []
    b = Node(redis, prefix, "b", runs)
    with pytest.raises(RetryableError):
        await b.conn.call("send", {"n": 8}, request_id="d8", timeout=0.1)  # queued, nobody serves
    a = Node(redis, prefix, "a", runs).start()
    nodes.append(a)
    await asyncio.wait_for(a.conn.wait_held(), 3)
    await asyncio.sleep(0.3)
    assert await redis.llen(a.conn.request_key) == 0
    assert runs == []  # its requester had given up; its retry will run it


async def test_lost_lease_pushes_a_popped_request_back(redis: Any, prefix: str) -> None:
    runs: list[Any] = []
    a = Node(redis, prefix, "a", runs)
    assert await a.conn.lease.acquire()
    entry = msgspec.json.encode({"id": "x", "op": "send", "payload": {}, "ans": "k", "deadline": 9e9})
    await redis.rpush(a.conn.request_key, entry)
    stop = asyncio.Event()
    original = redis.blpop

    async def blpop(*args: Any, **kw: Any) -> Any:  # the lease is lost right after the pop
        got = await original(*args, **kw)
        a.conn.lease._valid_until = 0.0
        stop.set()
        return got

    a.conn.redis = _Proxy(redis, blpop=blpop)
    await asyncio.wait_for(a.conn._serve(stop), 3)
    assert runs == []
    assert await redis.lrange(a.conn.request_key, 0, -1) == [entry]


class _Proxy:
    def __init__(self, inner: Any, **over: Any) -> None:
        self._inner = inner
        self._over = over

    def __getattr__(self, name: str) -> Any:
        return self._over.get(name) or getattr(self._inner, name)


async def test_scripts_directly(redis: Any, prefix: str) -> None:
    req, done, ans = f"{prefix}:{{held:x}}:req", f"{prefix}:{{held:x}}:done:1", f"{prefix}:{{held:x}}:ans:1"
    request = redis.register_script(source("held_request"))
    finish = redis.register_script(source("held_finish"))
    assert await request(keys=[req, done], args=["e1", 60_000]) is None
    assert await redis.lrange(req, 0, -1) == [b"e1"]
    assert 0 < await redis.pttl(req) <= 60_000
    # a retryable answer is pushed, not recorded
    assert await finish(keys=[done, ans], args=["r", 0, 5000]) == b"r"
    assert await redis.exists(done) == 0
    # a final answer is recorded first, then pushed; a later different answer does not replace it
    assert await finish(keys=[done, ans], args=["ok1", 60_000, 5000]) == b"ok1"
    assert await finish(keys=[done, ans], args=["ok2", 60_000, 5000]) == b"ok1"
    assert await redis.get(done) == b"ok1"
    assert await redis.lrange(ans, 0, -1) == [b"ok1"]
    assert 0 < await redis.pttl(ans) <= 5000
    # a request whose id ran is answered from the record and not queued
    assert await request(keys=[req, done], args=["e2", 60_000]) == b"ok1"
    assert await redis.lrange(req, 0, -1) == [b"e1"]


def test_bad_arguments() -> None:
    async def h(op: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {}

    with pytest.raises(ValueError, match="done_ttl"):
        HeldConnection(_NoRedis(), Keys("x"), "n", "o", ttl=1, handler=h, done_ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        HeldConnection(_NoRedis(), Keys("x"), "n", "o", ttl=0.1, handler=h)


class _NoRedis:
    def register_script(self, text: str) -> Any:
        return None
