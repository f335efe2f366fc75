"""Puppet payloads → envelopes (pure functions, no I/O).

* A message in a room: ``Conversation(room id, "group", title=room topic)``; a direct message:
  ``Conversation(talker id, "direct", title=talker name)``. ``sender.id`` is the talker's contact id,
  ``sender.name`` its room alias or name. ``mentions`` are contact ids; ``mentions_me`` is true when
  the bot's contact id is among them, or for every direct message (it is addressed to the bot).
* The type comes from the TypeScript numbering (:data:`client.MESSAGE_TYPES`) into ``meta.msg_type``;
  files, images, audio and video become an :class:`Attachment` reference (no bytes: the bridge has no
  media store yet) holding what the file box says (name, size, mime, its url when it is a URL box)
  and the message id to fetch it by (``media_id``, ``extra.message_id``).
* Room join / leave / topic change are envelopes of kind ``event`` (``event`` = ``room_join``,
  ``room_leave``, ``room_topic``) in the room's conversation, with the people involved in ``meta``.
* Envelope ids are deterministic (message id, or the event's fields), so the same event published
  twice dedupes.
"""

from __future__ import annotations

import mimetypes
from typing import Any

from adapters.wechaty.client import MESSAGE_TYPES
from bridge.envelope import (
    Attachment,
    AttachmentKind,
    Conversation,
    Envelope,
    Sender,
    make_envelope,
    stable_id,
)

#: TypeScript message type → the attachment kind of its media (types without media are absent)
MEDIA_KINDS: dict[str, AttachmentKind] = {
    "attachment": "file",
    "image": "image",
    "emoticon": "image",
    "audio": "voice",
    "video": "video",
}
#: TypeScript message type → an attachment without media that still says what it was
OTHER_KINDS: dict[str, AttachmentKind] = {
    "url": "link",
    "contact": "card",
    "location": "location",
    "mini_program": "other",
    "chat_history": "other",
    "transfer": "other",
    "red_envelope": "other",
    "group_note": "other",
    "post": "other",
    "recalled": "other",
    "unknown": "other",
}
#: FileBox types (npm file-box ``FileBoxType``)
FILEBOX_TYPES = {
    0: "unknown",
    1: "base64",
    2: "url",
    3: "qrcode",
    4: "buffer",
    5: "file",
    6: "stream",
    7: "uuid",
}


def message_type(number: int) -> str:
    return MESSAGE_TYPES.get(number, f"type_{number}")


def message_id_key(source: str, message_id: str) -> str:
    return stable_id(source, "msg", message_id)


def file_attachment(kind: AttachmentKind, message_id: str, box: dict[str, Any] | None) -> Attachment:
    """An attachment reference from a FileBox's JSON (its bytes, if any, are dropped)."""
    box = box or {}
    name = box.get("name") if isinstance(box.get("name"), str) else None
    size = (
        box.get("size")
        if isinstance(box.get("size"), int) and not isinstance(box.get("size"), bool)
        else None
    )
    mime = box.get("mediaType") if isinstance(box.get("mediaType"), str) else None
    if mime is None and name:
        mime = mimetypes.guess_type(name)[0]
    if size is None and isinstance(box.get("base64"), str):
        b64: str = box["base64"]
        size = len(b64) * 3 // 4 - b64[-2:].count("=")
    box_type = box.get("type", box.get("boxType"))
    url = (
        box.get("url") if FILEBOX_TYPES.get(box_type if isinstance(box_type, int) else -1) == "url" else None
    )
    extra: dict[str, Any] = {"message_id": message_id, "bytes": "not carried (no media store yet)"}
    if isinstance(box_type, int):
        extra["filebox_type"] = FILEBOX_TYPES.get(box_type, str(box_type))
    if isinstance(box.get("uuid"), str):
        extra["filebox_uuid"] = box["uuid"]
    return Attachment(
        kind, url=url if isinstance(url, str) else None, media_id=message_id, name=name, mime=mime,
        size=size, extra=extra,
    )  # fmt: skip


