"""Routes: inbound envelopes → deliveries, one per (envelope, sink, conversation).

A reply (an envelope of kind ``reply`` published by a sink, with ``origin`` set) goes home: every
route with ``reply = true`` that took the origin's messages to that sink sends the reply to the origin
conversation through the origin inbound's ``reply_via`` sink. Replies are also matched like any other
envelope by routes whose ``from`` names the replying sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Mapping
from typing import Any

from bridge import logging as blog
from bridge.access import Gate
from bridge.bus import ROUTER_GROUP, Bus, Field
from bridge.config import Config, OutboundConfig, RouteConfig
from bridge.envelope import Delivery, Envelope, Origin, decode_envelope, delivery_id, make_envelope, stable_id
from bridge.lease import Lease
from bridge.merge import Merger
from bridge.recovery import Recovery

log = blog.get("router")

#: seconds the router waits before its next read when the last one gave nothing to deliver
IDLE_LINGER = 0.002


def matches(route: RouteConfig, env: Envelope) -> bool:
    m = route.match
    if env.kind not in m.kinds:
        return False
    if m.conversations is not None and env.conversation.id not in m.conversations:
        return False
    if m.senders is not None and (env.sender is None or env.sender.id not in m.senders):
        return False
    if m.mentions_only and env.conversation.kind == "group" and not env.mentions_me:
        return False
    return not (route.pattern is not None and not route.pattern.search(env.text))


def reply_envelope(d: Delivery, sink: str, text: str, *, seq: int = 0, format: str = "text",
                   **fields: Any) -> Envelope:  # fmt: skip
    """The envelope of kind ``reply`` carrying ``sink``'s answer to delivery ``d`` home.

    Its ``origin`` is the message the delivery ultimately answers (a reply's own origin, so a chain of
    answers still goes home to the first conversation); its id is stable in (delivery, ``seq``), so a
    retried send that answers again publishes a duplicate the bus drops.
    """
    env = d.envelope
    origin = env.origin if env.kind == "reply" and env.origin else Origin(
        source=env.source, conversation=env.conversation, envelope_id=env.id, sender=env.sender
    )  # fmt: skip
    return make_envelope(
        sink,
        origin.conversation,
        text,
        id=stable_id("reply", d.id, str(seq)),
        kind="reply",
        reply_to=env.id,
        origin=origin,
        hops=env.hops + 1,
        format=format,
        **fields,
    )


def plan(
    config: Config, env: Envelope, outbound: Mapping[str, OutboundConfig] | None = None
) -> list[Delivery]:
    """The deliveries an envelope makes (pure: the same envelope always gives the same list).

    ``outbound``: the config's sinks by name, when the caller keeps them (the router does).
    """
    sinks = outbound if outbound is not None else {o.name: o for o in config.outbound}
    now = time.time()
    out: dict[str, Delivery] = {}

    def add(sink: str, conversation: str | None, route: str) -> None:
        did = delivery_id(env.id, sink, conversation)
        if did not in out:
            out[did] = Delivery(did, sink, env, conversation, route, now)

    if env.hops > config.bridge.max_hops:
        log.warning("route.loop", envelope=env.id, source=env.source, hops=env.hops)
        return []
    for r in config.routes:
        origin = env.origin
        if (
            env.kind == "reply"
            and r.reply
            and origin
            and origin.source in r.sources
            and r.sends_to(env.source)
        ):
            inbound = config.inbound_by_name(origin.source)
            if inbound is None or inbound.reply_via is None:
                log.warning("route.no_reply_via", route=r.name, origin=origin.source)
            else:
                add(inbound.reply_via, origin.conversation.id, r.name)
        if env.source in r.sources and matches(r, env):
            for t in r.to:
                sink = sinks.get(t.sink)
                conv = t.conversation or (sink.default_conversation if sink else None)
                add(t.sink, conv, r.name)
    return list(out.values())


class Router:
    """Consumes the inbound stream (group ``router``) and writes deliveries to the out streams.

    One round trip a cycle: the deliveries of the batch just routed (one Lua call per sink, in order),
    the XACK of the batch before it (whose deliveries Redis confirmed) and the next XREADGROUP go in
    one pipeline. A crash before an ack means that batch is routed again, and the runner's
    idempotency marker keeps that from sending twice.
    """

    def __init__(
        self,
        config: Config,
        bus: Bus,
        consumer: str,
        *,
        batch: int = 256,
        lease: Lease | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.consumer = consumer
        self.batch = batch
        #: the ``router`` lease (bridge/partitions.py): one router at a time, or a conversation's
        #: deliveries would be written in the order two routers' reads finished. None: alone (tests)
        self.lease = lease
        self._stopping = asyncio.Event()
        self._sinks = {o.name: o for o in config.outbound}
        self.routed = 0
        #: access policies and session commands (bridge/access.py), before any message is planned
        self.gate = gate if gate is not None else Gate(config, bus, functools.partial(plan, config))
        #: bursts held for ``merge_window`` (bridge/merge.py): their entries are acked when routed
        self.merger = Merger({i.name: i.merge_window for i in config.inbound})

    def stop(self) -> None:
        self._stopping.set()

    def abort(self) -> None:
        """The lease ended: stop before the next read (what is unacked is routed again, deduped)."""
        self._stopping.set()

    def _may_read(self) -> bool:
        return not self._stopping.is_set() and (self.lease is None or self.lease.held)

    def _block_ms(self) -> int:
        """How long a read may block: 1 s, or less when a held burst falls due sooner."""
        due = self.merger.next_due(time.time())
        return 1000 if due is None else max(1, min(1000, int(due * 1000) + 1))

    async def run(self) -> None:
        stream = self.bus.keys.inbound
        await self.bus.ensure_group(stream, ROUTER_GROUP)
        if self.lease is not None:  # the previous holder's unfinished entries are ours, and first
            rec = Recovery(
                self.bus, stream, ROUTER_GROUP, self.consumer,
                max_deliveries=self.config.bridge.max_deliveries, origin="inbound",
            )  # fmt: skip
            await rec.take_over()
            await rec.drop_consumers(max(60.0, self.lease.ttl * 3))
        start = "0"  # first our own pending entries (a previous life's), then new ones
        acks: list[str] = []  # their deliveries are written: ack them with the next read
        routed: list[str] = []  # routed: their deliveries go with the next read
        out: list[Delivery] = []
        try:
            while self._may_read():
                read = self.bus.read(
                    stream, ROUTER_GROUP, self.consumer, count=self.batch,
                    block_ms=self._block_ms() if start == ">" else None, start=start, ack=acks, write=out,
                )  # fmt: skip
                # a blocking read is abandoned when we stop; our own pending entries are read whole
                entries = await (self.bus.or_stop(self._stopping, read) if start == ">" else read)
                if entries is None:  # stopped mid-read: the writes and acks are written again below
                    break
                self.routed += len(out)
                self.bus.metrics.count_routed(out)
                acks, routed, out = routed, [], []
                if start != ">":
                    if not entries:
                        start = ">"
                        continue
                    start = entries[-1][0]
                if entries:
                    routed, out = await self.route(entries)
                    if not out and len(entries) < self.batch:
                        # nothing to deliver, only acks to write: no hurry, let a few more entries
                        # come so that one read serves them all (unrouted traffic, e.g. a source
                        # nobody routes yet, then costs a fraction of a round trip per entry)
                        await asyncio.sleep(IDLE_LINGER)
                for ids, merged in self.merger.due(time.time()):  # bursts whose window passed
                    routed += ids
                    out += plan(self.config, merged, self._sinks)
        finally:  # what fails here is routed again by our next life (and deduped by the markers)
            with contextlib.suppress(Exception):
                if out:
                    await self.bus.add_deliveries(out)
                    self.routed += len(out)
                    self.bus.metrics.count_routed(out)
                acks += routed
            with contextlib.suppress(Exception):
                if acks:
                    await self.bus.ack(stream, ROUTER_GROUP, acks)

    async def route(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> tuple[list[str], list[Delivery]]:
        """The ids of a batch and the deliveries they make (undecodable entries are dead-lettered)."""
        ids = []
        out: list[Delivery] = []
        envs: list[tuple[str, Envelope]] = []
        for eid, fields in entries:
            raw = fields.get(Field.ENVELOPE.key)
            try:
                if raw is None:
                    raise ValueError("no envelope field")
                env = decode_envelope(raw)
            except ValueError as e:
                ids.append(eid)
                log.error("route.bad_entry", entry=eid, error=str(e))
                await self.bus.dead_letter(
                    raw or b"", reason=f"undecodable inbound entry: {e}", origin="inbound",
                    attempts=0, instance=self.consumer,
                )  # fmt: skip
                continue
            envs.append((eid, env))
        await self.gate.prepare([env for _, env in envs])
        for eid, env in envs:
            merging = self.merger.merges(env)
            if env.source in self.merger.windows:  # a held burst env does not join goes first
                for held, merged in self.merger.before(env):
                    ids += held
                    out += plan(self.config, merged, self._sinks)
            answers = await self.gate.admit(env)
            if answers is not None:  # refused, or a command: not routed; the bridge's answers go
                ids.append(eid)
                out += answers
                continue
            if merging:  # held (unacked) until its burst is routed
                self.merger.hold(eid, env)
                continue
            ids.append(eid)
            deliveries = plan(self.config, env, self._sinks)
            if not deliveries and blog.debug_enabled():
                log.debug("route.unmatched", envelope=env.id, source=env.source)
            out += deliveries
        return ids, out
