"""Refused requests: counted always, logged at most once per interval per (event, source, reason).

An attacker can make the daemon refuse thousands of requests a second; one log line each would let
them fill the disk and drown the lines that matter. :func:`note` counts every refusal (shown on
/metrics as ``wechat_bridge_refused_total``) and writes the first of each kind, then one line per
:data:`INTERVAL` carrying ``suppressed``: how many of that kind went unlogged since the last line.
"""

from __future__ import annotations

import time
from typing import Any

#: seconds between two log lines of the same kind
INTERVAL = 10.0

_counts: dict[tuple[str, str, str], int] = {}
_last: dict[tuple[str, str, str], tuple[float, int]] = {}  # kind → (when logged, count then)
#: kinds kept at most; past it, new kinds share one bucket (a reason is fixed text, so rarely hit)
_MAX_KINDS = 1024


def note(log: Any, event: str, source: str, reason: str, **fields: Any) -> bool:
    """Count one refusal; log it (``log.warning(event, ...)``) unless one of its kind was logged less
    than :data:`INTERVAL` ago. Returns whether a line was written."""
    kind = (event, source, reason)
    if kind not in _counts and len(_counts) >= _MAX_KINDS:
        kind = (event, source, "other")
    n = _counts.get(kind, 0) + 1
    _counts[kind] = n
    now = time.monotonic()
    last = _last.get(kind)
    if last is not None and now - last[0] < INTERVAL:
        return False
    suppressed = n - 1 - (last[1] if last is not None else 0)
    _last[kind] = (now, n)
    log.warning(event, source=source, reason=reason, suppressed=suppressed, **fields)
    return True


def counts() -> dict[tuple[str, str, str], int]:
    """(event, source, reason) → refusals since start."""
    return dict(_counts)


def reset() -> None:
    """Forget every count (tests)."""
    _counts.clear()
    _last.clear()


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render() -> str:
    """The counts in Prometheus' text format (empty when nothing was refused)."""
    if not _counts:
        return ""
    lines = ["# TYPE wechat_bridge_refused_total counter"]
    for (event, source, reason), n in sorted(_counts.items()):
        lines.append(
            f'wechat_bridge_refused_total{{event="{_label(event)}",source="{_label(source)}",'
            f'reason="{_label(reason)}"}} {n}'
        )
    return "\n".join(lines) + "\n"
