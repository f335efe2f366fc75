"""An answer that cannot go back the way it came goes through the sink's ``fallback`` outbound.

A sink raises :class:`bridge.errors.NoWayBack` when it cannot carry an answer home (the WeCom AI
bot: its stream window and response_url both closed, or the answer too long for it). When the sink's
outbound names a ``fallback`` (e.g. the WeCom app, whose ``message/send`` reaches the same member),
the runner hands the answer to it instead of dead-lettering it: one more delivery on the fallback's
stream, written before the failed delivery is acked, with an id stable in (answer, fallback,
conversation), so a crash in between sends nothing twice. The fallback's conversation is
``fallback_conversation`` filled with the answered message's ``{sender}`` and ``{conversation}``.
Without a fallback, or without a sender to fill in, the answer is a dead letter as before.
"""

from __future__ import annotations

import time

import msgspec

from bridge.config import OutboundConfig
from bridge.envelope import Delivery, delivery_id
from bridge.errors import NoWayBack


def fallback_delivery(cfg: OutboundConfig, d: Delivery, e: NoWayBack) -> Delivery | None:
    """The delivery that carries ``d``'s answer through ``cfg.fallback`` (None: there is no way)."""
    if cfg.fallback is None:
        return None
    env = d.envelope
    origin = env.origin
    sender = origin.sender if origin is not None else env.sender
    conversation = origin.conversation.id if origin is not None else env.conversation.id
    if sender is None and "{sender}" in cfg.fallback_conversation:
        return None
    conv = cfg.fallback_conversation.format(sender=sender.id if sender else "", conversation=conversation)
    carried = env if e.text is None else msgspec.structs.replace(env, text=e.text)
    did = delivery_id(env.id, cfg.fallback, conv)
    return Delivery(did, cfg.fallback, carried, conv, d.route, time.time())
