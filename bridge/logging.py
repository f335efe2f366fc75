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
import re
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


#: what a log line must not carry raw: C0 controls (newline and tab included: a value must not start
#: a new line), DEL, C1 controls (U+0085 among them), U+2028 and U+2029
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: str) -> str:
    """``text`` with every control character and line separator written as ``\\xNN`` /
    ``\\uNNNN``: an attacker's string cannot move the operator's cursor, ring their terminal, change
    its title (OSC) or start a forged line — in the console format or the JSON one."""
    return _CONTROLS.sub(_escape_char, text) if _CONTROLS.search(text) is not None else text


_TRACEBACK_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every string value through :func:`escape` (a traceback keeps its newlines and tabs)."""
    changes: dict[str, str] = {}
    for k, v in event.items():
        if type(v) is str and _CONTROLS.search(v) is not None:
            if k == "exception":
                changes[k] = _TRACEBACK_CONTROLS.sub(_escape_char, v)
            else:
                changes[k] = _CONTROLS.sub(_escape_char, v)
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
            _escape,
            structlog.dev.ConsoleRenderer(colors=False)
            if fmt == "console"
            else structlog.processors.JSONRenderer(),
        ]
    return [
        structlog.contextvars.merge_contextvars,
        _stamp,
        _mask,
        _exc_info,
        _escape,
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
    _route_stdlib(_level)


class _FromStdlib(logging.Handler):
    """The standard library's log records (aiohttp's, asyncio's, any library's) as structlog lines:
    event ``log.stdlib`` with ``logger_name`` and ``message``, in the configured format, masked and
    escaped like every other line. The same record (logger and message template) is written at most
    once per :data:`STDLIB_INTERVAL` seconds; the next line says how many were ``suppressed``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = (record.name, str(record.msg))
            now = time.monotonic()
            last, suppressed = self._last.get(key, (-math.inf, 0))
            if now - last < STDLIB_INTERVAL:
                if len(self._last) < 4096 or key in self._last:
                    self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
            fields: dict[str, Any] = {"message": record.getMessage()}
            if suppressed:
                fields["suppressed"] = suppressed
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            method = record.levelname.lower()
            target = structlog.get_logger(logger_name=record.name)
            getattr(
                target, method if method in ("debug", "info", "warning", "error", "critical") else "info"
            )("log.stdlib", **fields)
        except Exception:  # a log line must never break the caller
            self.handleError(record)


#: seconds between two lines of the same standard-library record
STDLIB_INTERVAL = 10.0
_STDLIB = _FromStdlib()


def _route_stdlib(level: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if h is not _STDLIB:
            root.removeHandler(h)
    if _STDLIB not in root.handlers:
        root.addHandler(_STDLIB)
    root.setLevel(max(level, logging.INFO))  # aiohttp's debug chatter stays out unless asked


def get(name: str, **ctx: Any) -> Any:
    """A lazy logger: safe at import time, it takes the configuration in force when it logs."""
    return structlog.get_logger(logger_name=name, **ctx)
