"""The fast log pipeline writes what the reference one (structlog's own processors, a direct write
per line) writes, for generated events; and the structlog behaviour it leans on is pinned."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import sys
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import logging as blog
from bridge.config import Secret


class _FrozenDatetime(datetime.datetime):
    at = 0.0

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> Any:
        return datetime.datetime.fromtimestamp(cls.at, tz)


@contextlib.contextmanager
def frozen(at: float) -> Iterator[None]:
    """Both pipelines' clocks at ``at``: ours reads time.time(), structlog's TimeStamper
    datetime.datetime.now (looked up in its module at each call)."""
    _FrozenDatetime.at = at
    fake = types.SimpleNamespace(datetime=_FrozenDatetime, timezone=datetime.timezone)
    with mock.patch("time.time", return_value=at), mock.patch.object(structlog.processors, "datetime", fake):
        blog._second[0] = -1  # no stamp cached from another instant
        yield


def render(chain: list[Any], method: str, event: dict[str, Any]) -> Any:
    out: Any = dict(event)
    for processor in chain:
        out = processor(None, method, out)
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["user", "conversation", "count", "url", "token", "corpsecret", "reason", "n", "path"])
values = (
    json_values
    | st.sampled_from(["https://u:p@host/x?access_token=abc&x=1", "a=b", "plain"])
    | st.binary(max_size=8)
    | st.builds(Secret, st.text(max_size=8))
)
events = st.fixed_dictionaries(
    {"event": st.sampled_from(["wechat.accepted", "runner.sent", "task.crashed", "ü.事件"])},
    optional={"logger_name": st.sampled_from(["daemon", "web"])},
).flatmap(lambda base: st.dictionaries(keys, values, max_size=5).map(lambda kv: {**kv, **base}))
methods = st.sampled_from(["debug", "info", "warning", "warn", "error", "critical", "exception"])
instants = st.floats(min_value=86_400, max_value=4_102_444_800, allow_nan=False)  # 1970-01-02 … 2100


@settings(max_examples=300, deadline=None)
@given(event=events, method=methods, at=instants)
def test_json_lines_match_structlog_own_rendering(event: dict[str, Any], method: str, at: float) -> None:
    with frozen(at):
        fast = render(blog.processors("json"), method, event)
        plain = render(blog.processors("json", plain=True), method, event)
    assert json.loads(fast) == json.loads(plain)
    assert list(json.loads(fast)) == list(json.loads(plain))  # same keys in the same order


@settings(max_examples=200, deadline=None)
@given(event=events, method=methods, at=instants)
def test_console_lines_match_structlog_own_rendering(event: dict[str, Any], method: str, at: float) -> None:
    with frozen(at):
        assert render(blog.processors("console"), method, event) == render(
            blog.processors("console", plain=True), method, event
        )


def test_a_traceback_renders_the_same() -> None:
    try:
        raise ValueError("bad frame")
    except ValueError:
        event = {"event": "task.crashed", "task": "router", "exc_info": True}
        with frozen(1_800_000_000.25):
            fast = json.loads(render(blog.processors("json"), "error", dict(event)))
            plain = json.loads(render(blog.processors("json", plain=True), "error", dict(event)))
    assert fast == plain and "ValueError: bad frame" in fast["exception"]


def test_the_stamp_rounds_microseconds_as_datetime_does() -> None:
    for at in (1_800_000_000.0000005, 1_800_000_000.9999996, 1_800_000_000.0000015):
        with frozen(at):
            stamp = render([blog._stamp], "info", {"event": "x"})["timestamp"]
        assert stamp == datetime.datetime.fromtimestamp(at, datetime.UTC).strftime(blog.TIMESTAMP_FORMAT)


ops = st.lists(
    st.tuples(
        st.sampled_from(["info", "debug", "msg", "warning", "error", "critical", "turn"]), st.text(max_size=5)
    ),
    max_size=30,
)


def written(writer: Any, script: list[tuple[str, str]]) -> str:
    """What ``writer`` puts on stderr for ``script`` inside a running loop ("turn": the loop turns)."""
    out = io.StringIO()

    async def main() -> None:
        for method, text in script:
            if method == "turn":
                await asyncio.sleep(0)
            else:
                getattr(writer, method)(text)

    with mock.patch.object(sys, "stderr", out):
        asyncio.run(main())
        blog.flush()
    return out.getvalue()


@settings(max_examples=100, deadline=None)
@given(script=ops)
def test_batched_writes_put_out_the_same_text_as_direct_writes(script: list[tuple[str, str]]) -> None:
    assert written(blog._STDERR, script) == written(blog._DIRECT, script)


# -- what the fast pipeline leans on in structlog: pinned, so an upgrade that changes it fails here ----


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *_a, **_k: self.calls.append(name)


def test_structlog_calls_the_writer_method_our_batching_expects() -> None:
    """The writer batches by the method name structlog calls on it: info-like lines wait for the end
    of the loop turn, the rest are written at once. Pin the names structlog uses for each level."""
    rec = Recorder()
    log = structlog.wrap_logger(
        rec, processors=[lambda _l, _m, e: e["event"]], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    for method in ("debug", "info", "msg", "warning", "warn", "error", "exception", "critical"):
        getattr(log, method)(method)
    assert rec.calls == ["debug", "info", "info", "warning", "warning", "error", "error", "critical"]
    buffered = blog._Stderr.buffered
    for name in ("debug", "info", "msg"):
        assert getattr(blog._Stderr, name) is buffered
    for name in ("warning", "error", "critical"):
        assert getattr(blog._Stderr, name) is blog._Stderr.now


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    blog.setup("debug", "console")  # as tests/conftest.py sets it


async def test_info_waits_for_the_turn_and_a_warning_takes_it_along(
    restore_logging: None, capsys: Any
) -> None:
    blog.setup("debug", "json", plain=False)
    log = blog.get("t")
    log.info("first.line")
    assert capsys.readouterr().err == ""  # buffered until the loop turns
    log.warning("second.line")
    assert [json.loads(x)["event"] for x in capsys.readouterr().err.splitlines()] == [
        "first.line",
        "second.line",
    ]
    log.info("third.line")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert json.loads(capsys.readouterr().err)["event"] == "third.line"


async def test_the_plain_pipeline_writes_each_line_at_once(
    restore_logging: None, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("WECHAT_BRIDGE_LOG", "plain")
    blog.setup("debug", "json")
    blog.get("t").info("one.line", token="s3cret")
    line = json.loads(capsys.readouterr().err)
    assert line["event"] == "one.line" and line["token"] == "***" and line["level"] == "info"
