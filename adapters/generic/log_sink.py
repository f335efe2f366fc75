"""``log``: each delivery as one structured log line (dry runs, the demo)."""

from __future__ import annotations

import msgspec

from bridge.adapter import SendContext, Sink
from bridge.envelope import Delivery


class LogOptions(msgspec.Struct, forbid_unknown_fields=True):
    #: also log the platform's raw payload
    include_raw: bool = False


class LogSink(Sink):
    Options = LogOptions

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        env = delivery.envelope
        self.log.info(
            "sink.log.delivery",
            delivery=delivery.id,
            route=delivery.route,
            source=env.source,
            kind=env.kind,
            conversation=delivery.conversation or env.conversation.id,
            sender=env.sender.id if env.sender else None,
            text=env.text,
            attachments=len(env.attachments),
            raw=env.raw if self.options.include_raw else None,
        )
        return f"log:{delivery.id}"
