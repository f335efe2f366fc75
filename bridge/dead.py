"""Dead letters a person can handle: list, show, replay, purge (``wechat-bridge dead …``).

A dead letter is an entry of ``P:{dead}`` (fields: :class:`bridge.bus.Field`): the delivery as it
was, why it was given up, where from, after how many attempts, by which instance, when.

**Replay** puts deliveries back on their sink's stream — the partition of their conversation —
through the same idempotency marker (``lua/replay.lua``, one call per stream): a marker saying
``done:dead`` is cleared and the delivery appended; one saying the delivery was sent is left alone
and the delivery skipped (never sent twice); one still held by a runner (the letter was written a
moment ago, its ``done:dead`` not yet) is left in the dead stream to replay shortly; two letters of
one delivery in one replay append it once. Letters go back in dead-letter order whatever order their
ids were given in — the order their conversation had — and only then leave the dead stream (a crash
in between leaves them there to replay again, harmlessly). Letters that are not deliveries (an
undecodable inbound entry) or whose sink is no longer configured are skipped with the reason."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.bus import Field, Keys
from bridge.envelope import Delivery, decode_delivery
from bridge.lua import source


@dataclass(frozen=True)
class DeadLetter:
    id: str
    reason: str
    origin: str
    attempts: int
    instance: str
    at: float
    #: the delivery, None when the payload is not one (then ``raw`` is what was stored)
    delivery: Delivery | None
    raw: bytes

    def summary(self) -> dict[str, Any]:
        d = self.delivery
        return {
            "id": self.id, "from": self.origin, "reason": self.reason, "attempts": self.attempts,
            "instance": self.instance, "at": self.at,
            "sink": d.sink if d else None, "delivery": d.id if d else None,
            "conversation": (d.conversation or d.envelope.conversation.id) if d else None,
        }  # fmt: skip

    def full(self) -> dict[str, Any]:
        out = self.summary()
        try:
            out["payload"] = json.loads(self.raw)
        except ValueError:
            out["payload"] = self.raw.decode(errors="replace")
        return out


@dataclass
class Replayed:
    replayed: list[str] = field(default_factory=list)
    #: dead-letter id → why it was not replayed
    skipped: dict[str, str] = field(default_factory=dict)


def _s(x: Any) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def parse(eid: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    raw = fields.get(Field.DELIVERY.key, b"")
    try:
        d: Delivery | None = decode_delivery(raw)
    except ValueError:
        d = None

    def num(f: Field) -> float:
        try:
            return float(fields.get(f.key, b"0"))
        except ValueError:
            return 0.0

    return DeadLetter(
        _s(eid), _s(fields.get(Field.REASON.key, b"")), _s(fields.get(Field.FROM.key, b"")),
        int(num(Field.ATTEMPTS)), _s(fields.get(Field.INSTANCE.key, b"")), num(Field.AT), d, raw,
    )  # fmt: skip


class DeadLetters:
    def __init__(
        self, redis: Any, keys: Keys, *, maxlen: int = 1_000_000,
        stream_of: Callable[[Delivery], str] | None = None,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        #: the stream a delivery goes back to: its conversation's partition (``Bus.stream_of``)
        self.stream_of = stream_of or (lambda d: keys.out(d.sink))
        self._replay = redis.register_script(source("replay"))

    async def oldest(self, count: int | None = None) -> list[DeadLetter]:
        """The oldest ``count`` dead letters (all when None), oldest first."""
        return [parse(eid, f) for eid, f in await self.redis.xrange(self.keys.dead, count=count)]

    async def count(self) -> int:
        return int(await self.redis.xlen(self.keys.dead))

    async def get(self, ids: Sequence[str]) -> list[DeadLetter]:
        """The letters ``ids`` in dead-letter order; KeyError naming those that do not exist."""
        found: dict[str, DeadLetter] = {}
        for i in ids:
            try:
                got = await self.redis.xrange(self.keys.dead, i, i)
            except Exception as e:  # a malformed id
                raise KeyError(f"{i}: not a stream id ({e})") from None
            for eid, f in got:
                found[_s(eid)] = parse(eid, f)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no dead letter {', '.join(missing)}")
        return sorted(found.values(), key=lambda d: tuple(int(x) for x in d.id.split("-")))

    async def replay(self, letters: Sequence[DeadLetter], sinks: Collection[str]) -> Replayed:
        """Letters back onto their sinks' streams (see the module's docstring), then out of ``dead``."""
        res = Replayed()
        by_stream: dict[tuple[str, str], list[DeadLetter]] = {}
        first: dict[str, str] = {}  # delivery id → the letter that replays it
        for dl in letters:
            if dl.delivery is not None and dl.delivery.id in first:
                # a runner reading both copies in one batch would hold one claim for both: send once
                res.skipped[dl.id] = f"the same delivery as {first[dl.delivery.id]}: replayed once"
                await self.redis.xdel(self.keys.dead, dl.id)
            elif dl.delivery is None:
                res.skipped[dl.id] = f"not a delivery (from {dl.origin or '?'}: {dl.reason})"
            elif dl.delivery.sink not in sinks:
                res.skipped[dl.id] = f"no outbound named {dl.delivery.sink!r} in the config"
            else:
                first[dl.delivery.id] = dl.id
                by_stream.setdefault((dl.delivery.sink, self.stream_of(dl.delivery)), []).append(dl)
        for (sink, stream), group in by_stream.items():
            keys = [stream]
            args: list[Any] = [self.maxlen]
            for dl in group:
                assert dl.delivery is not None
                keys.append(self.keys.mark(sink, dl.delivery.id))
                args += [dl.delivery.id, dl.raw]
            flags = [int(f) for f in await self._replay(keys=keys, args=args)]
            for dl, flag in zip(group, flags, strict=True):
                if flag == 1:
                    res.replayed.append(dl.id)
                elif flag == 0:
                    res.skipped[dl.id] = "already sent (its marker says done): not sent again"
                else:
                    res.skipped[dl.id] = "a runner still holds it (given up just now): try again shortly"
            done = [dl.id for dl, flag in zip(group, flags, strict=True) if flag != 2]
            if done:
                await self.redis.xdel(self.keys.dead, *done)
        return res

    async def purge(self, ids: Sequence[str] | None = None) -> int:
        """Delete the letters ``ids`` (all when None); how many were deleted."""
        if ids is None:
            n = await self.count()
            await self.redis.delete(self.keys.dead)
            return n
        return int(await self.redis.xdel(self.keys.dead, *ids)) if ids else 0
