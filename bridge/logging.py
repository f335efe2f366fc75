"""structlog set-up: stable event names, key-values, JSON off a tty, secrets masked."""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

from bridge.config import SECRET_KEYS, Secret

_URL_CRED = re.compile(r"(://)[^/@\s]*@")
_QUERY_SECRET = re.compile(r"((?:access_token|key|corpsecret|secret|token)=)[^&\s\"']+", re.IGNORECASE)


def scrub(text: str) -> str:
    """Remove credentials that ride in URLs (``user:pass@``, ``?access_token=``, ``?key=``)."""
    return _QUERY_SECRET.sub(r"\1***", _URL_CRED.sub(r"\1***@", text))


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
            if "://" in v or "=" in v:
                changes[k] = scrub(v)
        elif isinstance(v, Secret):
            changes[k] = "***"
        elif isinstance(v, bytes | bytearray):
            changes[k] = repr(v)
    if changes:
        event.update(changes)
    return event


_LEVELS = {"warn": "warning", "exception": "error"}
_second = [-1, ""]


def _stamp(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``level`` and ``timestamp`` (ISO 8601, UTC, microseconds), as structlog's add_log_level and
    TimeStamper(fmt="iso", utc=True) write them, at a fifth of their cost (one strftime a second)."""
    event["level"] = _LEVELS.get(method, method)
    now = time.time()
    sec = int(now)
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    event["timestamp"] = f"{_second[1]}.{int((now - sec) * 1e6):06d}Z"
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


_STDERR = _Stderr()
#: write out what is buffered (the daemon calls it when it stops; it also runs at exit)
flush = _STDERR.flush
atexit.register(flush)


_json = msgspec.json.Encoder(enc_hook=repr)


def _dumps(obj: Any, **_: Any) -> str:
    """JSON lines with msgspec (a third of the stdlib's cost); what it cannot encode, as its repr."""
    return _json.encode(obj).decode()


_level = logging.INFO


def debug_enabled() -> bool:
    """Whether debug lines are written: hot paths skip building them when not."""
    return _level <= logging.DEBUG


def setup(level: str = "info", fmt: str = "auto") -> None:
    global _level
    _level = logging.getLevelNamesMapping()[level.upper()]
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _stamp,
            _mask,
            _exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_: _STDERR,
        cache_logger_on_first_use=False,
    )


def get(name: str, **ctx: Any) -> Any:
    """A lazy logger: safe at import time, it takes the configuration in force when it logs."""
    return structlog.get_logger(logger_name=name, **ctx)
