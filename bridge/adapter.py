"""The two adapter protocols (Source, Sink) and the registry (their errors: bridge.errors).

A **Source** turns a platform's traffic into envelopes: it declares HTTP routes into the daemon's one
aiohttp app, or runs one long-lived task the daemon supervises, or both. It publishes through
``ctx.publish`` and answers the platform only after that returned.

A **Sink** sends one delivery and returns the remote id, raising :class:`RetryableError` or
:class:`PermanentError`. Rate limits, retries, idempotency and dead letters are the runner's job.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import aiohttp
import msgspec
from aiohttp import web

from bridge import logging as blog
from bridge import transport
from bridge.bus import Bus
from bridge.config import Config, Rate, convert
from bridge.egress import Egress
from bridge.envelope import Delivery, Envelope
from bridge.errors import ConfigError


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    pass


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HttpRoute:
    method: str
    path: str
    handler: Handler


@dataclass
class Context:
    """What the daemon hands every adapter."""

    config: Config
    bus: Bus
    redis: Any
    instance: str
    data_dir: Path
    http: Callable[[], aiohttp.ClientSession]
    #: the one check for URLs a payload names (response_url, attachments): bridge/egress.py
    egress: Egress = field(default_factory=Egress)
    log: Any = field(default_factory=lambda: blog.get("adapter"))

    async def publish(
        self, env: Envelope, dedupe_key: str | None = None, dedupe_ttl: int | None = None
    ) -> bool:
        """Durably store an envelope; False for a duplicate. Raises BusUnavailable (→ 503)."""
        return await self.bus.publish(env, dedupe_key, dedupe_ttl)

    def poster(self, url: str, headers: Sequence[tuple[str, str]] = ()) -> transport.Poster:
        """A client that POSTs to ``url`` with ``headers`` (bridge/transport.py): the small
        HTTP/1.1 client for plain ``http://``, else aiohttp's on :attr:`http`. The caller closes it."""
        return transport.poster(url, headers, self.http)

    def state_key(self, adapter: str, key: str) -> str:
        return self.bus.keys.state(adapter, key)

    async def set_draft(self, envelope_id: str, text: str, *, final: bool = False, ttl: int = 3600) -> None:
        """Record the answer to an envelope so far (a streamed reply in progress)."""
        await self.redis.hset(self.bus.keys.draft(envelope_id), mapping={"text": text, "final": int(final)})
        await self.redis.expire(self.bus.keys.draft(envelope_id), ttl)

    async def get_draft(self, envelope_id: str) -> tuple[str, bool] | None:
        """(text so far, final) for an envelope, or None when nothing was drafted."""
        v = await self.redis.hgetall(self.bus.keys.draft(envelope_id))
        if not v:
            return None
        return v[b"text"].decode(), v.get(b"final") == b"1"


class Adapter:
    """What sources and sinks share: a name, typed options, a context, a lifecycle."""

    #: the adapter's options model (every key of its config table but the core's)
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, name: str, options: Any, ctx: Context) -> None:
        self.name = name
        self.options = options
        self.ctx = ctx
        self.log = blog.get(f"adapter.{type(self).__name__}", adapter=name)

    async def start(self) -> None:
        """Connect, load state. Runs before the daemon accepts traffic."""

    async def close(self) -> None:
        """Release what start() took. Runs after in-flight work finished."""

    async def ready(self) -> str | None:
        """None when ready, else a short reason shown by /readyz."""
        return None


class Source(Adapter):
    def routes(self) -> Sequence[HttpRoute]:
        """HTTP routes this source serves from the daemon's app."""
        return ()

    #: set True when ``run`` is a long-lived task (pollers, streams) the daemon must supervise
    long_running: ClassVar[bool] = False

    async def run(self) -> None:
        """The long-lived task; restarted with backoff if it crashes."""

    def stop(self) -> None:
        """Ask ``run`` to return soon: the daemon is stopping (called before it waits for its tasks)."""


class DeliveryServices(Protocol):
    """What a sink may ask of the runner sending its delivery (the runner implements it)."""

    async def parts_sent(self, d: Delivery) -> int: ...

    async def part_sent(self, d: Delivery, n: int) -> None: ...

    async def charge_part(self, d: Delivery, deadline: float, progress: str) -> None: ...

    async def draft(self, envelope_id: str, text: str) -> None: ...

    async def reply(self, d: Delivery, text: str, *, seq: int, format: str, **fields: Any) -> bool: ...