def message_envelope(
    source: str,
    *,
    message: dict[str, Any],
    self_id: str,
    room: dict[str, Any] | None,
    talker: dict[str, Any] | None,
    talker_alias: str = "",
    file_box: dict[str, Any] | None = None,
) -> Envelope:
    """One message as an envelope.

    ``message``: MessagePayload fields (``id``, ``type`` as the TypeScript number, ``talker_id``,
    ``room_id``, ``listener_id``, ``text``, ``mention_ids``, ``timestamp`` in ms); ``room``: its
    RoomPayload (``topic``) or None; ``talker``: its ContactPayload (``name``) or None;
    ``file_box``: the FileBox JSON of a media message, if it was fetched.
    """
    msg_id = str(message["id"])
    type_name = message_type(int(message.get("type", 0)))
    talker_id = str(message.get("talker_id") or "")
    room_id = str(message.get("room_id") or "")
    talker_name = (talker or {}).get("name") or None
    if room_id:
        conv = Conversation(room_id, "group", title=(room or {}).get("topic") or None)
    else:
        conv = Conversation(talker_id, "direct", title=talker_name)
    mentions = [str(m) for m in message.get("mention_ids") or []]
    attachments: list[Attachment] = []
    if type_name in MEDIA_KINDS:
        attachments.append(file_attachment(MEDIA_KINDS[type_name], msg_id, file_box))
    elif type_name in OTHER_KINDS:
        attachments.append(Attachment(OTHER_KINDS[type_name], media_id=msg_id, extra={"msg_type": type_name}))
    meta = {"msg_type": type_name, "message_id": msg_id}
    if message.get("listener_id"):
        meta["listener_id"] = str(message["listener_id"])
    fields: dict[str, Any] = {}
    ts = message.get("timestamp")
    if isinstance(ts, int | float) and not isinstance(ts, bool) and ts > 0:
        fields["created_at"] = float(ts) / 1000.0
    return make_envelope(
        source,
        conv,
        str(message.get("text") or ""),
        id=message_id_key(source, msg_id),
        sender=Sender(talker_id, talker_alias or talker_name) if talker_id else None,
        mentions=mentions,
        mentions_me=(not room_id) or (bool(self_id) and self_id in mentions),
        attachments=attachments,
        meta=meta,
        raw={"message": message, "room_topic": (room or {}).get("topic")},
        **fields,
    )


def room_event_envelope(
    source: str, event: str, payload: dict[str, Any], *, topic: str | None = None
) -> Envelope | None:
    """A room join / leave / topic event as an envelope of kind ``event``; None without a room id."""
    room_id = payload.get("roomId")
    if not isinstance(room_id, str) or not room_id:
        return None
    meta: dict[str, str] = {}
    text = ""
    if event == "room_join":
        who = [str(x) for x in payload.get("inviteeIdList") or []]
        meta = {"invitees": ",".join(who), "inviter": str(payload.get("inviterId") or "")}
        text = f"{meta['inviter']} added {', '.join(who)}"
    elif event == "room_leave":
        who = [str(x) for x in payload.get("removeeIdList") or []]
        meta = {"removees": ",".join(who), "remover": str(payload.get("removerId") or "")}
        text = (
            f"{', '.join(who)} left"
            if meta["remover"] in who
            else f"{meta['remover']} removed {', '.join(who)}"
        )
    elif event == "room_topic":
        meta = {
            "changer": str(payload.get("changerId") or ""),
            "old_topic": str(payload.get("oldTopic") or ""),
            "new_topic": str(payload.get("newTopic") or ""),
        }
        topic = meta["new_topic"] or topic
        text = f"{meta['changer']} changed the topic to {meta['new_topic']}"
    else:
        raise ValueError(f"not a room event: {event}")
    ts = payload.get("timestamp")
    key = stable_id(source, event, room_id, str(ts), *sorted(meta.values()))
    fields: dict[str, Any] = {}
    if isinstance(ts, int | float) and not isinstance(ts, bool) and ts > 0:
        # puppets send milliseconds; a few older ones seconds
        fields["created_at"] = float(ts) / 1000.0 if ts > 1e11 else float(ts)
    return make_envelope(
        source,
        Conversation(room_id, "group", title=topic or None),
        text,
        id=key,
        kind="event",
        event=event,
        meta=meta,
        raw=payload,
        **fields,
    )
