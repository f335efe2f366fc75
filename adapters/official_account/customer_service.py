"""``wechat_oa``: Official Account customer-service messages (``message/custom/send``).

The conversation (the delivery's, else the envelope's) is the follower's openid; an ``openid:``
prefix is accepted. WeChat takes these messages only within 48 hours of the follower's last
message to the account: past that the API answers 45015, which dead-letters with that reason.

Text is cut to ``text_limit`` bytes (2048) and sent as numbered parts, in order, each once (a retry
resumes after the last part sent). Official Accounts have no markdown: markdown is sent as its
text. Link attachments become news (one article each, WeChat's limit), image/voice/video
attachments with an OA ``media_id`` that media message; anything else becomes a line of text.

The access token (app_id + app_secret, ``/cgi-bin/token``) is cached in Redis and shared by every
instance like WeCom's; it is refreshed early at ``refresh_ratio`` of its life (a new OA token
supersedes the old one, which WeChat keeps valid for 5 more minutes) and refetched once when WeChat
answers 40001/40014/42001/41001.

Config::

    [[outbound]]
    name = "oa"
    type = "wechat_oa"
    app_id = "wx0123456789abcdef"
    app_secret = "${WECHAT_OA_SECRET}"
    # api_base = "https://api.weixin.qq.com"
    # timeout = 10.0
    # text_limit = 2048
    # number_parts = true
    # kf_account = ""                # send as this customer-service account (kf@account)
    # refresh_ratio = 0.8
    # backoff = 60.0                 # seconds to wait after 45009
"""

from __future__ import annotations

from typing import Any

import msgspec

from adapters.wechat.client import OA_API, OfficialAccountApi
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wechat.parts import (
    Part,
    article,
    attachment_line,
    check_limit,
    fits,
    send_parts,
    text_parts,
)
from bridge.adapter import Context, SendContext, Sink
from bridge.config import Secret
from bridge.envelope import Delivery, Envelope
from bridge.errors import PermanentError


class OAOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    app_id: str
    app_secret: Secret
    api_base: str = OA_API
    timeout: float = 10.0
    text_limit: int = 2048
    number_parts: bool = True
    kf_account: str = ""
    refresh_ratio: float = 0.8
    backoff: float = 60.0

    def check(self) -> None:
        if not self.app_id:
            raise ValueError("app_id: required")
        if not self.app_secret:
            raise ValueError("app_secret: required")
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError("api_base: expected an http:// or https:// URL")
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        check_limit("text_limit", self.text_limit, 2048)
        if not 0.1 <= self.refresh_ratio <= 0.95:
            raise ValueError("refresh_ratio: must be between 0.1 and 0.95")
        if self.backoff <= 0:
            raise ValueError("backoff: must be positive")


def openid_of(delivery: Delivery) -> str:
    conv = delivery.conversation or delivery.envelope.conversation.id
    return conv.removeprefix("openid:")


def render(env: Envelope, *, text_limit: int, number_parts: bool) -> list[Part]:
    lines: list[str] = []
    natives: list[Part] = []
    for a in env.attachments:
        if a.kind == "link" and a.url and fits(a.title or a.name, 128) and fits(a.description, 512):
            natives.append(Part("news", {"articles": [article(a)]}))
        elif a.kind in ("image", "voice", "video") and a.media_id:
            payload: dict[str, Any] = {"media_id": a.media_id}
            if a.kind == "video":
                payload["thumb_media_id"] = a.extra.get("thumb_media_id", a.media_id)
            natives.append(Part(a.kind, payload))
        else:
            lines.append(attachment_line(a))
    text = "\n".join(x for x in (env.text, *lines) if x)
    parts = text_parts(text, markdown=False, text_limit=text_limit, markdown_limit=text_limit,
                       number_parts=number_parts)  # fmt: skip
    return parts + natives


class WeChatOASink(Sink):
    Options = OAOptions
    options: OAOptions
    # custom/send allows 500,000 calls a day: 300/minute stays under it
    default_rate = "300/minute"

    def __init__(self, name: str, options: OAOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.api = OfficialAccountApi(
            app_id=options.app_id,
            app_secret=options.app_secret,
            api_base=options.api_base,
            http=ctx.http,
            timeout=options.timeout,
            redis=ctx.redis,
            state_key=ctx.state_key,
            refresh_ratio=options.refresh_ratio,
        )

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        openid = openid_of(delivery)
        parts = render(
            delivery.envelope, text_limit=self.options.text_limit, number_parts=self.options.number_parts
        )
        if not parts:
            raise PermanentError("nothing to send: the envelope has no text and no attachment")

        async def one(i: int, part: Part) -> str | None:
            body: dict[str, Any] = {"touser": openid, "msgtype": part.msgtype, part.msgtype: part.payload}
            if self.options.kf_account:
                body["customservice"] = {"kf_account": self.options.kf_account}
            try:
                await self.api.call("POST", "/cgi-bin/message/custom/send", body=body)
            except ApiError as e:
                raise send_error(
                    e, target=f"openid {openid}", backoff=self.options.backoff, oa=True
                ) from None
            return None

        await send_parts(ctx, parts, one)
        return f"oa:{openid}:{len(parts)}"
