"""``wecom_aibot_ws`` (outbound): answers and proactive messages on a WeCom AI bot's long connection.

Deliveries are read by whichever instance's runner gets them, but only one instance holds the bot's
socket: every send is a request to :class:`bridge.held.HeldConnection` of the inbound named by
``inbound`` — run here when this instance holds the socket, else relayed through Redis to the holder.
The request id is ``<delivery id>:<part>``, so a retried delivery never sends a part twice (the
holder records each part's result; a retry gets the record).

* A **reply** to a message of that inbound (its ``reply_via``) finishes the message's stream — the
  holder has shown the placeholder and the draft so far — with the whole answer; an answer over
  20480 UTF-8 bytes continues in further finished streams, cut only where ``bridge.text`` cuts,
  never dropped. When the message's ``req_id`` died with an older socket or its stream expired, the
  answer goes as a proactive markdown message (``aibot_send_msg``) to the same chat.
* A reply to an ``enter_chat`` event is the welcome (within the window, else a message); a reply
  carrying a card to a ``template_card_event`` updates the card.
* **Anything else** (alerts, feeds: a route with ``to = "<this outbound>"`` and a conversation) is a
  proactive message to the delivery's conversation: a user id or a group chat id.

A ``template_card`` in ``meta`` (the card as JSON, e.g. set by a route or posted to the ``webhook``
inbound) is sent as a card instead of markdown.

Rate: WeCom publishes no limit for the long connection; an unconfirmed memo says 30 messages a minute
and 1000 an hour per bot, replies included. Proactive messages (deliveries that are not replies)
therefore share a conservative ``proactive_rate`` of ``20/minute, 600/hour`` across all instances,
leaving room for the replies, which are not held back (a reply waits for nobody: its stream would
expire). The core's ``rate`` key, if set, limits every delivery.

Config::

    [[outbound]]
    name = "aibot_ws_out"
    type = "wecom_aibot_ws"
    inbound = "aibot_ws"      # the wecom_aibot_ws inbound whose socket sends
    # timeout = 30            # seconds to wait for the holder's answer before retrying
    # proactive_rate = "20/minute, 600/hour"   # shared by all instances; "none" = no limit
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from adapters.wecom.aibot import CONTENT_MAX_BYTES
from adapters.wecom.aibot_ws import WeComAIBotWSSource, live_source
from bridge.adapter import SendContext, Sink
from bridge.config import Rate, parse_rates
from bridge.envelope import Delivery
from bridge.errors import ConfigError, PermanentError
from bridge.text import split_text


class WeComAIBotWSSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    inbound: str
    timeout: float = 30.0
    proactive_rate: str = "20/minute, 600/hour"

    def check(self) -> None:
        if not self.inbound:
            raise ValueError("inbound: name the wecom_aibot_ws inbound whose socket sends")
        if not 0 < self.timeout <= 600:
            raise ValueError("timeout: must be between 0 and 600 seconds")
        try:
            parse_rates(self.proactive_rate)
        except ValueError as e:
            raise ValueError(f"proactive_rate: {e}") from None


class WeComAIBotWSSink(Sink):
    Options = WeComAIBotWSSinkOptions
    options: WeComAIBotWSSinkOptions

    def __init__(self, name: str, options: WeComAIBotWSSinkOptions, ctx: Any) -> None:
        super().__init__(name, options, ctx)
        self._proactive_rates = parse_rates(options.proactive_rate)

    def _is_reply(self, delivery: Delivery) -> bool:
        env = delivery.envelope
        return env.kind == "reply" and env.origin is not None and env.origin.source == self.options.inbound

    def recipient_limits(self, delivery: Delivery) -> Sequence[tuple[str, Sequence[Rate]]]:
        if self._is_reply(delivery) or not self._proactive_rates:
            return ()
        return [("aibot_send_msg", self._proactive_rates)]

    async def start(self) -> None:
        if self._source() is None:
            raise ConfigError(
                f"{self.ctx.config.path}: outbound.{self.name}.inbound: no inbound named "
                f"{self.options.inbound!r} of type wecom_aibot_ws"
            )

    def _source(self) -> WeComAIBotWSSource | None:
        return live_source(self.ctx, self.options.inbound)

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        src = self._source()
        if src is None:
            raise PermanentError(f"the inbound {self.options.inbound!r} is gone")
        env = delivery.envelope
        card = _card(env.meta.get("template_card"))
        parts = (
            split_text(env.text, CONTENT_MAX_BYTES, number_parts=False, markdown=True) if env.text else [""]
        )
        if card is not None:
            parts = parts[:1] if env.text else [""]  # a card goes once, with the first part
        if self._is_reply(delivery):
            assert env.origin is not None
            op = "reply"
            base: dict[str, Any] = {"origin": env.origin.envelope_id}
        else:
            chat = delivery.conversation or env.conversation.id
            if not chat:
                raise PermanentError(
                    "no chat to send to: give the route target a conversation (user or chat id)"
                )
            op = "send"
            base = {"chat": chat}
        remote = ""
        for i in range(await ctx.parts_sent(), len(parts)):
            payload = {**base, "text": parts[i], "part": i, "parts": len(parts)}
            if card is not None and i == 0:
                payload["template_card"] = card
            got = await src.held.call(
                op, payload, request_id=f"{delivery.id}:{i}", timeout=self.options.timeout
            )
            remote = str(got.get("id", ""))
            self.log.info("wecom_aibot_ws.sent", delivery=delivery.id, op=op, part=i, via=got.get("via"))
            await ctx.part_sent(i + 1)
        return remote or f"aibot_ws:{delivery.id}"


CARD_TYPES = ("text_notice", "news_notice", "button_interaction", "vote_interaction", "multiple_interaction")
_TASK_ID = re.compile(r"[A-Za-z0-9_\-@]{1,128}")


def _card(raw: str | None) -> dict[str, Any] | None:
    """The envelope's ``meta.template_card`` checked against what WeCom requires (DOC-101032), or
    None; a card WeCom would refuse is refused here, with the reason, before anything is sent."""
    if not raw:
        return None
    try:
        card = json.loads(raw)
    except ValueError:
        raise PermanentError("meta.template_card is not JSON") from None
    if not isinstance(card, dict) or card.get("card_type") not in CARD_TYPES:
        raise PermanentError(
            f"meta.template_card must be a JSON object with card_type one of {', '.join(CARD_TYPES)}"
        )
    kind = card["card_type"]
    task_id = card.get("task_id")
    if task_id is not None and not (isinstance(task_id, str) and _TASK_ID.fullmatch(task_id)):
        raise PermanentError("template_card.task_id: 1-128 of A-Z a-z 0-9 _ - @")
    if kind in ("text_notice", "news_notice") and not isinstance(card.get("card_action"), dict):
        raise PermanentError(f"template_card: a {kind} card needs card_action")
    if kind.endswith("_interaction") and task_id is None:
        raise PermanentError(f"template_card: a {kind} card needs a task_id (its clicks and updates name it)")
    if kind == "button_interaction":
        buttons = card.get("button_list")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= 6:
            raise PermanentError("template_card.button_list: 1 to 6 buttons")
        for b in buttons:
            if not (isinstance(b, dict) and isinstance(b.get("text"), str) and isinstance(b.get("key"), str)):
                raise PermanentError("template_card.button_list: every button needs text and key")
    return card
