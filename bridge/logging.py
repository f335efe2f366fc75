"""structlog set-up: stable event names, key-values, JSON off a tty, secrets masked.

Two pipelines write the same lines. The **fast** one (the default) stamps the time with one strftime
a second, skips the traceback formatter for lines without one, renders JSON with msgspec and writes
the info lines of one event-loop turn together, in one write. The **reference** one is structlog's
own processors (``add_log_level``, ``TimeStamper``, ``format_exc_info``, ``JSONRenderer``) and a
direct write per line: what the fast one must match (tests/unit/test_logging.py checks that with
generated events), and what ``WECHAT_BRIDGE_LOG=plain`` selects when in doubt. Why the fast one
exists and what it saves: bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import math
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

from bridge.config import Secret
from bridge.redact import SECRET_KEYS, scrub


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    """Whether a log key names a secret (memoized: log keys are a small, fixed set)."""
    return key != "event" and SECRET_KEYS.search(key) is not None


def _mask(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    changes: dict[str, Any] = {}
    for k, v in event.items():
        if _secret_key(k):
            if v is not None and v != "":
                changes[k] = "***"
        elif type(v) is str:
            if "://" in v or "=" in v or ":" in v:
                changes[k] = scrub(v)
        elif isinstance(v, Secret):
            changes[k] = "***"
        elif isinstance(v, bytes | bytearray):
            changes[k] = repr(v)
    if changes:
        event.update(changes)
    return event


_LEVELS = {"warn": "warning", "exception": "error"}
#: the reference stamp: what :func:`_stamp` writes, by structlog's TimeStamper
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_second = [-1, ""]


def _stamp(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``level`` and ``timestamp`` (ISO 8601, UTC, microseconds), as structlog's add_log_level and
    ``TimeStamper(fmt=TIMESTAMP_FORMAT, utc=True)`` write them, with one strftime a second instead of
    one a line. Microseconds are rounded as ``datetime.fromtimestamp`` rounds them (half to even)."""
    event["level"] = _LEVELS.get(method, method)
    frac, whole = math.modf(time.time())
    sec, micros = int(whole), round(frac * 1e6)
    if micros >= 1_000_000:
        sec, micros = sec + 1, micros - 1_000_000
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    event["timestamp"] = f"{_second[1]}.{micros:06d}Z"
    return event


def _exc_info(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog's format_exc_info, skipped (its cost too) for the lines without ``exc_info``."""
    if "exc_info" not in event:
        return event
    return structlog.processors.format_exc_info(logger, method, event)


class _Stderr:
    """Writes lines to whatever ``sys.stderr`` is at the time (tests and supervisors swap it).

    Info and debug lines logged during one turn of the event loop go out together at the end of
    that turn, in one write (under load a publish wakes a few dozen callbacks in the same turn, each
    with its ``wechat.accepted`` line); a warning or an error flushes at once, with what came
    before it. Outside a running loop every line is written at once.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []

    def buffered(self, message: str) -> None:
        lines = self._lines
        lines.append(message)
        if len(lines) > 1:
            return  # a flush is already due at the end of this turn
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)

    def now(self, message: str) -> None:
        self._lines.append(message)
        self.flush()

    def flush(self) -> None:
        lines = self._lines
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        lines.clear()
        f = sys.stderr
        f.write(text)
        f.flush()

    msg = log = debug = info = buffered
    warn = warning = error = err = critical = fatal = exception = failure = now


class _DirectStderr:
    """The reference writer: every line written to ``sys.stderr`` at once, on its own."""

    def now(self, message: str) -> None:
        f = sys.stderr
        f.write(message + "\n")
        f.flush()

    msg = log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = now


_STDERR = _Stderr()
_DIRECT = _DirectStderr()
#: write out what is buffered (the daemon calls it when it stops; it also runs at exit)
flush = _STDERR.flush
atexit.register(flush)


_json = msgspec.json.Encoder(enc_hook=repr)


def _dumps(obj: Any, **_: Any) -> str:
    """JSON lines with msgspec; what it cannot encode, as its repr. It differs from the stdlib's
    ``json.dumps`` (the reference) in spacing only, except where the stdlib writes no JSON at all
    (NaN and infinities: msgspec writes ``null``) or a repr (sets: msgspec writes a list)."""
    return _json.encode(obj).decode()


_level = logging.INFO


def debug_enabled() -> bool:
    """Whether debug lines are written: hot paths skip building them when not."""
    return _level <= logging.DEBUG


def processors(fmt: str, *, plain: bool = False) -> list[Any]:
    """The processor chain for ``fmt`` (``console`` or ``json``): the fast one, or with ``plain``
    structlog's own processors doing the same."""
    if plain:
        return [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt=TIMESTAMP_FORMAT, utc=True),
            _mask,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False)
            if fmt == "console"
            else structlog.processors.JSONRenderer(),
        ]
    return [
        structlog.contextvars.merge_contextvars,
        _stamp,
        _mask,
        _exc_info,
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps),
    ]


def setup(level: str = "info", fmt: str = "auto", *, plain: bool | None = None) -> None:
    """Configure structlog. ``plain`` (default: ``WECHAT_BRIDGE_LOG=plain`` in the environment)
    selects the reference pipeline: structlog's processors, one write per line."""
    global _level
    _level = logging.getLevelNamesMapping()[level.upper()]
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if plain is None:
        plain = os.environ.get("WECHAT_BRIDGE_LOG", "").strip().lower() == "plain"
    flush()
    writer: Any = _DIRECT if plain else _STDERR
    structlog.configure(
        processors=processors(fmt, plain=plain),
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )


def get(name: str, **ctx: Any) -> Any:
    """A lazy logger: safe at import time, it takes the configuration in force when it logs."""
    return structlog.get_logger(logger_name=name, **ctx)
