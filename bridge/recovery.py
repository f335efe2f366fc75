"""Crash recovery of a consumer group, for the one consumer that holds the stream's lease.

When an instance takes a stream over (the router's inbound stream, or a partition of a sink's
stream: :mod:`bridge.partitions`), the entries its previous holder read and did not finish are
pending on that holder's consumer name. :meth:`Recovery.take_over` makes them ours before we read
anything new (``lua/take_over.lua``, a page at a time, the cursor kept between pages), so they are
handled first and in stream order: our first read is of our own pending entries, from ``0``.

An entry handed out ``max_deliveries`` times or more is a poison entry (it crashed or stalled every
reader so far): it is copied to the dead-letter stream with the reason, then acked. Consumers that
hold nothing and were idle for a while are forgotten (``lua/drop_consumers.lua``): names of instances
that are gone, e.g. a container that came back under a new name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge import logging as blog
from bridge.bus import Bus, Field
from bridge.lua import source

TAKE_OVER = source("take_over")
DROP_CONSUMERS = source("drop_consumers")
#: pending entries looked at per call of take_over.lua
PAGE = 200


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@dataclass(frozen=True, slots=True)
class TakeOver:
    """What a take-over did: entries claimed from other consumers, entries dead-lettered."""

    claimed: int
    dead: int


class Recovery:
    """Take-over and clean-up of ``stream``'s group ``group`` by ``consumer`` (the lease holder)."""

    def __init__(
        self, bus: Bus, stream: str, group: str, consumer: str, *, max_deliveries: int, origin: str
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.origin = origin
        self.log = blog.get("recovery", stream=origin)
        self._take_over = bus.redis.register_script(TAKE_OVER)
        self._drop = bus.redis.register_script(DROP_CONSUMERS)

    async def take_over(self) -> TakeOver:
        """Claim every entry pending on another consumer; dead-letter the ones handed out too often."""
        cursor, claimed, dead = "-", 0, 0
        while True:
            res = await self._take_over(
                keys=[self.stream],
                args=[self.group, self.consumer, self.max_deliveries, PAGE, cursor],
            )
            nxt, n = _str(res[0]), int(res[1])
            claimed += n
            poison = [(_str(res[i]), int(res[i + 1])) for i in range(2, len(res), 2)]
            for eid, times in poison:
                await self._dead(eid, times)
            dead += len(poison)
            if not nxt:
                break
            cursor = nxt
        if claimed or dead:
            self.log.info("recovery.took_over", claimed=claimed, dead=dead)
        return TakeOver(claimed, dead)

    async def _dead(self, eid: str, times: int) -> None:
        """Copy entry ``eid`` to the dead letters, then ack it (a crash between: copied twice)."""
        got = await self.bus.redis.xrange(self.stream, eid, eid)
        if got:
            fields = got[0][1]
            payload = fields.get(Field.DELIVERY.key) or fields.get(Field.ENVELOPE.key) or b""
            self.log.error("recovery.poison", entry=eid, delivered=times)
            await self.bus.dead_letter(
                payload, reason=f"handed out {times} times without finishing (crashed or stalled readers)",
                origin=self.origin, attempts=times, instance=self.consumer,
            )  # fmt: skip
        await self.bus.redis.xack(self.stream, self.group, eid)

    async def drop_consumers(self, idle: float) -> list[str]:
        """Forget consumers (not us) with nothing pending, idle ``idle`` seconds or more."""
        res = await self._drop(keys=[self.stream], args=[self.group, self.consumer, int(idle * 1000)])
        names = [_str(x) for x in res]
        if names:
            self.log.info("recovery.dropped_consumers", names=names)
        return names
