"""GCRA rate limiting in Redis, shared by every process that uses the same keys.

Each limited resource has a key holding its "theoretical arrival time" (TAT) in ms. A request is
allowed when ``max(TAT, now) + interval - now <= burst * interval``; then TAT moves on by one
interval. With ``burst = 1`` two allowed requests are at least ``interval`` apart, so no window of
``period`` holds more than ``count`` of them. Several keys are checked at once (the sink's own and a
recipient's) and all are charged only if all allow. Time comes from the Redis server (``TIME``), so
clocks of the instances do not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from bridge.config import Rate

# ARGV from ``base`` on: (interval_ms, burst) per key in KEYS from ``kbase`` on. Sets ``wait`` (ms).
GCRA_SNIPPET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local wait = 0
local tats = {}
for i = kbase, #KEYS do
  local j = base + (i - kbase) * 2
  local interval = tonumber(ARGV[j])
  local burst = tonumber(ARGV[j + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local over = new_tat - now - burst * interval
  if over > wait then wait = over end
  tats[i] = new_tat
end
if wait <= 0 then
  for i = kbase, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1)
  end
end
"""

_ACQUIRE = (
    "local kbase = 1\nlocal base = 1\n"
    + GCRA_SNIPPET
    + "if wait > 0 then return tostring(wait) end\nreturn '0'\n"
)


@dataclass(frozen=True)
class Limit:
    key: str
    rate: Rate
    burst: int = 1

    def args(self) -> list[float | int]:
        return [self.rate.interval * 1000.0, self.burst]


class Limiter:
    """Take one token from every limit at once, or learn how long to wait."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_ACQUIRE)

    async def acquire(self, limits: Sequence[Limit]) -> float:
        """0.0 when allowed (all limits charged), else the seconds to wait before asking again."""
        if not limits:
            return 0.0
        args: list[float | int] = []
        for lim in limits:
            args.extend(lim.args())
        res = await self._script(keys=[lim.key for lim in limits], args=args)
        return float(res) / 1000.0
