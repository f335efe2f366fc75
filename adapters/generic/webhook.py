"""``webhook``: a signed JSON POST becomes an envelope (dashboards, CI, workflow tools → WeChat).

The signature scheme is the ``http`` sink's: ``X-Bridge-Timestamp`` (unix seconds) and
``X-Bridge-Signature: sha256=<hex>`` of HMAC-SHA256(secret, f"{timestamp}.{body}"). Body::

    {"id": "optional, dedupes retries", "conversation": "room-1" | {"id", "kind", "title"},
     "text": "...", "sender": "optional" | {"id", "name"}, "mentions_me": false}

Answers 200 ``{"envelope": id, "duplicate": bool}`` once stored; 401 on a bad or missing signature,
400 on a bad body, 408 on a body slower than the read deadline, 413 on one over ``max_body``, 503 when
Redis is unreachable (retry).

Order, cheapest first: the signature headers present and well formed and the timestamp fresh,
before a byte of the body is read (a refusal here closes the connection, the body unread); then the
body streamed against ``max_body``; freshness again once it is complete; then the HMAC in constant
time; only then the JSON. A post without ``id`` is deduplicated by its signature for
``timestamp_tolerance`` seconds: a replay of it inside the window is answered as a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

import msgspec
from aiohttp import web

from adapters.generic.http_sink import sign
from bridge import limits, refusals
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
    #: bytes; a larger body is refused with 413 (streamed: never buffered past this)
    max_body: int = 262_144

    def check(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError("path: must start with '/'")
        if not 1024 <= self.max_body <= 16 * 1_048_576:
            raise ValueError("max_body: must be between 1024 and 16777216 bytes")
        if self.timestamp_tolerance < 0:
            raise ValueError("timestamp_tolerance: must be 0 (off) or a number of seconds")
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

    def _headers_ok(self, request: web.Request) -> tuple[str, str]:
        """(timestamp, signature) from well-formed, fresh headers, checked before the body is read;
        ("", "") when posts are unsigned."""
        if self.options.secret is None:
            return "", ""
        ts = request.headers.get("X-Bridge-Timestamp", "")
        sig = request.headers.get("X-Bridge-Signature", "")
        if not ts or not sig:
            raise _Refused(401, "missing signature")
        if not (ts.isascii() and ts.isdigit() and len(ts) <= 12):
            raise _Refused(401, "bad timestamp")
        if not (sig.isascii() and sig.startswith("sha256=") and len(sig) == 71):
            raise _Refused(401, "bad signature")
        self._fresh(ts)
        return ts, sig

    def _fresh(self, ts: str) -> None:
        tol = self.options.timestamp_tolerance
        if tol and abs(time.time() - int(ts)) > tol:
            raise _Refused(401, "stale timestamp")

    def _verify(self, ts: str, sig: str, body: bytes) -> None:
        secret = self.options.secret
        if secret is None:
            return
        self._fresh(ts)  # again: the body may have taken a while to arrive
        if not hmac.compare_digest(sign(secret.reveal(), ts, body).encode(), sig.encode()):
            raise _Refused(401, "bad signature")

    async def handle(self, request: web.Request) -> web.Response:
        try:
            ts, sig = self._headers_ok(request)
        except _Refused as e:
            return self._refuse(request, e, close=True)  # the body is never read
        try:
            body = await limits.read_capped(request, self.options.max_body, None, _Refused)
            self._verify(ts, sig, body)
        except _Refused as e:
            return self._refuse(request, e, close=e.status != 401)
        try:
            b = _decoder.decode(body)
        except (msgspec.MsgspecError, ValueError) as e:  # ValueError: invalid UTF-8 among them
            return web.json_response({"error": f"bad body: {e}"[:200]}, status=400)
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
        key, ttl = b.id, self.options.dedupe_ttl
        if key is None and sig:
            # no id: a replay carries the same signature; remember it as long as it could be fresh
            key = "sig:" + hashlib.sha256(sig.encode()).hexdigest()[:32]
            ttl = max(1, 2 * self.options.timestamp_tolerance) if self.options.timestamp_tolerance else ttl
        stored = await self.ctx.publish(env, dedupe_key=key, dedupe_ttl=ttl)
        return web.json_response({"envelope": env.id, "duplicate": not stored})

    def _refuse(self, request: web.Request, e: _Refused, *, close: bool) -> web.Response:
        refusals.note(self.log, "webhook.refused", self.name, e.reason, remote=request.remote)
        resp = web.json_response({"error": e.reason}, status=e.status)
        if close:
            resp.force_close()
        return resp


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
