"""The two adapter protocols (Source, Sink), their errors, and the registry.

A **Source** turns a platform's traffic into envelopes: it declares HTTP routes into the daemon's one
aiohttp app, or runs one long-lived task the daemon supervises, or both. It publishes through
``ctx.publish`` and answers the platform only after that returned.

A **Sink** sends one delivery and returns the remote id, raising :class:`RetryableError` or
:class:`PermanentError`. Rate limits, retries, idempotency and dead letters are the runner's job.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import msgspec
from aiohttp import web

from bridge import logging as blog
from bridge.bus import Bus
from bridge.config import Config, ConfigError, Rate, convert
from bridge.envelope import Delivery, Envelope


class SendError(Exception):
    """Base of the errors a sink raises. The message becomes the dead letter's reason: make it say
    what to fix, and never put a secret in it."""


class RetryableError(SendError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SendError):
    pass


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
    log: Any = field(default_factory=lambda: blog.get("adapter"))

    async def publish(
        self, env: Envelope, dedupe_key: str | None = None, dedupe_ttl: int | None = None
    ) -> bool:
        """Durably store an envelope; False for a duplicate. Raises BusUnavailable (→ 503)."""
        return await self.bus.publish(env, dedupe_key, dedupe_ttl)

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


class SendContext:
    """Per-delivery help for a sink: progress of split deliveries, and answers that go home."""

    def __init__(self, delivery: Delivery, runner: Any) -> None:
        self.delivery = delivery
        self._runner = runner

    async def parts_sent(self) -> int:
        """How many parts of this delivery a previous attempt already sent."""
        n: int = await self._runner.parts_sent(self.delivery)
        return n

    async def part_sent(self, n: int) -> None:
        """Record that parts ``0..n-1`` are sent, so a retry starts at part ``n``."""
        await self._runner.part_sent(self.delivery, n)

    @property
    def origin_envelope_id(self) -> str:
        """The id of the message this delivery ultimately answers (the origin's, for replies)."""
        env = self.delivery.envelope
        return env.origin.envelope_id if env.kind == "reply" and env.origin else env.id

    async def draft(self, text: str) -> None:
        """Publish the answer so far (streamed deltas) for the origin message; sources that stream
        replies (the WeCom AI bot) show it before the final reply arrives."""
        await self._runner.ctx.set_draft(self.origin_envelope_id, text)

    async def reply(self, text: str, *, seq: int = 0, format: str = "text", **fields: Any) -> bool:
        """Publish the sink's answer as an inbound envelope of kind ``reply`` (routed home)."""
        ok: bool = await self._runner.reply(self.delivery, text, seq=seq, format=format, **fields)
        return ok


class Sink(Adapter):
    #: the sink's default rate when the config gives none, e.g. "20/minute"
    default_rate: ClassVar[str | None] = None

    def recipient_limits(self, delivery: Delivery) -> Sequence[tuple[str, Sequence[Rate]]]:
        """Per-recipient quotas for this delivery: (recipient key, rates) pairs."""
        return ()

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        raise NotImplementedError


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
