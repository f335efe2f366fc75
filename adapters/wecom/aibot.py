"""``wecom_aibot``: a WeCom AI bot (智能机器人) in API mode (JSON, encrypted, receive id = "").

GET ``?msg_signature&timestamp&nonce&echostr``: the decrypted echostr, bare (as for the app).
POST ``{"encrypt": "…"}``; after decryption one of:

* a **message** (text, image, mixed, voice, file): published, then answered with an encrypted stream
  reply ``{"msgtype":"stream","stream":{"id":…,"finish":false,"content":…}}``. The stream id is the
  envelope id (deterministic from ``msgid``, so a retried callback gets the same stream);
* a **stream refresh** (``msgtype = stream``): nothing published; answered with the reply so far,
  read from the draft the core keeps in Redis (``ctx.get_draft``), ``finish=true`` once the
  ``wecom_aibot`` sink has set the final answer (see adapters/wecom/aibot_sink.py);
* an **event** (enter_chat, template_card_event, feedback_event, …): published, answered empty —
  except ``enter_chat`` with ``welcome`` (answered with that text) or ``welcome_wait`` (the answer a
  route's agent gives within that many seconds is the welcome; a later one is a dead letter saying
  so: WeCom takes a welcome only as the answer to the callback, within 5 s).

Per message the source keeps a small hash under ``state_key("wecom_aibot", <envelope id>)``: the
arrival time, the end of the stream window, the response_url. The sink reads it, since a reply
delivery carries the origin's id but not its meta. ``final_by`` in that hash says who delivers the
final answer (``stream`` or ``response_url``); it is set once (HSETNX), so the answer is shown once.

Config::

    [[inbound]]
    name = "aibot"
    type = "wecom_aibot"
    path = "/wecom/aibot"
    token = "${AIBOT_TOKEN}"
    encoding_aes_key = "${AIBOT_AES_KEY}"
    reply_via = "aibot_reply"       # an outbound of type wecom_aibot
    # stream = true                 # answer with a stream (false: empty answer; replies use response_url)
    # stream_window = 330           # seconds an answer may still go into the stream (WeCom polls ≤ 360)
    # welcome = ""                  # static answer to enter_chat (the user opened the chat)
    # welcome_wait = 0              # else: seconds (≤ 4.5) to wait for a routed answer to enter_chat
    # timestamp_tolerance = 300     # seconds, 0 = off
    # dedupe_ttl = 86400
    # max_body = 32768
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import msgspec
from aiohttp import web

from adapters.wechat.callback import InboundOptions, check_aes_key, read_body
from adapters.wechat.crypto import WXBizMsgCrypt
from adapters.wechat.parsing import CallbackRefused, field, parse_json_object
from adapters.wecom.aibot_state import ADAPTER, FinalBy, StreamState
from adapters.wecom.app_callback import WeComSigned
from bridge.adapter import Context
from bridge.config import Secret
from bridge.envelope import Attachment, Conversation, Envelope, Sender, make_envelope, stable_id

#: stream content and response_url markdown are each at most this many UTF-8 bytes
CONTENT_MAX_BYTES = 20_480
#: WeCom keeps polling a stream for at most this long
STREAM_MAX_WINDOW = 360
#: WeCom takes a welcome within 5 s of enter_chat; this leaves room for the round trip
WELCOME_MAX_WAIT = 4.5

_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STREAM_ID_MAX = 128


class WeComAIBotOptions(InboundOptions, forbid_unknown_fields=True, kw_only=True):
    encoding_aes_key: Secret
    #: answer messages with a stream reply and serve WeCom's stream refreshes from the drafts
    stream: bool = True
    #: seconds after a message during which its answer still goes into the stream
    stream_window: int = 330
    #: static answer to enter_chat
    welcome: str = ""
    #: seconds to wait for a routed answer to enter_chat (0: none)
    welcome_wait: float = 0.0

    def check(self) -> None:
        super().check()
        check_aes_key(self.encoding_aes_key)
        if len(self.welcome.encode()) > CONTENT_MAX_BYTES:
            raise ValueError(f"welcome: at most {CONTENT_MAX_BYTES} UTF-8 bytes")
        if not 0 <= self.welcome_wait <= WELCOME_MAX_WAIT:
            raise ValueError(f"welcome_wait: must be between 0 (off) and {WELCOME_MAX_WAIT} seconds")
        if not 1 <= self.stream_window <= STREAM_MAX_WINDOW:
            raise ValueError(f"stream_window: must be between 1 and {STREAM_MAX_WINDOW} seconds")


class _Outer(msgspec.Struct):
    encrypt: str


_outer = msgspec.json.Decoder(_Outer)


def fit(text: str, limit: int = CONTENT_MAX_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, never inside a code point."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def _obj(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _content(item: dict[str, Any], nested: bool = False) -> tuple[str, list[Attachment]]:
    """Text and attachments of one message item (the message itself, a mixed item, a quote)."""
    t = field(item, "msgtype")
    body = _obj(item, t) if t else {}
    if t in ("text", "voice"):  # voice arrives already as text
        return field(body, "content"), []
    if t in ("image", "file"):
        url = field(body, "url") or None
        # the file behind the URL is AES-encrypted (doc 100719), with the callback's key in HTTP mode
        # and with the per-URL aeskey in WebSocket mode; 5 min valid
        extra: dict[str, Any] = {"encrypted": True}
        if field(body, "aeskey"):
            extra["aeskey"] = field(body, "aeskey")
        return "", [Attachment("image" if t == "image" else "file", url=url, extra=extra)]
    if t == "mixed" and not nested:  # a mixed item is never itself mixed
        texts: list[str] = []
        atts: list[Attachment] = []
        items = body.get("msg_item")
        for it in items if isinstance(items, list) else []:
            if isinstance(it, dict):
                txt, a = _content(it, nested=True)
                if txt:
                    texts.append(txt)
                atts += a
        return "\n".join(texts), atts
    return "", [Attachment("other", extra={"msg_type": t})] if t else []


def aibot_envelope(source: str, msg: dict[str, Any], stream: bool) -> tuple[Envelope, str]:
    """A decrypted AI-bot callback (not a stream refresh) as an envelope, and its dedupe key."""
    msg_type = field(msg, "msgtype")
    msg_id = field(msg, "msgid")
    user = field(_obj(msg, "from"), "userid")
    chat_id = field(msg, "chatid")
    chat_type = field(msg, "chattype")
    if chat_type == "group" and chat_id:
        conv = Conversation(chat_id, "group")
    elif user:
        conv = Conversation(user, "direct")
    else:
        raise CallbackRefused(400, "payload has no from.userid")
    key = (
        stable_id(source, "msg", msg_id)
        if msg_id
        else stable_id(source, "payload", msgspec.json.encode(msg).decode())
    )
    meta = {"msg_type": msg_type, "chat_type": chat_type}
    for k, v in (
        ("msg_id", msg_id),
        ("aibot_id", field(msg, "aibotid")),
        ("response_url", field(msg, "response_url")),
    ):
        if v:
            meta[k] = v
    kind = "event" if msg_type == "event" else "message"
    event = field(_obj(msg, "event"), "eventtype") if kind == "event" else None
    text, attachments = ("", []) if kind == "event" else _content(msg)
    if event == "template_card_event":  # a card button click: routes match its key as the text
        card = _obj(_obj(msg, "event"), "template_card_event")
        for k in ("event_key", "task_id", "card_type"):
            if field(card, k):
                meta[k] = field(card, k)
        text = field(card, "event_key")
    quote = _obj(msg, "quote")
    if quote:
        meta["quote_msg_type"] = field(quote, "msgtype")
        qtext, _ = _content(quote)
        if qtext:
            meta["quote_text"] = qtext
    if stream and kind == "message":
        meta["stream_id"] = key
    created = msg.get("create_time")
    if not isinstance(created, int) or isinstance(created, bool):
        created = None  # not a time: left out, as before
    elif not 0 <= created < 2**40:
        raise CallbackRefused(400, "bad create_time")  # float() of 10**400 would overflow
    aibot_id = field(msg, "aibotid")
    env = make_envelope(
        source,
        conv,
        text,
        id=key,
        kind=kind,
        sender=Sender(user) if user else None,
        # group messages reach the bot only when it is @-mentioned; a single chat is addressed to it
        mentions=[aibot_id] if conv.kind == "group" and aibot_id and kind == "message" else [],
        mentions_me=kind == "message",
        attachments=attachments,
        event=event,
        meta=meta,
        raw=msg,
        **({"created_at": float(created)} if created is not None else {}),
    )
    return env, key


class WeComAIBotSource(WeComSigned):
    Options = WeComAIBotOptions
    options: WeComAIBotOptions
    type_name = "wecom_aibot"

    def __init__(self, name: str, options: WeComAIBotOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self._crypt: WXBizMsgCrypt = self.crypt("", options.encoding_aes_key)

    async def accept(self, request: web.Request, query: dict[str, str]) -> web.Response:
        sig, ts, nonce = self.signed_query(query)
        if not _NONCE_RE.fullmatch(nonce):
            raise CallbackRefused(400, "bad nonce")  # the reply echoes it; WeCom's are short and plain
        body = await read_body(request, self.options.max_body)
        self.fresh(ts)  # again: the body may have taken a while
        try:
            encrypt = _outer.decode(body).encrypt
        except (ValueError, RecursionError):  # msgspec.DecodeError/ValidationError, UnicodeDecodeError
            raise CallbackRefused(400, "body: malformed JSON or no encrypt") from None
        if not encrypt:
            raise CallbackRefused(400, "body has no encrypt")
        msg = parse_json_object(self._crypt.verify_and_decrypt(sig, ts, nonce, encrypt), "message")
        msg_type = field(msg, "msgtype")
        if not msg_type:
            raise CallbackRefused(400, "payload has no msgtype")
        if msg_type == "stream":
            stream_id = field(_obj(msg, "stream"), "id")
            if not stream_id or len(stream_id) > _STREAM_ID_MAX:
                raise CallbackRefused(400, "stream refresh without a stream id")
            return self._reply(await self.stream_state(stream_id), nonce)
        env, key = aibot_envelope(self.name, msg, self.options.stream)
        await self._remember(env)
        await self.publish(env, key)
        if env.kind == "message" and self.options.stream:
            return self._reply(await self.stream_state(env.id), nonce)
        if env.event == "enter_chat" and (self.options.welcome or self.options.welcome_wait):
            text = self.options.welcome or await self._routed_welcome(env.id)
            if text:
                self.log.info("wecom_aibot.welcomed", envelope=env.id, routed=not self.options.welcome)
                return self._reply_json({"msgtype": "text", "text": {"content": fit(text)}}, nonce)
        return web.Response(status=200, body=b"", content_type="text/plain")

    async def _routed_welcome(self, envelope: str) -> str:
        """The answer the wecom_aibot sink drafted for an enter_chat within ``welcome_wait``, or ""
        (then the sink's answer, too late, goes to a dead letter saying why)."""
        state = self.state(envelope)
        end = time.monotonic() + self.options.welcome_wait
        while True:
            draft = await self.ctx.get_draft(envelope)
            if draft is not None and draft[1]:
                if await state.claim_final(FinalBy.STREAM) or await state.final_by() is FinalBy.STREAM:
                    return draft[0]
                return ""
            if time.monotonic() >= end:
                await state.claim_final(FinalBy.RESPONSE_URL)  # the sink stops waiting
                return ""
            await asyncio.sleep(0.05)

    async def _remember(self, env: Envelope) -> None:
        """Keep what the sink needs later: arrival time, stream deadline, response_url.

        Written before the publish and idempotent (HSETNX), so a retried callback keeps the first
        arrival time; if Redis fails here nothing is published and the caller gets 503.
        """
        now = time.time()
        streamed = env.kind == "message" and self.options.stream
        welcome = env.event == "enter_chat" and not self.options.welcome and self.options.welcome_wait > 0
        window = self.options.stream_window if streamed else self.options.welcome_wait if welcome else 0
        await self.state(env.id).remember(
            now, now + window if window else None, env.meta.get("response_url", "")
        )

    def state(self, envelope_id: str) -> StreamState:
        return StreamState(self.ctx.redis, self.ctx.state_key(ADAPTER, envelope_id))

    async def stream_state(self, stream_id: str) -> tuple[str, bool, str]:
        """(content, finish, stream id) to show for a stream now."""
        state = self.state(stream_id)
        now = await state.read()
        if now is None:  # not a stream of ours (or long gone): tell WeCom to stop polling
            return "", True, stream_id
        draft = await self.ctx.get_draft(stream_id)
        text, final = draft if draft is not None else ("", False)
        owner = now.final_by
        if final and owner is None:
            if await state.claim_final(FinalBy.STREAM):
                owner = FinalBy.STREAM
                self.log.info("wecom_aibot.stream_final", envelope=stream_id)
            else:
                owner = await state.final_by()
        if owner is FinalBy.RESPONSE_URL:  # the answer went (or goes) to response_url: end the stream
            return ("" if final else fit(text)), True, stream_id
        return fit(text), final, stream_id

    def _reply(self, state: tuple[str, bool, str], nonce: str) -> web.Response:
        content, finish, stream_id = state
        body = {"msgtype": "stream", "stream": {"id": stream_id, "finish": finish, "content": content}}
        return self._reply_json(body, nonce)

    def _reply_json(self, body: dict[str, Any], nonce: str) -> web.Response:
        reply = self._crypt.reply_json(msgspec.json.encode(body), str(int(time.time())), nonce)
        return web.Response(status=200, body=reply, content_type="text/plain")
