"""Who may talk through an inbound, checked by the router before it routes a message.

Each inbound has an ``access`` table (:class:`bridge.config.AccessConfig`): ``dm_policy`` for direct
chats (open, allowlist, pairing, disabled), ``group_policy`` for groups (open, allowlist, disabled),
``allow_senders``, ``allow_groups``, per-group sender lists (``group_senders``) and ``admins`` (who
always pass, and the only ones who may run an ``admins_only`` command). A refused message is never
routed: it is counted (:attr:`Gate.refused`, and ``wechat_bridge_refused_total{event="access.refused"}``
on /metrics through :mod:`bridge.refusals`) and logged as ``access.refused`` with the sender's id and
no text (the first of each reason per inbound, then one line per 10 s with the number suppressed).
When the message was addressed to the bot (a direct chat, or a group message that
mentions it), the optional ``refusal_reply`` goes back through the inbound's ``reply_via``, at most
``refusal_rate`` per sender (the core's GCRA, :class:`bridge.ratelimit.Limiter`). Under ``pairing`` an
unknown sender gets a one-time code instead (:mod:`bridge.pairing`).

A message that passes and whose text is a session command is answered by :mod:`bridge.commands` and
not routed either. Events (a follow, a menu click) are judged by the same policy but never answered
(no refusal, no pairing code). Replies (envelopes of kind ``reply``) pass untouched.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bridge import logging as blog
from bridge import refusals
from bridge.bus import Bus
from bridge.commands import Commands, Planner, SessionControl
from bridge.config import AccessConfig, Config, parse_rates
from bridge.envelope import Delivery, Envelope, Origin, delivery_id, make_envelope, stable_id
from bridge.pairing import Pairing
from bridge.ratelimit import Limit, Limiter

log = blog.get("access")

#: the ``source`` of the bridge's own answers (commands, refusals, pairing codes)
BRIDGE = "bridge"


class Decision(enum.Enum):
    ALLOW = "allow"
    #: refused; the value after the colon is the reason logged
    REFUSE_DM_DISABLED = "refuse:dm_disabled"
    REFUSE_DM_NOT_ALLOWED = "refuse:dm_not_allowed"
    REFUSE_NO_SENDER = "refuse:no_sender"
    REFUSE_GROUP_DISABLED = "refuse:group_disabled"
    REFUSE_GROUP_NOT_ALLOWED = "refuse:group_not_allowed"
    REFUSE_GROUP_SENDER = "refuse:group_sender_not_allowed"
    #: an unknown sender under ``dm_policy = "pairing"``: passes if paired, else gets a code
    PAIRING = "pairing"

    @property
    def refused(self) -> bool:
        return self.value.startswith("refuse:")


def decide(a: AccessConfig, env: Envelope) -> Decision:
    """What the policy says of a message, before anything Redis knows (pure)."""
    sender = env.sender.id if env.sender else None
    if sender is not None and sender in a.admins:
        return Decision.ALLOW
    if env.conversation.kind == "direct":
        if a.dm_policy == "open":
            return Decision.ALLOW
        if a.dm_policy == "disabled":
            return Decision.REFUSE_DM_DISABLED
        if sender is None:
            return Decision.REFUSE_NO_SENDER
        if sender in a.allow_senders:
            return Decision.ALLOW
        return Decision.PAIRING if a.dm_policy == "pairing" else Decision.REFUSE_DM_NOT_ALLOWED
    if a.group_policy == "disabled":
        return Decision.REFUSE_GROUP_DISABLED
    if a.group_policy == "allowlist" and env.conversation.id not in a.allow_groups:
        return Decision.REFUSE_GROUP_NOT_ALLOWED
    only = a.group_senders.get(env.conversation.id)
    if only is not None and sender not in only:
        return Decision.REFUSE_GROUP_SENDER
    return Decision.ALLOW


def addressed(env: Envelope) -> bool:
    """The message speaks to the bot: a direct chat, or a group message that mentions it."""
    return env.conversation.kind == "direct" or env.mentions_me


class Gate:
    """The router's hook: :meth:`prepare` once per batch, then :meth:`admit` per envelope."""

    def __init__(
        self, config: Config, bus: Bus, plan: Planner, sinks: Mapping[str, SessionControl] | None = None
    ) -> None:
        self.config = config
        self.bus = bus
        self.inbound = {i.name: i for i in config.inbound}
        self.pairing = Pairing(bus.redis, bus.keys.prefix)
        self.limiter = Limiter(bus.redis)
        self.commands = Commands(config, bus, sinks or {}, self.answer, plan)
        self._refusal_rates = {i.name: parse_rates(i.access.refusal_rate) for i in config.inbound}
        self._gated = {
            i.name for i in config.inbound
            if i.access != AccessConfig() or config.commands.enabled
        }  # fmt: skip
        #: messages refused so far (by this instance)
        self.refused = 0
        #: pairing codes handed out (or handed out again) so far
        self.codes_sent = 0

    def gated(self, env: Envelope) -> bool:
        return env.kind in ("message", "event") and env.source in self._gated

    async def prepare(self, envs: Sequence[Envelope]) -> None:
        """Once per batch, before :meth:`admit`: stamp the session generation (one Redis call)."""
        await self.commands.load([e for e in envs if self.gated(e)])

    async def admit(self, env: Envelope) -> list[Delivery] | None:
        """None: route ``env`` as usual. A list: do not route it; send these answers instead."""
        if not self.gated(env):
            return None
        inbound = self.inbound[env.source]
        a = inbound.access
        decision = decide(a, env)
        if decision is Decision.PAIRING and env.sender is not None:
            if await self.pairing.is_paired(env.source, env.sender.id):
                decision = Decision.ALLOW
            elif env.kind == "event":  # an unknown sender's event (a follow, a menu click): silent
                decision = Decision.REFUSE_DM_NOT_ALLOWED
            else:
                return await self._pair(env, a)
        if decision.refused:
            return await self._refuse(env, a, decision)
        if env.kind == "event":
            self.commands.stamp(env)
            return None
        answers = await self.commands.handle(env, admin=env.sender is not None and env.sender.id in a.admins)
        if answers is None:
            self.commands.stamp(env)
        return answers

    async def _refuse(self, env: Envelope, a: AccessConfig, decision: Decision) -> list[Delivery]:
        self.refused += 1
        refusals.note(
            log, "access.refused", env.source, decision.value[7:], envelope=env.id,
            conversation=env.conversation.id, kind=env.conversation.kind,
            sender=env.sender.id if env.sender else None,
        )  # fmt: skip
        if env.kind != "message" or not a.refusal_reply or not addressed(env):
            return []
        if not await self._may_answer(env):
            return []
        d = self.answer(env, a.refusal_reply, "refusal")
        return [d] if d else []

    async def _pair(self, env: Envelope, a: AccessConfig) -> list[Delivery] | None:
        assert env.sender is not None
        self.refused += 1
        issued = await self.pairing.issue(
            env.source, env.sender.id, ttl=a.pairing_ttl, max_pending=a.max_pending
        )
        log.info(
            "access.pairing", source=env.source, envelope=env.id, sender=env.sender.id, status=issued.status
        )
        if issued.status == "paired":  # approved between our two looks
            answers = await self.commands.handle(env, admin=False)
            if answers is None:
                self.commands.stamp(env)
            return answers
        if issued.status == "full":
            log.warning("access.pairing_full", source=env.source, max_pending=a.max_pending)
            return []
        if issued.status == "existing" and not await self._may_answer(env):
            return []
        if issued.status == "new":  # a new code always goes out; charge the sender's rate anyway
            await self._may_answer(env)
        minutes = max(1, round((issued.expires_ms / 1000 - time.time()) / 60))
        self.codes_sent += 1
        d = self.answer(env, a.pairing_reply.format(code=issued.code, minutes=minutes), f"pair:{issued.code}")
        return [d] if d else []

    async def _may_answer(self, env: Envelope) -> bool:
        """Charge the sender's refusal rate; False when it is spent (then stay silent)."""
        sender = env.sender.id if env.sender else env.conversation.id
        rates = self._refusal_rates[env.source]
        limits = [
            Limit(f"{self.pairing.keys.refusal(env.source, sender)}:{n}", r) for n, r in enumerate(rates)
        ]
        wait = await self.limiter.acquire(limits)
        if wait > 0:
            log.info("access.refusal_limited", source=env.source, sender=sender, wait=round(wait, 1))
        return wait <= 0

    def answer(self, env: Envelope, text: str, why: str, **fields: Any) -> Delivery | None:
        """The bridge's own answer to ``env``: a reply envelope to the origin conversation, as a
        delivery to the inbound's ``reply_via`` sink (None when it has none). Its ids are stable in
        (``env``, ``why``), so routing the same entry again sends nothing twice."""
        via = self.inbound[env.source].reply_via
        if via is None:
            log.warning("access.no_reply_via", source=env.source, why=why)
            return None
        origin = Origin(
            source=env.source, conversation=env.conversation, envelope_id=env.id, sender=env.sender
        )
        reply = make_envelope(
            BRIDGE, env.conversation, text, id=stable_id("bridge-answer", env.id, why), kind="reply",
            reply_to=env.id, origin=origin, hops=env.hops + 1, **fields,
        )  # fmt: skip
        did = delivery_id(reply.id, via, env.conversation.id)
        return Delivery(did, via, reply, env.conversation.id, BRIDGE, time.time())
