"""``webhook``: a signed JSON POST becomes an envelope (dashboards, CI, workflow tools → WeChat).

The signature scheme is the ``http`` sink's: ``X-Bridge-Timestamp`` (unix seconds) and
``X-Bridge-Signature: sha256=<hex>`` of HMAC-SHA256(secret, f"{timestamp}.{body}"). Body::

    {"id": "optional, dedupes retries", "conversation": "room-1" | {"id", "kind", "title"},
     "text": "...", "sender": "optional" | {"id", "name"}, "mentions_me": false}

Answers 200 ``{"envelope": id, "duplicate": bool}`` once stored; 401 on a bad or missing signature,
400 on a bad body, 503 when Redis is unreachable (retry).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Sequence

import msgspec
from aiohttp import web

from adapters.generic.http_sink import sign
from bridge.adapter import HttpRoute, Source
from bridge.config import Secret
from bridge.envelope import Conversation, Sender, make_envelope, stable_id


class WebhookSourceOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    secret: Secret | None = None
    #: accept unsigned posts (only behind a proxy that authenticates)
    allow_unsigned: bool = False
    #: seconds a timestamp may differ from now (0 = off)
    timestamp_tolerance: int = 300
    dedupe_ttl: int = 86_400

    def check(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path: must start with '/'")
        if self.secret is None and not self.allow_unsigned:
            raise ValueError("secret: required (or set allow_unsigned = true)")


class _Conv(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    kind: str = "direct"
    title: str | None = None


class _Sender(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    name: str | None = None


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    conversation: str | _Conv
    text: str = ""
    id: str | None = None
    sender: str | _Sender | None = None
    mentions_me: bool = False


_decoder = msgspec.json.Decoder(_Body)


class WebhookSource(Source):
    Options = WebhookSourceOptions
    options: WebhookSourceOptions

    def routes(self) -> Sequence[HttpRoute]:
        return [HttpRoute("POST", self.options.path, self.handle)]

    def _verified(self, request: web.Request, body: bytes) -> str | None:
        """None when the request may pass, else why not."""
        secret = self.options.secret
        if secret is None:
            return None
        ts = request.headers.get("X-Bridge-Timestamp", "")
        sig = request.headers.get("X-Bridge-Signature", "")
        if not ts.isdigit() or not sig:
            return "missing signature"
        tol = self.options.timestamp_tolerance
        if tol and abs(time.time() - int(ts)) > tol:
            return "stale timestamp"
        if not hmac.compare_digest(sign(secret.reveal(), ts, body), sig):
            return "bad signature"
        return None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        why = self._verified(request, body)
        if why:
            self.log.warning("webhook.refused", reason=why, remote=request.remote)
            return web.json_response({"error": why}, status=401)
        try:
            b = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"bad body: {e}"}, status=400)
        conv = (
            Conversation(b.conversation)
            if isinstance(b.conversation, str)
            else Conversation(
                b.conversation.id,
                "group" if b.conversation.kind == "group" else "direct",
                b.conversation.title,
            )
        )
        sender = (
            Sender(b.sender)
            if isinstance(b.sender, str)
            else Sender(b.sender.id, b.sender.name)
            if b.sender
            else None
        )
        env = make_envelope(
            self.name,
            conv,
            b.text,
            id=stable_id(self.name, b.id) if b.id else None,
            sender=sender,
            mentions_me=b.mentions_me,
        )
        stored = await self.ctx.publish(env, dedupe_key=b.id, dedupe_ttl=self.options.dedupe_ttl)
        return web.json_response({"envelope": env.id, "duplicate": not stored})
