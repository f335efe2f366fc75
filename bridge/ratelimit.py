"""GCRA rate limiting in Redis, shared by every process that uses the same keys.

Each limited resource has a key holding its "theoretical arrival time" (TAT) in ms. A request is
allowed when ``max(TAT, now) + interval - now <= burst * interval``; then TAT moves on by one
interval. With ``burst = 1`` two allowed requests are at least ``interval`` apart, so no window of
``period`` holds more than ``count`` of them. Several keys are checked at once (the sink's own and a
recipient's) and all are charged only if all allow. Time comes from the Redis server (``TIME``), so
clocks of the instances do not matter.

The algorithm is ``lua/gcra.lua`` (a fragment); ``lua/gcra_acquire.lua`` runs it alone (wrapped by
:class:`Limiter`), ``lua/claim_send.lua`` runs it with the runner's claim of a delivery. Which keys
and rates apply to a delivery is decided once, by the runner (``Runner.limits``); a sink that sends a
delivery in several parts charges the further parts through its ``SendContext``, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config import Rate
from bridge.lua import source

GCRA_ACQUIRE = source("gcra_acquire")


@dataclass(frozen=True, slots=True)
class Limit:
    key: str
    rate: Rate
    burst: int = 1


def limit_args(limits: Sequence[Limit]) -> list[float | int]:
    """The (interval ms, burst) ARGV pairs gcra.lua reads, one pair per limit, in order."""
    args: list[float | int] = []
    for lim in limits:
        args += [lim.rate.interval * 1000.0, lim.burst]
    return args


class Limiter:
    """Take one token from every limit at once, or learn how long to wait (``gcra_acquire.lua``)."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(GCRA_ACQUIRE)

    async def acquire(self, limits: Sequence[Limit]) -> float:
        """0.0 when allowed (all limits charged), else the seconds to wait before asking again."""
        if not limits:
            return 0.0
        res = await self._script(keys=[lim.key for lim in limits], args=limit_args(limits))
        return float(res) / 1000.0
