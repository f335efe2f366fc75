"""What the three WeChat inbound types share: verify → decrypt → parse → dedupe+publish → answer.

``wecom_app`` (adapters/wecom/app_callback.py), ``wecom_aibot`` (adapters/wecom/aibot.py) and
``wechat_oa`` (adapters/official_account/push.py) subclass :class:`WeChatInbound`. Each serves GET
(URL verification) and POST (messages) on its ``path``; aiohttp answers 405 to any other method.

Order of the checks on a POST, cheapest first, nothing decrypted before the signature is checked:

1. query parameters present and well formed, timestamp fresh (403);
2. body read up to ``max_body`` bytes (413), against a read deadline (408), freshness checked again
   once it is complete;
3. the ``<Encrypt>`` element found by a bounded scan (:func:`scan_encrypt`, never a parse: 400),
   signature checked in constant time (403); only a signed body is parsed;
4. decrypted (400 on bad base64/padding/length/receive id), inner payload parsed (400; no DTD,
   no entities: see :func:`adapters.wechat.parsing.parse_xml`);
5. published with its dedupe key in one Redis round trip; only then answered.

Refusals raise :class:`CallbackRefused`; the log line says why (a fixed reason, never a secret, never the
body) and the caller gets the status with that reason as text.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import msgspec
from aiohttp import web

from adapters.wechat.crypto import BadSignature, CryptoError, WXBizMsgCrypt, decode_aes_key
from adapters.wechat.parsing import CallbackRefused, field, parse_xml, seconds
from bridge import limits, refusals
from bridge.adapter import HttpRoute, Source
from bridge.config import Secret
from bridge.envelope import Attachment, Conversation, Envelope, Sender, make_envelope, stable_id

#: default cap on a callback body. The largest thing WeChat sends is a text message (content up to
#: 2,048 bytes) or an event with a card or an approval in it, a few KiB of XML; encrypted, that is
#: 4/3 of it plus the envelope, well under 16 KiB. 32 KiB leaves twice that as headroom while a forged
#: body costs at most half what the old 64 KiB allowed (refused by size before it is read).
DEFAULT_MAX_BODY = 32_768
#: default tolerance on the callback's timestamp, in seconds (0 = off). WeChat retries within about
#: 15 s of the first try; five minutes also absorbs ordinary clock skew.
DEFAULT_TIMESTAMP_TOLERANCE = 300
#: default lifetime of a dedupe marker; WeChat retries within seconds, so a day is plenty
DEFAULT_DEDUPE_TTL = 86_400
_MAX_PARAM = 4096


def crypto_refusal(e: CryptoError) -> CallbackRefused:
    if isinstance(e, BadSignature):
        return CallbackRefused(403, "bad signature")
    return CallbackRefused(400, f"cannot decrypt: {e}")  # the crypto's messages are fixed strings


class InboundOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys every WeChat inbound has (``name`` and ``type`` are the core's)."""

    path: str
    token: Secret
    #: seconds the callback's timestamp may differ from our clock (0 = off)
    timestamp_tolerance: int = DEFAULT_TIMESTAMP_TOLERANCE
    #: seconds a platform message id is remembered, so retries are not published twice
    dedupe_ttl: int = DEFAULT_DEDUPE_TTL
    #: bytes; a larger body is refused with 413 before it is parsed
    max_body: int = DEFAULT_MAX_BODY

    def check(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path: must start with '/'")
        if not self.token.reveal():
            raise ValueError("token: must not be empty")
        if self.timestamp_tolerance < 0:
            raise ValueError("timestamp_tolerance: must be 0 (off) or a number of seconds")
        if self.dedupe_ttl < 1:
            raise ValueError("dedupe_ttl: must be at least 1 second")
        if not 1024 <= self.max_body <= 16 * 1_048_576:
            raise ValueError("max_body: must be between 1024 and 16777216 bytes")


def check_aes_key(key: Secret | None) -> None:
    try:
        decode_aes_key(key.reveal() if key is not None else "")
    except CryptoError:
        raise ValueError(
            "encoding_aes_key: must be the 43-character EncodingAESKey from the console"
        ) from None


# -- request pieces ---------------------------------------------------------------------------------


def parse_query(request: web.Request) -> dict[str, str]:
    """The query string decoded exactly once, ``+`` kept as ``+``.

    Tencent percent-encodes ``+`` as ``%2B``; a raw ``+`` must not become a space either (a
    form-style parser would do that), since no WeChat parameter ever holds a space.
    """
    out: dict[str, str] = {}
    raw = request.rel_url.raw_query_string
    if not raw:
        return out
    for part in raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        try:
            key = urllib.parse.unquote(name, errors="strict")
            val = urllib.parse.unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise CallbackRefused(400, "query is not UTF-8") from None
        if key in out:
            raise CallbackRefused(400, f"query parameter {key[:40]!r} is repeated")
        out[key] = val
    return out


def required(query: Mapping[str, str], *names: str, status: int = 403) -> list[str]:
    """The values of ``names``; a missing or empty one refuses with ``status``."""
    values = []
    for n in names:
        v = query.get(n, "")
        if not v or len(v) > _MAX_PARAM:
            raise CallbackRefused(status, f"missing {n}")
        values.append(v)
    return values


def check_timestamp(timestamp: str, tolerance: int, now: float | None = None) -> None:
    if not tolerance:
        return
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise CallbackRefused(403, "bad timestamp")
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        raise CallbackRefused(403, "stale timestamp")


async def read_body(request: web.Request, cap: int, deadline: float | None = None) -> bytes:
    """The body, at most ``cap`` bytes, within ``deadline`` seconds (default
    :data:`bridge.limits.BODY_TIMEOUT`); a longer one is refused (413) without reading it all, a
    slower one with 408."""
    return await limits.read_capped(request, cap, deadline, CallbackRefused)


#: the ciphertext element of WeChat's outer XML: base64 text, bare or in one CDATA section
_ENCRYPT_OPEN = b"<Encrypt>"
_ENCRYPT_CLOSE = b"</Encrypt>"
_B64 = re.compile(rb"[A-Za-z0-9+/=]+")


def scan_encrypt(body: bytes) -> str:
    """The text of the body's one ``<Encrypt>`` element, found without parsing the body.

    Two ``find`` calls (linear, in C) and one regex over the value: whatever the body holds, this
    costs about what reading it did, so a forged body is refused (by the signature check that
    follows) before any XML parser sees it. Refused (400): no element, more than one (the signature
    must cover the only one), or a value that is not base64.
    """
    start = body.find(_ENCRYPT_OPEN)
    if start < 0:
        raise CallbackRefused(400, "body has no Encrypt")
    start += len(_ENCRYPT_OPEN)
    end = body.find(_ENCRYPT_CLOSE, start)
    if end < 0 or body.find(_ENCRYPT_OPEN, end) >= 0:
        raise CallbackRefused(400, "body has no single Encrypt")
    value = body[start:end]
    if value.startswith(b"<![CDATA[") and value.endswith(b"]]>"):
        value = value[9:-3]
    if not _B64.fullmatch(value):
        raise CallbackRefused(400, "Encrypt is not base64")
    return value.decode("ascii")


def parse_signed_outer(body: bytes, encrypt: str) -> dict[str, Any]:
    """The outer XML, parsed only once its ``<Encrypt>`` has been verified: it must hold that very
    ciphertext (so the parse cannot see another one than the scan did)."""
    outer = parse_xml(body, "body")
    if field(outer, "Encrypt") != encrypt:
        raise CallbackRefused(400, "body has no single Encrypt")
    return outer


# -- XML messages (WeCom app, Official Account) -----------------------------------------------------


def xml_message(
    source: str, msg: dict[str, Any], conversation: Conversation, meta: dict[str, str]
) -> tuple[Envelope, str]:
    """A decrypted WeCom-app / Official-Account message as an envelope, and its dedupe key.

    Text and attachments come from :data:`XML_CONTENT`, one small function per ``MsgType``; a type
    it does not know becomes an ``other`` attachment.

    Dedupe: ``MsgId`` (``MsgID`` in some OA events); events without one on
    FromUserName+CreateTime+Event+EventKey (the key tells two menu clicks in one second apart);
    anything else on the whole payload.
    """
    msg_type = field(msg, "MsgType")
    from_user = field(msg, "FromUserName")
    msg_id = (field(msg, "MsgId") or field(msg, "MsgID")).strip()
    created = seconds(field(msg, "CreateTime"))
    kind = "message"
    event: str | None = None
    text, attachments = "", list[Attachment]()
    meta = {**meta, "msg_type": msg_type}
    if msg_id:
        meta["msg_id"] = msg_id
    if msg_type == "event":
        kind = "event"
        event = field(msg, "Event")
        if field(msg, "EventKey"):
            meta["event_key"] = field(msg, "EventKey")
    else:
        text, attachments = XML_CONTENT.get(msg_type, _other)(msg)
    if msg_id:
        key = stable_id(source, "msg", msg_id)
    elif kind == "event":
        key = stable_id(
            source, "event", from_user, field(msg, "CreateTime"), event or "", field(msg, "EventKey")
        )
    else:
        key = stable_id(source, "payload", msgspec.json.encode(msg).decode())
    env = make_envelope(
        source,
        conversation,
        text,
        id=key,
        kind=kind,
        sender=Sender(from_user),
        attachments=attachments,
        event=event,
        meta=meta,
        raw=msg,
        **({"created_at": created} if created is not None else {}),
    )
    return env, key


Content = tuple[str, list[Attachment]]


def _text(msg: Mapping[str, Any]) -> Content:
    return field(msg, "Content"), []


def _image(msg: Mapping[str, Any]) -> Content:
    return "", [Attachment("image", url=field(msg, "PicUrl") or None, media_id=field(msg, "MediaId") or None)]


def _voice(msg: Mapping[str, Any]) -> Content:
    # Recognition: the OA's speech recognition, when switched on
    media_id = field(msg, "MediaId") or None
    return field(msg, "Recognition"), [
        Attachment("voice", media_id=media_id, extra=_extra(msg, Format="format"))
    ]


def _video(msg: Mapping[str, Any]) -> Content:
    extra = _extra(msg, ThumbMediaId="thumb_media_id")
    return "", [Attachment("video", media_id=field(msg, "MediaId") or None, extra=extra)]


def _location(msg: Mapping[str, Any]) -> Content:
    extra = _extra(msg, Location_X="latitude", Location_Y="longitude", Scale="scale")
    return "", [Attachment("location", title=field(msg, "Label") or None, extra=extra)]


def _link(msg: Mapping[str, Any]) -> Content:
    link = Attachment(
        "link",
        url=field(msg, "Url") or None,
        title=field(msg, "Title") or None,
        description=field(msg, "Description") or None,
        extra=_extra(msg, PicUrl="pic_url"),
    )
    return "", [link]


def _file(msg: Mapping[str, Any]) -> Content:
    return "", [Attachment("file", media_id=field(msg, "MediaId") or None, name=field(msg, "Title") or None)]


def _other(msg: Mapping[str, Any]) -> Content:
    """A type this table does not know: kept as an ``other`` attachment, never dropped."""
    return "", [Attachment("other", extra={"msg_type": field(msg, "MsgType")})]


#: MsgType → the message's text and attachments (events are handled by :func:`xml_message`)
XML_CONTENT: dict[str, Callable[[Mapping[str, Any]], Content]] = {
    "text": _text,
    "image": _image,
    "voice": _voice,
    "video": _video,
    "shortvideo": _video,
    "location": _location,
    "link": _link,
    "file": _file,
}


def _extra(msg: Mapping[str, Any], **names: str) -> dict[str, Any]:
    return {out: field(msg, k) for k, out in names.items() if field(msg, k)}


def require_fields(msg: Mapping[str, Any], *names: str) -> None:
    for n in names:
        if not field(msg, n).strip():
            raise CallbackRefused(400, f"payload has no {n}")


# -- the base class ----------------------------------------------------------------------------------


class WeChatInbound(Source):
    """GET and POST on ``path``; subclasses implement :meth:`verify_url` and :meth:`accept`."""

    #: the config type, used in log lines
    type_name: ClassVar[str] = "wechat"
    options: InboundOptions

    def routes(self) -> Sequence[HttpRoute]:
        return [
            HttpRoute("GET", self.options.path, self._get),
            HttpRoute("POST", self.options.path, self._post),
        ]

    def crypt(self, receive_id: str, key: Secret) -> WXBizMsgCrypt:
        return WXBizMsgCrypt(self.options.token.reveal(), key.reveal(), receive_id)

    async def verify_url(self, query: dict[str, str]) -> bytes:
        """The bare plaintext to answer a GET URL verification with."""
        raise NotImplementedError

    async def accept(self, request: web.Request, query: dict[str, str]) -> web.Response:
        """Handle a POST: read, verify, decrypt, parse, publish, answer."""
        raise NotImplementedError

    async def _get(self, request: web.Request) -> web.Response:
        try:
            body = await self.verify_url(parse_query(request))
        except CallbackRefused as e:
            return self.refuse(request, e)
        except CryptoError as e:
            return self.refuse(request, crypto_refusal(e))
        self.log.info("wechat.url_verified", type=self.type_name)
        return web.Response(body=body, content_type="text/plain", headers=_NOSNIFF)

    async def _post(self, request: web.Request) -> web.Response:
        try:
            return await self.accept(request, parse_query(request))
        except CallbackRefused as e:
            return self.refuse(request, e)
        except CryptoError as e:
            return self.refuse(request, crypto_refusal(e))

    def refuse(self, request: web.Request, e: CallbackRefused) -> web.Response:
        refusals.note(
            self.log,
            "wechat.refused",
            self.name,
            e.reason,
            type=self.type_name,
            method=request.method,
            status=e.status,
            remote=request.remote,
        )
        resp = web.Response(status=e.status, text=e.reason, headers=_NOSNIFF)
        if e.status in (408, 413):
            resp.force_close()  # the rest of the body is never read
        return resp

    async def publish(self, env: Envelope, key: str) -> bool:
        """Store the envelope (dedupe on ``key``, one round trip); False for a platform retry."""
        stored = await self.ctx.publish(env, dedupe_key=key, dedupe_ttl=self.options.dedupe_ttl)
        self.log.info(
            "wechat.accepted",
            type=self.type_name,
            envelope=env.id,
            kind=env.kind,
            msg_type=env.meta.get("msg_type"),
            duplicate=not stored,
        )
        return stored

    def fresh(self, timestamp: str) -> None:
        check_timestamp(timestamp, self.options.timestamp_tolerance)


_NOSNIFF = {"X-Content-Type-Options": "nosniff"}
