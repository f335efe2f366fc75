"""A client of the Wechaty puppet-service gRPC protocol (the interface every Wechaty puppet exposes).

Speaks ``wechaty.Puppet`` with the Wechaty project's own stubs (PyPI ``wechaty-grpc`` 1.x, asyncio on
grpclib). Why not the ``wechaty`` Python SDK: see the README's Wechaty section.

* Auth: metadata ``authorization: Wechaty <token>`` on every call.
* TLS by default, trusting the Wechaty community CA (``wechaty-ca.pem``, shipped as package data, from
  npm ``wechaty-puppet-service`` auth/ca.js) or a CA of your own, with the server name taken from
  ``server_name`` or else the token's prefix (``insecure_<uuid>`` → ``insecure``), as the Wechaty
  clients do. The public token-discovery service is never used: the endpoint is always explicit.
* Errors become :class:`PuppetError` subclasses whose text never holds the token: the service's
  UNAUTHENTICATED error repeats it (``Invalid Wechaty TOKEN "<token>"``) and sends it back in its
  trailing metadata, so only the status and the masked details are kept.
* Room and contact payloads are cached for ``cache_ttl`` seconds; a room topic change drops the room.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import grpclib.exceptions
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from wechaty_grpc.wechaty import PuppetStub
from wechaty_grpc.wechaty import puppet as pb

from bridge.config import Secret

#: the TypeScript numbering of message types (wechaty-puppet ``types.Message``), which the service
#: sends in ``MessagePayloadResponse.type`` (not the proto enum's numbering)
MESSAGE_TYPES: dict[int, str] = {
    0: "unknown",
    1: "attachment",
    2: "audio",
    3: "contact",
    4: "chat_history",
    5: "emoticon",
    6: "image",
    7: "text",
    8: "location",
    9: "mini_program",
    10: "group_note",
    11: "transfer",
    12: "red_envelope",
    13: "recalled",
    14: "url",
    15: "video",
    16: "post",
}

#: event types of the Event stream (the proto's numbering)
EVENT_TYPES: dict[int, str] = {int(t): t.name.removeprefix("EVENT_TYPE_").lower() for t in pb.EventType}

_TOKEN_IN_TEXT = re.compile(r'(TOKEN\s*)"[^"]*"', re.IGNORECASE)
_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})$")


#: what a call may fail with: gRPC status, a dead connection, a timeout, a broken HTTP/2 stream
_FAILURES = (
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    OSError,
    TimeoutError,
)


class PuppetError(Exception):
    """A failed call to the puppet service; the message is safe to log (no token)."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class AuthError(PuppetError):
    """The service refused the token (UNAUTHENTICATED)."""


class StreamBusy(PuppetError):
    """Another client holds the service's one Event stream (ALREADY_EXISTS)."""


class NotLoggedIn(PuppetError):
    """The puppet has no logged-in account (a send before login)."""


class Unreachable(PuppetError):
    """The service cannot be reached or went away (connection refused, reset, UNAVAILABLE)."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → (host, port); ValueError saying what is wrong."""
    m = _ENDPOINT.match(endpoint.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:8788), got {endpoint!r}")
    return (m["v6"] or m["host"]), int(m["port"])


def token_server_name(token: str) -> str:
    """The TLS server name a Wechaty token implies: its part before the last ``_``, lowercased."""
    i = token.rfind("_")
    return token[:i].lower() if i > 0 else ""


