"""structlog set-up: stable event names, key-values, JSON off a tty, secrets masked."""

from __future__ import annotations

import functools
import logging
import re
import sys
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
    for k, v in list(event.items()):
        if isinstance(v, Secret) or (_secret_key(k) and v not in (None, "")):
            event[k] = "***"
        elif isinstance(v, str) and ("://" in v or "=" in v):
            event[k] = scrub(v)
        elif isinstance(v, bytes | bytearray):
            event[k] = repr(v)
    return event


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
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # resolve sys.stderr when logging, not at set-up (tests and supervisors swap it)
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str, **ctx: Any) -> Any:
    """A lazy logger: safe at import time, it takes the configuration in force when it logs."""
    return structlog.get_logger(logger_name=name, **ctx)
