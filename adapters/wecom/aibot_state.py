"""The AI bot's per-message state: one Redis hash the callback writes and the sink reads.

The callback (:mod:`adapters.wecom.aibot`) writes it before it publishes a message; the sink
(:mod:`adapters.wecom.aibot_sink`) reads it to decide where the answer goes: into the stream WeCom
polls, or to the message's ``response_url``. Whichever path takes the final answer claims it once
(``final_by``, HSETNX), so the answer is shown exactly once. Field names live here only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

#: the hash's fields
ARRIVED = "t"  # unix time the message arrived (the first try, kept by retries)
DEADLINE = "deadline"  # unix time the stream window closes ("0": no stream)
RESPONSE_URL = "response_url"  # the message's response_url, when it has one
FINAL_BY = "final_by"  # who delivers the final answer: an :class:`FinalBy`
RESPONSE_URL_USED = "response_url_used"  # "1" once an answer was posted to response_url

#: the ``adapter`` part of the state key (``Context.state_key``)
ADAPTER = "wecom_aibot"
#: how long the per-message state lives, in seconds
TTL = 7200
#: a response_url may be used once within this many seconds of the message
RESPONSE_URL_TTL = 3600


class FinalBy(enum.StrEnum):
    """Which path delivers the final answer."""

    STREAM = "stream"
    RESPONSE_URL = "response_url"


@dataclass(frozen=True)
class Snapshot:
    arrived_at: float
    deadline: float
    response_url: str
    final_by: FinalBy | None
    response_url_used: bool


class StreamState:
    """The state of one message (``key`` from ``ctx.state_key(ADAPTER, envelope_id)``)."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key

    async def remember(self, now: float, deadline: float | None, response_url: str) -> None:
        """Write arrival time, stream deadline and response_url, keeping what a retry wrote first."""
        pipe: Any = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.key, ARRIVED, f"{now:.3f}")
        pipe.hsetnx(self.key, DEADLINE, f"{deadline:.3f}" if deadline is not None else "0")
        if response_url:
            pipe.hsetnx(self.key, RESPONSE_URL, response_url)
        pipe.expire(self.key, TTL)
        await pipe.execute()

    async def read(self) -> Snapshot | None:
        """The whole state, or None when there is none (not ours, or expired)."""
        raw = await self.redis.hgetall(self.key)
        if not raw:
            return None
        return Snapshot(
            arrived_at=_float(raw.get(ARRIVED.encode())),
            deadline=_float(raw.get(DEADLINE.encode())),
            response_url=raw.get(RESPONSE_URL.encode(), b"").decode(),
            final_by=_owner(raw.get(FINAL_BY.encode())),
            response_url_used=raw.get(RESPONSE_URL_USED.encode()) == b"1",
        )

    async def exists(self) -> bool:
        return bool(await self.redis.exists(self.key))

    async def final_by(self) -> FinalBy | None:
        return _owner(await self.redis.hget(self.key, FINAL_BY))

    async def claim_final(self, owner: FinalBy) -> bool:
        """Claim the final answer for ``owner``: True when this call claimed it."""
        return bool(await self.redis.hsetnx(self.key, FINAL_BY, owner.value))

    async def mark_response_url_used(self) -> None:
        await self.redis.hset(self.key, RESPONSE_URL_USED, "1")


def _owner(value: bytes | None) -> FinalBy | None:
    try:
        return FinalBy(value.decode()) if value else None
    except ValueError:
        return None


def _float(value: bytes | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0