def mask(text: str, token: str) -> str:
    """``text`` without the token, nor anything the service quotes as a token."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_IN_TEXT.sub(r'\1"***"', text)


def community_ca() -> str:
    return resources.files("adapters.wechaty").joinpath("wechaty-ca.pem").read_text()


def ssl_context(ca: str | None) -> ssl.SSLContext:
    """TLS 1.2+, HTTP/2 by ALPN, trusting ``ca`` (PEM text) or else the Wechaty community CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca or community_ca())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _error(call: str, e: BaseException, token: str) -> PuppetError:
    if isinstance(e, grpclib.exceptions.GRPCError):
        status = e.status
        text = mask(f"{call}: {status.name}: {e.message or ''}".rstrip(": "), token)
        if status is Status.UNAUTHENTICATED:
            return AuthError(text, status.name)
        if status is Status.ALREADY_EXISTS:
            return StreamBusy(text, status.name)
        if status in (Status.UNAVAILABLE, Status.CANCELLED, Status.DEADLINE_EXCEEDED):
            return Unreachable(text, status.name)
        if "not logged in" in (e.message or "").lower():
            return NotLoggedIn(text, status.name)
        return PuppetError(text, status.name)
    if isinstance(e, TimeoutError):
        return Unreachable(f"{call}: no answer in time", "TIMEOUT")
    if isinstance(e, ssl.SSLError):
        return Unreachable(mask(f"{call}: TLS: {e.reason or e}", token), "TLS")
    # connection refused/reset, stream terminated, h2 protocol errors
    return Unreachable(mask(f"{call}: {type(e).__name__}: {e}".rstrip(": "), token), "UNAVAILABLE")


