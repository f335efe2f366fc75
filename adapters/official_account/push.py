"""``wechat_oa``: an Official Account's message push (XML), in all three of WeChat's modes.

* GET ``?signature&timestamp&nonce&echostr``: the plaintext-mode signature
  (sha1 of sorted token/timestamp/nonce), then ``echostr`` verbatim. It is never encrypted.
* POST, plaintext mode (no ``encrypt_type`` or ``encrypt_type=raw``): ``signature`` checked, body
  parsed as the message. That signature does not cover the body, which is why a configured
  ``encoding_aes_key`` refuses plaintext pushes (a downgrade) unless ``allow_plaintext = true``, and
  why one signed query may carry one body only: the body's hash is remembered under the query's
  timestamp and nonce for the tolerance window, and another body with that query is refused (403).
* POST, compatible or safe mode (``encrypt_type=aes``): ``msg_signature`` checked over the body's
  ``<Encrypt>`` (not ``signature``, as the doc says), decrypted with receive id = ``app_id``; in
  compatible mode the body's plain copy of the fields is ignored, only the decrypted copy counts.

The envelope's conversation is the direct one with the sender (the OpenID); the answer is
``success`` once the envelope is stored.

Config::

    [[inbound]]
    name = "oa"
    type = "wechat_oa"
    path = "/wechat/oa"
    token = "${OA_TOKEN}"
    encoding_aes_key = "${OA_AES_KEY}"   # omit for plaintext mode
    app_id = "wx0123456789abcdef"        # required with encoding_aes_key
    # allow_plaintext = false            # accept plaintext pushes although a key is set
    # timestamp_tolerance = 300          # seconds, 0 = off
    # dedupe_ttl = 86400
    # max_body = 32768
"""

from __future__ import annotations

import hashlib
import re

from aiohttp import web

from adapters.wechat.callback import (
    InboundOptions,
    WeChatInbound,
    check_aes_key,
    parse_signed_outer,
    read_body,
    require_fields,
    required,
    scan_encrypt,
    xml_message,
)
from adapters.wechat.crypto import WXBizMsgCrypt, verify_plain_signature
from adapters.wechat.parsing import CallbackRefused, field, parse_xml
from bridge.adapter import Context
from bridge.config import Secret
from bridge.envelope import Conversation

#: what an echostr may hold: it is echoed back unsigned, so keep it to harmless characters
_ECHOSTR_RE = re.compile(r"[A-Za-z0-9+/=_.-]{1,256}")


class WeChatOAOptions(InboundOptions, forbid_unknown_fields=True, kw_only=True):
    #: safe/compatible mode; omit for plaintext mode
    encoding_aes_key: Secret | None = None
    #: the AppID: the receive id inside every ciphertext (required with encoding_aes_key)
    app_id: str = ""
    #: with encoding_aes_key set, still accept plaintext pushes (while switching modes)
    allow_plaintext: bool = False

    def check(self) -> None:
        super().check()
        if self.encoding_aes_key is not None:
            check_aes_key(self.encoding_aes_key)
            if not self.app_id.strip():
                raise ValueError("app_id: required with encoding_aes_key (the receive id of safe mode)")
        elif self.allow_plaintext:
            raise ValueError("allow_plaintext: only has a meaning with encoding_aes_key set")


class WeChatOASource(WeChatInbound):
    Options = WeChatOAOptions
    options: WeChatOAOptions
    type_name = "wechat_oa"

    def __init__(self, name: str, options: WeChatOAOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        key = options.encoding_aes_key
        self._crypt: WXBizMsgCrypt | None = self.crypt(options.app_id, key) if key is not None else None

    def _plain_signature(self, query: dict[str, str]) -> None:
        sig, ts, nonce = required(query, "signature", "timestamp", "nonce")
        self.fresh(ts)
        verify_plain_signature(sig, self.options.token.reveal(), ts, nonce)

    async def _one_body_per_nonce(self, timestamp: str, nonce: str, body: bytes) -> None:
        """Plaintext mode signs the query, not the body: within the timestamp window, one signed
        query carries one body. The body's hash is remembered under (timestamp, nonce) for twice the
        tolerance; the same query with another body is refused (403), the same body again is a
        platform retry (deduplicated downstream). With the tolerance off, a day."""
        tol = self.options.timestamp_tolerance
        key = self.ctx.state_key("wechat_oa", f"{self.name}:nonce:{timestamp}:{nonce}")
        digest = hashlib.sha256(body).hexdigest()
        redis = self.ctx.redis
        if await redis.set(key, digest, nx=True, ex=2 * tol if tol else 86_400):
            return
        seen = await redis.get(key)
        if seen is not None and seen.decode() != digest:
            raise CallbackRefused(403, "nonce replayed with another body")

    async def verify_url(self, query: dict[str, str]) -> bytes:
        self._plain_signature(query)
        (echostr,) = required(query, "echostr", status=400)
        if not _ECHOSTR_RE.fullmatch(echostr):
            raise CallbackRefused(400, "bad echostr")
        return echostr.encode()

    async def accept(self, request: web.Request, query: dict[str, str]) -> web.Response:
        mode = query.get("encrypt_type", "")
        if mode in ("", "raw"):
            if self._crypt is not None and not self.options.allow_plaintext:
                raise CallbackRefused(403, "plaintext push refused: encoding_aes_key is set")
            self._plain_signature(query)
            body = await read_body(request, self.options.max_body)
            self.fresh(query["timestamp"])  # again: the body may have taken a while
            await self._one_body_per_nonce(query["timestamp"], query["nonce"], body)
            msg = parse_xml(body, "message")
            meta = {"mode": "plaintext"}
        elif mode == "aes":
            if self._crypt is None:
                raise CallbackRefused(400, "encrypted push but no encoding_aes_key is configured")
            sig, ts, nonce = required(query, "msg_signature", "timestamp", "nonce")
            self.fresh(ts)
            body = await read_body(request, self.options.max_body)
            self.fresh(ts)  # again: the body may have taken a while
            encrypt = scan_encrypt(body)
            self._crypt.verify_signature(sig, ts, nonce, encrypt)
            outer = parse_signed_outer(body, encrypt)
            msg = parse_xml(self._crypt.decrypt(encrypt), "message")
            meta = {"mode": "compatible" if field(outer, "MsgType") else "safe"}
        else:
            raise CallbackRefused(400, "unknown encrypt_type")
        require_fields(msg, "MsgType", "FromUserName")
        meta["to"] = field(msg, "ToUserName")
        openid = field(msg, "FromUserName")
        env, key = xml_message(self.name, msg, Conversation(openid, "direct"), meta)
        await self.publish(env, key)
        return web.Response(status=200, text="success", content_type="text/plain")
