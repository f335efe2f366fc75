"""``wecom_webhook``: post to a WeCom group through a group robot's webhook (send-only).

One sink is one robot, i.e. one group: the delivery's conversation is not used. ``key`` takes the
robot's key or its whole webhook URL (``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=…``;
the key is taken from it, and the URL's host becomes ``api_base`` unless that is set).

- Text is cut to ``text_limit`` bytes (2048), markdown to ``markdown_limit`` (4096), numbered parts
  sent in order, each once (a retry resumes after the last part sent).
- Mentions (text messages; carried by the first part): the sink's ``mentions`` (user ids, ``@all``)
  and ``mention_mobiles``, the envelope's ``meta.mentioned_list`` / ``meta.mentioned_mobile_list``
  (comma-separated), and, with ``mentions_from_envelope = true``, the envelope's ``mentions`` (off by
  default: they are ids on the source platform). In markdown, user ids are written as ``<@userid>``
  at the end; ``@all`` and mobiles, which markdown cannot carry, go in a short text message after it
  (``mention_text``).
- Attachments: links → news (≤ 8 articles a message); images (``extra.base64`` or ``url``) → image
  (base64 + md5, ≤ 2 MB; bigger ones go as files); files, voice and video (``extra.base64`` or
  ``url``) → ``upload_media`` then file (6 B..20 MB; past that the link is sent as text). Anything
  else becomes a line of text: nothing is dropped.
- Rate: WeCom allows 20 messages a minute per robot, so the default rate is ``20/minute`` (every
  part counts). Use one sink per robot key.

Config::

    [[outbound]]
    name = "team-robot"
    type = "wecom_webhook"
    key = "${WECOM_ROBOT_KEY}"           # or the whole webhook URL
    # api_base = "https://qyapi.weixin.qq.com"
    # timeout = 10.0
    # text_limit = 2048
    # markdown_limit = 4096
    # markdown = true
    # number_parts = true
    # mentions = ["@all"]                 # user ids to @ on every message
    # mention_mobiles = []
    # mentions_from_envelope = false
    # mention_text = "⬆"
    # max_download = 20971520             # bytes fetched from an attachment's url at most
    # backoff = 60.0                      # seconds to wait after 45009 (the robot's 20/minute)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import msgspec

from adapters.wechat.client import WECOM_API, JsonApi
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wechat.parts import (
    Part,
    attachment_line,
    check_limit,
    fits,
    news_parts,
    send_parts,
    text_parts,
)
from bridge.adapter import Context, SendContext, Sink
from bridge.config import Secret
from bridge.envelope import Attachment, Delivery, Envelope
from bridge.errors import PermanentError, RetryableError

IMAGE_MAX = 2 * 1024 * 1024
FILE_MIN, FILE_MAX = 6, 20 * 1024 * 1024


def parse_key(value: str) -> tuple[str, str | None]:
    """(key, api base from a URL or None) from a key or a whole webhook URL; ValueError if neither."""
    v = value.strip()
    if v.startswith(("http://", "https://")):
        url = urlsplit(v)
        keys = parse_qs(url.query).get("key") or [""]
        if not keys[0]:
            raise ValueError("key: the webhook URL has no key= parameter")
        return keys[0], f"{url.scheme}://{url.netloc}"
    if not v or any(c in v for c in "/?&= "):
        raise ValueError("key: expected the robot's key or its whole webhook URL")
    return v, None


class WeComWebhookSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: Secret
    api_base: str | None = None
    timeout: float = 10.0
    text_limit: int = 2048
    markdown_limit: int = 4096
    markdown: bool = True
    number_parts: bool = True
    mentions: list[str] = []
    mention_mobiles: list[str] = []
    mentions_from_envelope: bool = False
    mention_text: str = "⬆"
    max_download: int = FILE_MAX
    backoff: float = 60.0

    def check(self) -> None:
        parse_key(self.key.reveal())
        if self.api_base is not None and not self.api_base.startswith(("http://", "https://")):
            raise ValueError("api_base: expected an http:// or https:// URL")
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        check_limit("text_limit", self.text_limit, 2048)
        check_limit("markdown_limit", self.markdown_limit, 4096)
        if not self.mention_text.strip():
            raise ValueError("mention_text: must not be empty")
        if self.max_download < 1:
            raise ValueError("max_download: must be positive")
        if self.backoff <= 0:
            raise ValueError("backoff: must be positive")


def _csv(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def _link_fits(a: Attachment) -> bool:
    return bool(a.url) and fits(a.title or a.name, 128) and fits(a.description, 512)


def _has_bytes(a: Attachment) -> bool:
    b64 = a.extra.get("base64")
    return bool(a.url) or (isinstance(b64, str) and bool(b64))


class WeComWebhookSink(Sink):
    Options = WeComWebhookSinkOptions
    options: WeComWebhookSinkOptions
    default_rate = "20/minute"

    def __init__(self, name: str, options: WeComWebhookSinkOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        key, base = parse_key(options.key.reveal())
        self._key = Secret(key)
        self.api = JsonApi(options.api_base or base or WECOM_API, ctx.http, options.timeout)

    # -- what to send ------------------------------------------------------------------------------

    def mentions(self, env: Envelope) -> tuple[list[str], list[str]]:
        """(user ids incl. "@all", mobiles) to @ for this envelope."""
        users = [*self.options.mentions, *_csv(env.meta.get("mentioned_list"))]
        if self.options.mentions_from_envelope:
            users += env.mentions
        mobiles = [*self.options.mention_mobiles, *_csv(env.meta.get("mentioned_mobile_list"))]
        return list(dict.fromkeys(users)), list(dict.fromkeys(mobiles))

    def render(self, env: Envelope) -> list[Part]:
        o = self.options
        lines: list[str] = []
        natives: list[Part] = []
        links: list[Attachment] = []
        for a in env.attachments:
            if a.kind == "link" and _link_fits(a):
                links.append(a)
                continue
            natives += news_parts(links)
            links = []
            if a.kind == "image" and _has_bytes(a):
                natives.append(Part("image", attachment=a))
            elif a.kind in ("file", "voice", "video") and _has_bytes(a):
                natives.append(Part("file", attachment=a))
            else:
                lines.append(attachment_line(a))
        natives += news_parts(links)
        text = "\n".join(x for x in (env.text, *lines) if x)
        users, mobiles = self.mentions(env)
        is_md = env.format == "markdown" and o.markdown
        tail: list[Part] = []
        if is_md:
            inline = [u for u in users if u != "@all"]
            if inline:
                text = f"{text}\n\n" + " ".join(f"<@{u}>" for u in inline)
            rest: dict[str, Any] = {}
            if "@all" in users:
                rest["mentioned_list"] = ["@all"]
            if mobiles:
                rest["mentioned_mobile_list"] = mobiles
            if rest:
                tail.append(Part("text", {"content": o.mention_text, **rest}))
        elif (users or mobiles) and not text:
            text = o.mention_text
        parts = text_parts(
            text, markdown=is_md, text_limit=o.text_limit, markdown_limit=o.markdown_limit,
            number_parts=o.number_parts,
        )  # fmt: skip
        if not is_md and parts and (users or mobiles):
            if users:
                parts[0].payload["mentioned_list"] = users
            if mobiles:
                parts[0].payload["mentioned_mobile_list"] = mobiles
        return parts + tail + natives

    # -- sending -----------------------------------------------------------------------------------

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        parts = self.render(delivery.envelope)
        if not parts:
            raise PermanentError("nothing to send: the envelope has no text and no attachment")

        async def one(i: int, part: Part) -> str | None:
            await self._post(await self._resolve(part))
            return None

        await send_parts(ctx, parts, one)
        return f"webhook:{len(parts)}"

    async def _post(self, part: Part) -> None:
        body = {"msgtype": part.msgtype, part.msgtype: part.payload}
        try:
            await self.api.request(
                "POST", "/cgi-bin/webhook/send", params={"key": self._key.reveal()}, body=body
            )
        except ApiError as e:
            raise send_error(e, target="webhook", backoff=self.options.backoff) from None

    async def _resolve(self, part: Part) -> Part:
        """A part ready to post: attachments downloaded, encoded or uploaded."""
        a = part.attachment
        if a is None:
            return part
        data = await self._bytes(a)
        if part.msgtype == "image" and data is not None and len(data) <= IMAGE_MAX:
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            return Part("image", {"base64": base64.b64encode(data).decode(), "md5": md5})
        if data is not None and FILE_MIN <= len(data) <= FILE_MAX:
            return Part("file", {"media_id": await self._upload(a, data)})
        size = "more than the webhook takes" if data is None else f"{len(data)} bytes"
        if a.url:  # too big or too small for the robot: the link instead
            return Part("text", {"content": attachment_line(a)})
        raise PermanentError(
            f"the {a.kind} attachment {a.name or ''} is {size}: a group robot takes files of "
            f"{FILE_MIN} B to 20 MB"
        )

    async def _bytes(self, a: Attachment) -> bytes | None:
        """The attachment's bytes (``extra.base64`` or its url); None when past max_download."""
        b64 = a.extra.get("base64")
        if isinstance(b64, str) and b64:
            try:
                data = base64.b64decode(b64, validate=True)
            except binascii.Error:
                raise PermanentError(f"the {a.kind} attachment's extra.base64 is not valid base64") from None
            return data if len(data) <= self.options.max_download else None
        url = a.url or ""
        host = urlsplit(url).netloc or "?"
        try:
            timeout = aiohttp.ClientTimeout(total=self.options.timeout * 6)
            async with self.ctx.egress.get(self.ctx.http(), url, timeout=timeout) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise RetryableError(
                        f"downloading the {a.kind} attachment: HTTP {resp.status} from {host}"
                    )
                if resp.status != 200:
                    raise PermanentError(
                        f"downloading the {a.kind} attachment: HTTP {resp.status} from {host}"
                    )
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    buf += chunk
                    if len(buf) > self.options.max_download:
                        return None
                return bytes(buf)
        except TimeoutError:
            raise RetryableError(f"downloading the {a.kind} attachment from {host} timed out") from None
        except aiohttp.ClientError as e:
            raise RetryableError(
                f"downloading the {a.kind} attachment from {host}: {type(e).__name__}"
            ) from None

    async def _upload(self, a: Attachment, data: bytes) -> str:
        name = a.name or PurePosixPath(urlsplit(a.url or "").path).name or f"{a.kind}.bin"
        form = aiohttp.FormData()
        form.add_field(
            "media", io.BytesIO(data), filename=name, content_type=a.mime or "application/octet-stream"
        )
        try:
            answer = await self.api.request(
                "POST", "/cgi-bin/webhook/upload_media", params={"key": self._key.reveal(), "type": "file"},
                data=form,
            )  # fmt: skip
        except ApiError as e:
            raise send_error(e, target="webhook", backoff=self.options.backoff) from None
        return str(answer["media_id"])