class _Cache:
    """Payloads by id, each kept ``ttl`` seconds (bounded: the oldest go first)."""

    def __init__(self, ttl: float, size: int = 2048) -> None:
        self.ttl = ttl
        self.size = size
        self._items: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any | None:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        return hit[1]

    def put(self, key: str, value: Any) -> None:
        if len(self._items) >= self.size:
            for k in list(self._items)[: self.size // 4]:
                del self._items[k]
        self._items[key] = (time.monotonic() + self.ttl, value)

    def drop(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


class PuppetClient:
    """One channel to one puppet service. Calls raise :class:`PuppetError` (masked)."""

    def __init__(
        self,
        endpoint: str,
        token: Secret,
        *,
        tls: bool = True,
        server_name: str = "",
        ca: str | None = None,
        timeout: float = 15.0,
        keepalive: float = 30.0,
        cache_ttl: float = 300.0,
    ) -> None:
        self.host, self.port = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self._token = token.reveal()
        self.tls = tls
        self.server_name = server_name or token_server_name(self._token)
        self.ca = ca
        self.timeout = timeout
        self.keepalive = keepalive
        self._metadata = {"authorization": f"Wechaty {self._token}"}
        self._channel: Channel | None = None
        self._stub: PuppetStub | None = None
        self.rooms = _Cache(cache_ttl)
        self.contacts = _Cache(cache_ttl)

    def _connect(self) -> PuppetStub:
        if self._stub is None:
            config = Configuration(
                _keepalive_time=self.keepalive,
                _keepalive_timeout=min(10.0, self.keepalive),
                _keepalive_permit_without_calls=True,
                ssl_target_name_override=self.server_name if self.tls else None,
            )
            self._channel = Channel(
                self.host, self.port, ssl=ssl_context(self.ca) if self.tls else None, config=config
            )
            # no default timeout on the stub: the Event stream has none (unary calls pass theirs)
            self._stub = PuppetStub(self._channel, metadata=self._metadata)
        return self._stub

    def close(self) -> None:
        """Drop the channel (an open Event stream ends); the next call reconnects."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    def error(self, call: str, e: BaseException) -> PuppetError:
        return _error(call, e, self._token)

    async def _unary(self, call: str, coro_fn: Any, request: Any) -> Any:
        stub = self._connect()
        try:
            return await coro_fn(stub)(request, timeout=self.timeout, metadata=self._metadata)
        except _FAILURES as e:
            raise self.error(call, e) from None

    async def start(self) -> None:
        """Turn the puppet on (needed after every service restart; idempotent while on)."""
        await self._unary("Start", lambda s: s.start, pb.StartRequest())

    async def ding(self, data: str = "wechat-bridge") -> None:
        await self._unary("Ding", lambda s: s.ding, pb.DingRequest(data=data))

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The Event stream: (event name, decoded JSON payload) until it ends or fails.

        The stream has no deadline; the channel's HTTP/2 keepalive pings notice a dead peer."""
        stub = self._connect()
        try:
            async for ev in stub.event(pb.EventRequest(), timeout=None, metadata=self._metadata):
                name = EVENT_TYPES.get(int(ev.type), f"type_{int(ev.type)}")
                try:
                    payload = json.loads(ev.payload) if ev.payload else {}
                except ValueError:
                    payload = {"data": ev.payload}
                yield name, payload if isinstance(payload, dict) else {"data": payload}
        except (
            grpclib.exceptions.GRPCError,
            grpclib.exceptions.StreamTerminatedError,
            grpclib.exceptions.ProtocolError,
            OSError,
            TimeoutError,
        ) as e:
            raise self.error("Event", e) from None

    async def message(self, message_id: str) -> pb.MessagePayloadResponse:
        r: pb.MessagePayloadResponse = await self._unary(
            "MessagePayload", lambda s: s.message_payload, pb.MessagePayloadRequest(id=message_id)
        )
        return r

    async def room(self, room_id: str) -> pb.RoomPayloadResponse:
        hit = self.rooms.get(room_id)
        if hit is None:
            hit = await self._unary(
                "RoomPayload", lambda s: s.room_payload, pb.RoomPayloadRequest(id=room_id)
            )
            self.rooms.put(room_id, hit)
        r: pb.RoomPayloadResponse = hit
        return r

    async def contact(self, contact_id: str) -> pb.ContactPayloadResponse:
        hit = self.contacts.get(contact_id)
        if hit is None:
            hit = await self._unary(
                "ContactPayload", lambda s: s.contact_payload, pb.ContactPayloadRequest(id=contact_id)
            )
            self.contacts.put(contact_id, hit)
        r: pb.ContactPayloadResponse = hit
        return r

    async def message_file(self, message_id: str, image: bool = False) -> dict[str, Any]:
        """The FileBox (as JSON) of a file or image message."""
        if image:
            req: Any = pb.MessageImageRequest(id=message_id, type=pb.ImageType.IMAGE_TYPE_HD)
            r = await self._unary("MessageImage", lambda s: s.message_image, req)
        else:
            r = await self._unary(
                "MessageFile", lambda s: s.message_file, pb.MessageFileRequest(id=message_id)
            )
        try:
            box = json.loads(r.file_box)
        except ValueError:
            raise PuppetError("MessageFile: the service sent a FileBox that is not JSON") from None
        return box if isinstance(box, dict) else {}

    async def send_text(self, conversation_id: str, text: str, mentions: list[str] | None = None) -> str:
        """Send text; the new message's id, or "" when the puppet gives none."""
        req = pb.MessageSendTextRequest(
            conversation_id=conversation_id, text=text, mentional_ids=list(mentions or [])
        )
        r = await self._unary("MessageSendText", lambda s: s.message_send_text, req)
        return str(r.id or "")

    async def send_file(self, conversation_id: str, name: str, data: bytes, mime: str = "") -> str:
        """Send a file as a base64 FileBox; the new message's id, or ""."""
        box: dict[str, Any] = {
            "type": 1,  # FileBoxType.Base64
            "boxType": 1,
            "name": name,
            "base64": base64.b64encode(data).decode(),
            "metadata": {},
        }
        if mime:
            box["mediaType"] = mime
        req = pb.MessageSendFileRequest(conversation_id=conversation_id, file_box=json.dumps(box))
        r = await self._unary("MessageSendFile", lambda s: s.message_send_file, req)
        return str(r.id or "")

    async def send_url_file(self, conversation_id: str, url: str, name: str) -> str:
        """Send a file the puppet fetches from ``url`` (a URL FileBox); the new message's id, or ""."""
        box = {"type": 2, "boxType": 2, "name": name, "url": url, "metadata": {}}
        req = pb.MessageSendFileRequest(conversation_id=conversation_id, file_box=json.dumps(box))
        r = await self._unary("MessageSendFile", lambda s: s.message_send_file, req)
        return str(r.id or "")