class SendContext:
    """Per-delivery help for a sink: progress of split deliveries, their quota, answers that go home.

    One is made for each attempt. ``budget``: seconds the attempt may spend waiting for quota
    (:meth:`charge_part`) before it yields to the runner (which keeps its claim on the delivery
    for twice that).
    """

    def __init__(self, delivery: Delivery, runner: DeliveryServices, *, budget: float = 300.0) -> None:
        self.delivery = delivery
        self._runner = runner
        self.deadline = time.monotonic() + budget

    async def parts_sent(self) -> int:
        """How many parts of this delivery a previous attempt already sent."""
        return await self._runner.parts_sent(self.delivery)

    async def part_sent(self, n: int) -> None:
        """Record that parts ``0..n-1`` are sent, so a retry starts at part ``n``."""
        await self._runner.part_sent(self.delivery, n)

    async def charge_part(self, progress: str) -> None:
        """Take the rate quota of one more part of this delivery (the attempt paid for its first).

        Charges the runner's rate keys for this delivery (the sink's, the recipient's): every part
        is a message the platform counts. Waits for quota here while the attempt stays within its
        budget; past it raises :class:`RetryableError` (with the wait as ``retry_after``) and the
        next attempt goes on from the parts recorded. ``progress`` starts that error's message.
        """
        await self._runner.charge_part(self.delivery, self.deadline, progress)

    @property
    def origin_envelope_id(self) -> str:
        """The id of the message this delivery ultimately answers (the origin's, for replies)."""
        env = self.delivery.envelope
        return env.origin.envelope_id if env.kind == "reply" and env.origin else env.id

    async def draft(self, text: str) -> None:
        """Publish the answer so far (streamed deltas) for the origin message; sources that stream
        replies (the WeCom AI bot) show it before the final reply arrives."""
        await self._runner.draft(self.origin_envelope_id, text)

    async def reply(self, text: str, *, seq: int = 0, format: str = "text", **fields: Any) -> bool:
        """Publish the sink's answer as an inbound envelope of kind ``reply`` (routed home)."""
        return await self._runner.reply(self.delivery, text, seq=seq, format=format, **fields)


class Sink(Adapter):
    #: the sink's default rate when the config gives none, e.g. "20/minute"
    default_rate: ClassVar[str | None] = None
    #: the sink keys agent sessions by ``envelope.meta["session_gen"]`` (``/new``): the router stamps
    #: it on the messages routed to such a sink (one Redis read per batch), and on no others
    keeps_sessions: ClassVar[bool] = False

    def recipient_limits(self, delivery: Delivery) -> Sequence[tuple[str, Sequence[Rate]]]:
        """Per-recipient quotas for this delivery: (recipient key, rates) pairs."""
        return ()

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        raise NotImplementedError

    def session_of(self, delivery: Delivery) -> str | None:
        """The agent session this delivery's turn would go to, in words (``/status``); None: this
        sink keeps no sessions."""
        return None

    async def stop_turn(self, delivery: Delivery) -> str | None:
        """Abort the agent turn in flight in this delivery's session (``/stop``) and say what was
        done, in a sentence; None: this sink runs no turns."""
        return None


class Registry:
    """Maps a config ``type`` to an adapter class.

    The table lives outside the core: a module (``adapters`` by default) exposes ``SOURCES`` and
    ``SINKS``, dicts from type name to ``"module:Class"``. Classes load when first used.
    """

    def __init__(
        self,
        sources: dict[str, str | type[Source]] | None = None,
        sinks: dict[str, str | type[Sink]] | None = None,
    ) -> None:
        self.sources: dict[str, str | type[Source]] = dict(sources or {})
        self.sinks: dict[str, str | type[Sink]] = dict(sinks or {})

    @classmethod
    def from_module(cls, module: str = "adapters") -> Registry:
        mod = importlib.import_module(module)
        return cls(getattr(mod, "SOURCES", {}), getattr(mod, "SINKS", {}))

    @staticmethod
    def _load(ref: str | type[Any]) -> type[Any]:
        if isinstance(ref, str):
            mod, _, attr = ref.partition(":")
            loaded: type[Any] = getattr(importlib.import_module(mod), attr)
            return loaded
        return ref

    def source(self, type_: str, where: str, file: Path) -> type[Source]:
        if type_ not in self.sources:
            known = ", ".join(sorted(self.sources))
            raise ConfigError(f"{file}: {where}.type: unknown inbound type {type_!r} (known: {known})")
        return self._load(self.sources[type_])

    def sink(self, type_: str, where: str, file: Path) -> type[Sink]:
        if type_ not in self.sinks:
            known = ", ".join(sorted(self.sinks))
            raise ConfigError(f"{file}: {where}.type: unknown outbound type {type_!r} (known: {known})")
        return self._load(self.sinks[type_])

    def validate(self, config: Config) -> dict[str, Any]:
        """Every adapter's options, typed; raises ConfigError naming the key."""
        out: dict[str, Any] = {}
        entries: list[tuple[str, str, dict[str, Any], type[Adapter]]] = [
            (f"outbound.{o.name}", o.name, o.options, self.sink(o.type, f"outbound.{o.name}", config.path))
            for o in config.outbound
        ]
        entries += [
            (f"inbound.{i.name}", i.name, i.options, self.source(i.type, f"inbound.{i.name}", config.path))
            for i in config.inbound
        ]
        for where, name, raw, cls in entries:
            out[name] = convert(raw, cls.Options, where, config.path)
            check = getattr(out[name], "check", None)
            if callable(check):
                try:
                    check()
                except ValueError as e:  # "key: what is wrong"
                    raise ConfigError(f"{config.path}: {where}.{e}") from None
        return out
