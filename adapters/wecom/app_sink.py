"""``wecom_app``: send as a WeCom self-built app, to the group chats it created or to members.

Where a delivery goes (the conversation is the delivery's, else the envelope's):

- ``chat:<chatid>`` → ``appchat/send`` (a group chat the app created: ``wechat-bridge wecom appchat
  create``); ``user:<userid>`` (or ``user:a|b``, ``user:@all``) → ``message/send`` touser;
  ``party:<id>`` → toparty; ``tag:<id>`` → totag. Route targets and ``default_conversation`` of
  this sink must carry one of these prefixes (checked at start).
- A bare id is accepted only when it is the envelope's own conversation, i.e. a reply going home
  or a route without a target: a ``group`` conversation is an app chat, a ``direct`` one a member
  (the ``wecom_app`` inbound's conversations are members, ``direct``).

Text is cut to ``text_limit`` bytes, markdown to ``markdown_limit`` (both 2048 for these APIs; past
that message/send truncates text silently) and sent as numbered parts, in order, each once: a retry
resumes after the last part sent, and message/send carries ``enable_duplicate_check`` so a part
WeCom took before a timeout is not shown twice. A part whose content went to the same member
recently as *another* message is sent without the check, so a legitimate repeat is not dropped.

Link attachments become news (≤ 8 articles each), card attachments textcards, image/file/voice/
video attachments with a WeCom ``media_id`` that media message; anything else (or a card whose
fields WeCom would truncate) becomes a line of text — nothing is dropped.

Quotas: the sink's rate (default 600/minute, well inside WeCom's per-app API limits) and, per
recipient, ``member_rate`` for message/send (WeCom: 30/minute and 1000/hour per member; excess is
dropped silently) and ``chat_rate`` for appchat (WeCom counts 200/minute per member of the chat;
the bridge counts per chat, which is the same for one app's traffic). Every part is charged.

Config::

    [[outbound]]
    name = "wecom"
    type = "wecom_app"
    corp_id = "ww0123456789abcdef"
    corp_secret = "${WECOM_APP_SECRET}"
    agent_id = 1000002
    # api_base = "https://qyapi.weixin.qq.com"
    # timeout = 10.0
    # text_limit = 2048
    # markdown_limit = 2048
    # markdown = true                  # send markdown envelopes as markdown (WeCom client only)
    # number_parts = true
    # duplicate_check = true
    # duplicate_check_interval = 1800  # seconds, at most 14400
    # member_rate = "30/minute, 1000/hour"
    # chat_rate = "200/minute"
    # safe = false                     # confidential messages (no forwarding)
    # backoff = 60.0                   # seconds to wait after 45009 (frequency limit)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from adapters.wechat.client import WECOM_API, WeComApi
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wechat.parts import (
    Part,
    attachment_line,
    check_limit,
    check_rates,
    fits,
    news_parts,
    send_parts,
    text_parts,
)
from bridge.adapter import Context, SendContext, Sink
from bridge.config import Rate, Secret
from bridge.envelope import Attachment, Delivery, Envelope
from bridge.errors import ConfigError, PermanentError

PREFIXES = ("chat", "user", "party", "tag")
MEDIA_KINDS = ("image", "file", "voice", "video")


class WeComAppSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    corp_id: str
    corp_secret: Secret
    agent_id: int
    api_base: str = WECOM_API
    timeout: float = 10.0
    text_limit: int = 2048
    markdown_limit: int = 2048
    markdown: bool = True
    number_parts: bool = True
    duplicate_check: bool = True
    duplicate_check_interval: int = 1800
    member_rate: str = "30/minute, 1000/hour"
    chat_rate: str = "200/minute"
    safe: bool = False
    backoff: float = 60.0

    def check(self) -> None:
        if not self.corp_id:
            raise ValueError("corp_id: required")
        if not self.corp_secret:
            raise ValueError("corp_secret: required")
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError("api_base: expected an http:// or https:// URL")
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        check_limit("text_limit", self.text_limit, 2048)
        check_limit("markdown_limit", self.markdown_limit, 2048)
        if not 1 <= self.duplicate_check_interval <= 14400:
            raise ValueError("duplicate_check_interval: must be between 1 and 14400 seconds")
        check_rates("member_rate", self.member_rate)
        check_rates("chat_rate", self.chat_rate)
        if self.backoff <= 0:
            raise ValueError("backoff: must be positive")


@dataclass(frozen=True)
class Target:
    kind: str  # chat | user | party | tag
    id: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


def prefixed(conversation: str) -> Target | None:
    kind, sep, rest = conversation.partition(":")
    return Target(kind, rest) if sep and kind in PREFIXES and rest else None


def target_of(delivery: Delivery) -> Target:
    """Where a delivery goes (see the module's docstring); PermanentError when it cannot tell."""
    env = delivery.envelope
    conv = delivery.conversation or env.conversation.id
    target = prefixed(conv)
    if target is not None:
        return target
    if conv == env.conversation.id:
        return Target("chat" if env.conversation.kind == "group" else "user", conv)
    raise PermanentError(
        f"conversation {conv!r} does not say whether it is an app group chat or a member: write "
        f"chat:{conv} or user:{conv} in the route's conversation or the sink's default_conversation"
    )


def card_fits(a: Attachment) -> bool:
    """WeCom truncates titles past 128 bytes and descriptions past 512: such cards go as text."""
    return bool(a.url) and fits(a.title or a.name, 128) and fits(a.description, 512)


def render(
    env: Envelope, *, text_limit: int, markdown_limit: int, markdown: bool, number_parts: bool
) -> list[Part]:
    """The messages an envelope makes for the app APIs, in order: its text, then attachments."""
    lines: list[str] = []
    natives: list[Part] = []
    links: list[Attachment] = []
    for a in env.attachments:
        if a.kind == "link" and card_fits(a):
            links.append(a)
            continue
        natives += news_parts(links)
        links = []
        if a.kind == "card" and card_fits(a) and a.description:
            card = {"title": a.title or a.name or "", "description": a.description, "url": a.url or ""}
            btn = a.extra.get("btntxt")
            natives.append(
                Part("textcard", {**card, "btntxt": btn} if isinstance(btn, str) and btn else card)
            )
        elif a.kind in MEDIA_KINDS and a.media_id:
            payload: dict[str, Any] = {"media_id": a.media_id}
            if a.kind == "video" and a.title:
                payload["title"] = a.title
            natives.append(Part(a.kind, payload))
        else:
            lines.append(attachment_line(a))
    natives += news_parts(links)
    text = "\n".join(x for x in (env.text, *lines) if x)
    is_md = env.format == "markdown" and markdown
    parts = text_parts(
        text, markdown=is_md, text_limit=text_limit, markdown_limit=markdown_limit, number_parts=number_parts
    )
    return parts + natives


class WeComAppSink(Sink):
    Options = WeComAppSinkOptions
    options: WeComAppSinkOptions
    default_rate = "600/minute"

    def __init__(self, name: str, options: WeComAppSinkOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.api = WeComApi(
            corp_id=options.corp_id,
            corp_secret=options.corp_secret,
            agent_id=options.agent_id,
            api_base=options.api_base,
            http=ctx.http,
            timeout=options.timeout,
            redis=ctx.redis,
            state_key=ctx.state_key,
        )
        self._member_rates = check_rates("member_rate", options.member_rate)
        self._chat_rates = check_rates("chat_rate", options.chat_rate)

    async def start(self) -> None:
        """Refuse route targets that do not say chat: or user: (they would fail every send)."""
        cfg = self.ctx.config
        found: list[tuple[str, str]] = []
        out = cfg.outbound_by_name(self.name)
        if out is not None and out.default_conversation:
            found.append((f"outbound.{self.name}.default_conversation", out.default_conversation))
        for i, r in enumerate(cfg.routes):
            for j, t in enumerate(r.to):
                if t.sink == self.name and t.conversation:
                    found.append((f"routes[{i}].to[{j}].conversation", t.conversation))
        for where, conv in found:
            if prefixed(conv) is None:
                raise ConfigError(
                    f"{cfg.path}: {where}: {conv!r} must say where it goes for a wecom_app sink: "
                    f"chat:<chatid> (an app group chat) or user:<userid> (a member); also party:, tag:"
                )

    def recipient_limits(self, delivery: Delivery) -> Sequence[tuple[str, Sequence[Rate]]]:
        try:
            target = target_of(delivery)
        except PermanentError:
            return ()  # send() says why
        if target.kind == "chat":
            return [(target.key, self._chat_rates)] if self._chat_rates else ()
        if target.kind != "user" or not self._member_rates:
            return ()  # departments and tags: members unknown here
        members = dict.fromkeys(u.lower() for u in target.id.split("|") if u and u != "@all")
        return [(f"user:{m}", self._member_rates) for m in members]

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        target = target_of(delivery)
        o = self.options
        parts = render(
            delivery.envelope, text_limit=o.text_limit, markdown_limit=o.markdown_limit,
            markdown=o.markdown, number_parts=o.number_parts,
        )  # fmt: skip
        if not parts:
            raise PermanentError("nothing to send: the envelope has no text and no attachment")

        async def one(i: int, part: Part) -> str | None:
            return await self._send_part(delivery, target, i, part)

        ids = await send_parts(ctx, parts, one)
        return ",".join(ids) or target.key

    async def _send_part(self, delivery: Delivery, target: Target, i: int, part: Part) -> str | None:
        o = self.options
        body: dict[str, Any]
        if target.kind == "chat":
            path = "/cgi-bin/appchat/send"
            body = {"chatid": target.id, "msgtype": part.msgtype, part.msgtype: part.payload}
        else:
            path = "/cgi-bin/message/send"
            field = {"user": "touser", "party": "toparty", "tag": "totag"}[target.kind]
            body = {
                field: target.id,
                "msgtype": part.msgtype,
                "agentid": o.agent_id,
                part.msgtype: part.payload,
            }
        if o.safe:
            body["safe"] = 1
        if target.kind != "chat" and o.duplicate_check:
            body["enable_duplicate_check"] = int(await self._dedupe_ok(delivery, i, body))
            body["duplicate_check_interval"] = o.duplicate_check_interval
        try:
            answer = await self.api.call("POST", path, body=body)
        except ApiError as e:
            raise send_error(e, target=target.key, backoff=o.backoff) from None
        invalid = {k: answer[k] for k in ("invaliduser", "invalidparty", "invalidtag", "unlicenseduser")
                   if answer.get(k)}  # fmt: skip
        if invalid:
            self.log.warning(
                "wecom.some_recipients_invalid", delivery=delivery.id, target=target.key, **invalid
            )
        msgid = answer.get("msgid")
        return str(msgid) if msgid else None

    async def _dedupe_ok(self, delivery: Delivery, i: int, body: dict[str, Any]) -> bool:
        """May WeCom drop this body as a duplicate? Yes when it is this part sent again (a retry);
        no when another message with the same content went to the same target recently."""
        digest = hashlib.sha256(msgspec.json.encode(body)).hexdigest()[:32]
        key = self.ctx.state_key(self.name, f"dup:{digest}")
        mine = f"{delivery.id}:{i}"
        interval_ms = self.options.duplicate_check_interval * 1000
        if await self.ctx.redis.set(key, mine, nx=True, px=interval_ms):
            return True
        seen = await self.ctx.redis.get(key)
        return seen is None or seen.decode() == mine
