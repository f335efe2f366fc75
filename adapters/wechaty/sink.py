"""``wechaty`` (outbound): text and files to a personal-WeChat room or contact, through the connection
of a ``wechaty`` inbound (``inbound = "<its name>"``).

A send runs where that inbound's Event stream is held: on this instance when it holds it, else it
is relayed through Redis to the holder (:class:`bridge.held.HeldConnection`), at most once per
request id (the delivery id and the part number), so a retried delivery does not send twice.
Without a holder, or while the bot is not logged in, the send fails as retryable and the runner
tries again later (then dead-letters it after ``max_attempts``).

Where it goes: the delivery's conversation (a reply's is its origin conversation), else the
envelope's. Room ids contain ``@`` (``…@chatroom``); anything else is a contact id.

* **Text** is split at ``max_bytes`` UTF-8 bytes (bridge/text.py); each part is recorded as sent, so
  a retry resumes after the last part that went out.
* **Mentions**: a reply going into a room mentions the person it answers (``mention_reply``,
  default on): their contact id goes in the mention list and ``@Name`` in front of the first part.
* **Files**: each attachment with an http(s) ``url`` is sent as a URL FileBox (the puppet fetches
  it), after the text. The URL must pass the daemon's egress check first (``[http] fetch_hosts``,
  ``fetch_private``: bridge/egress.py), as if the bridge fetched it itself; a refused one is a dead
  letter saying so. Attachments without a URL cannot be sent yet: the bridge has no media store,
  and the inbound carries references, not bytes; they are named in the log and skipped.
* **Rate**: personal accounts are banned for floods, so the default is conservative:
  ``default_rate`` 20/minute for the account and ``per_conversation_rate`` (default 10/minute) per
  room or contact. ``rate`` in the config overrides the first.

Config::

    [[outbound]]
    name = "wx_out"
    type = "wechaty"
    inbound = "wx"                 # the wechaty inbound whose connection sends
    # mention_reply = true         # a reply into a room @-mentions the person it answers
    # max_bytes = 2048             # UTF-8 bytes per text part
    # per_conversation_rate = "10/minute"
    # timeout = 30                 # seconds to wait for the holder's answer
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence

from adapters.wechaty.options import WechatySinkOptions
from adapters.wechaty.source import WechatySource, source_for
from bridge.adapter import SendContext, Sink
from bridge.config import Rate, parse_rates
from bridge.envelope import Delivery
from bridge.errors import ConfigError, EgressRefused, PermanentError, RetryableError
from bridge.text import MIN_LIMIT_BYTES, split_text

#: bytes kept free in each part for the mention the holder adds ("@Name ")
MENTION_RESERVE = 64


class WechatySink(Sink):
    Options = WechatySinkOptions
    options: WechatySinkOptions
    default_rate = "20/minute"

    async def start(self) -> None:
        cfg = self.ctx.config
        inbound = cfg.inbound_by_name(self.options.inbound)
        if inbound is None or inbound.type != "wechaty":
            names = ", ".join(i.name for i in cfg.inbound if i.type == "wechaty") or "none"
            raise ConfigError(
                f"{cfg.path}: outbound.{self.name}.inbound: no wechaty inbound named "
                f"{self.options.inbound!r} (wechaty inbounds: {names})"
            )
        self._rates = parse_rates(self.options.per_conversation_rate)

    @property
    def source(self) -> WechatySource:
        src = source_for(self.ctx, self.options.inbound)
        if src is None:  # start() checked the config: the inbound exists but is not running
            raise RetryableError(f"the wechaty inbound {self.options.inbound!r} is not running")
        return src

    def recipient_limits(self, delivery: Delivery) -> Sequence[tuple[str, Sequence[Rate]]]:
        return [(_target(delivery), self._rates)] if self._rates else []

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        env = delivery.envelope
        target = _target(delivery)
        if not target:
            raise PermanentError(
                "no conversation to send to: give the route a conversation (a room or contact id)"
            )
        mentions: list[str] = []
        origin = env.origin if env.kind == "reply" else None
        if (
            self.options.mention_reply
            and origin is not None
            and origin.conversation.kind == "group"
            and origin.conversation.id == target
            and origin.sender is not None
        ):
            mentions = [origin.sender.id]
        # room for the "@Name " the holder puts in front of the first part
        limit = max(self.options.max_bytes - (MENTION_RESERVE if mentions else 0), MIN_LIMIT_BYTES)
        parts = split_text(env.text, limit) if env.text else []
        files = [(a.url, a.name or _name_from_url(a.url)) for a in env.attachments if _sendable(a.url)]
        skipped = [a.name or a.kind for a in env.attachments if not _sendable(a.url)]
        if skipped:
            self.log.warning(
                "wechaty.attachment_skipped", delivery=delivery.id, attachments=skipped,
                why="no URL: the bridge has no media store yet",
            )  # fmt: skip
        if not parts and not files:
            raise PermanentError("nothing to send: no text and no attachment with a URL")
        held = self.source.held
        done = await ctx.parts_sent()
        last = ""
        steps: list[tuple[str, dict[str, object]]] = [
            ("send_text", {"conversation": target, "text": p, "mentions": mentions if i == 0 else []})
            for i, p in enumerate(parts)
        ]
        steps += [("send_file", {"conversation": target, "url": url, "name": name}) for url, name in files]
        for i in range(done, len(steps)):
            op, payload = steps[i]
            if op == "send_file":  # the puppet fetches it for us: the same rule as our own fetches
                try:
                    await self.ctx.egress.check(str(payload["url"]))
                except EgressRefused as e:
                    raise PermanentError(f"attachment {payload['name']}: {e}") from None
            answer = await held.call(
                op, payload, request_id=f"{delivery.id}:{i}", timeout=self.options.timeout
            )
            last = str(answer.get("id") or "") or last
            await ctx.part_sent(i + 1)
        self.log.info(
            "wechaty.sent", delivery=delivery.id, conversation=target, parts=len(steps), mentions=mentions
        )
        # the stock puppets may return no message id: the delivery id stands in for it
        return last or f"wechaty:{delivery.id}"


def _target(delivery: Delivery) -> str:
    return delivery.conversation or delivery.envelope.conversation.id


def _sendable(url: str | None) -> bool:
    return bool(url) and urllib.parse.urlsplit(url or "").scheme in ("http", "https")


def _name_from_url(url: str | None) -> str:
    path = urllib.parse.urlsplit(url or "").path
    return os.path.basename(path) or "file"
