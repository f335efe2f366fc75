"""The one message model every platform maps to, and its JSON codec.

An :class:`Envelope` is what an inbound adapter publishes; a :class:`Delivery` is one envelope
bound for one sink (and one conversation there). Both are msgspec Structs: typed, and encoded and
decoded in a few microseconds.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Literal

import msgspec

Kind = Literal["message", "event", "reply"]
ConversationKind = Literal["group", "direct"]
AttachmentKind = Literal["image", "voice", "video", "file", "location", "link", "card", "other"]


class Conversation(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    kind: ConversationKind = "direct"
    title: str | None = None


class Sender(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    name: str | None = None


class Attachment(msgspec.Struct, frozen=True, omit_defaults=True):
    """A typed pointer to media; platform-specific fields go in ``extra``."""

    kind: AttachmentKind
    url: str | None = None
    media_id: str | None = None
    name: str | None = None
    mime: str | None = None
    size: int | None = None
    title: str | None = None
    description: str | None = None
    extra: dict[str, Any] = {}


class Origin(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where the message a reply answers came from: the inbound and its conversation."""

    source: str
    conversation: Conversation
    envelope_id: str
    sender: Sender | None = None


class Envelope(msgspec.Struct, omit_defaults=True):
    id: str
    source: str
    conversation: Conversation
    kind: Kind = "message"
    sender: Sender | None = None
    text: str = ""
    #: markdown when the text is markdown (a sink may render it natively)
    format: Literal["text", "markdown"] = "text"
    mentions: list[str] = []
    mentions_me: bool = False
    attachments: list[Attachment] = []
    event: str | None = None
    reply_to: str | None = None
    origin: Origin | None = None
    created_at: float = 0.0
    received_at: float = 0.0
    #: how many times this message has crossed the bridge (replies of replies); loops stop at a bound
    hops: int = 0
    #: small platform hints a sink may need later (e.g. an AI bot's response_url)
    meta: dict[str, str] = {}
    #: the platform's payload as received, for debugging
    raw: Any = None


class Delivery(msgspec.Struct, omit_defaults=True):
    """One envelope bound for one sink; ``id`` is deterministic, so a re-routed envelope dedupes."""

    id: str
    sink: str
    envelope: Envelope
    conversation: str | None = None
    route: str | None = None
    created_at: float = 0.0


def new_id() -> str:
    return uuid.uuid4().hex


def stable_id(*parts: str) -> str:
    """A deterministic id from its parts (the same parts always give the same id)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\x1f")
    return h.hexdigest()


def delivery_id(envelope_id: str, sink: str, conversation: str | None) -> str:
    return stable_id("dlv", envelope_id, sink, conversation or "")


def make_envelope(
    source: str,
    conversation: Conversation,
    text: str = "",
    *,
    id: str | None = None,
    **fields: Any,
) -> Envelope:
    now = time.time()
    fields.setdefault("created_at", now)
    fields.setdefault("received_at", now)
    return Envelope(id=id or new_id(), source=source, conversation=conversation, text=text, **fields)


_enc = msgspec.json.Encoder()
_env_dec = msgspec.json.Decoder(Envelope)
_dlv_dec = msgspec.json.Decoder(Delivery)


def encode(obj: Envelope | Delivery) -> bytes:
    return _enc.encode(obj)


def decode_envelope(data: bytes | str) -> Envelope:
    return _env_dec.decode(data)


def decode_delivery(data: bytes | str) -> Delivery:
    return _dlv_dec.decode(data)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)
