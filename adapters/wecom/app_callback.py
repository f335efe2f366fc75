"""``wecom_app``: a WeCom self-built app's callback (XML, encrypted, receive id = the CorpID).

GET ``?msg_signature&timestamp&nonce&echostr``: the decrypted echostr, bare. POST: the body
``<xml><ToUserName/><Encrypt/><AgentID/></xml>``; the decrypted message becomes an envelope in the
direct conversation with its sender (app callbacks are 1:1 with members; there is no chat id), and
the answer is 200 with an empty body ("no passive reply") once the envelope is stored.

Config::

    [[inbound]]
    name = "wecom"
    type = "wecom_app"
    path = "/wecom/callback"
    token = "${WECOM_TOKEN}"
    encoding_aes_key = "${WECOM_AES_KEY}"
    corp_id = "ww0123456789abcdef"
    # timestamp_tolerance = 300   # seconds, 0 = off
    # dedupe_ttl = 86400
    # max_body = 32768
"""

from __future__ import annotations

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
from adapters.wechat.crypto import WXBizMsgCrypt
from adapters.wechat.parsing import CallbackRefused, field, parse_xml
from bridge.adapter import Context
from bridge.config import Secret
from bridge.envelope import Conversation


class WeComAppSourceOptions(InboundOptions, forbid_unknown_fields=True, kw_only=True):
    encoding_aes_key: Secret
    #: the CorpID: the receive id inside every ciphertext
    corp_id: str

    def check(self) -> None:
        super().check()
        check_aes_key(self.encoding_aes_key)
        if not self.corp_id.strip():
            raise ValueError("corp_id: must not be empty")


def signature_param(query: dict[str, str]) -> str:
    """WeCom names it msg_signature; accept msgsignature too (the WeCom team's plugin does)."""
    return query.get("msg_signature") or query.get("msgsignature", "")


class WeComSigned(WeChatInbound):
    """WeCom's msg_signature scheme and URL check, shared by the app callback and the AI bot."""

    _crypt: WXBizMsgCrypt

    def signed_query(self, query: dict[str, str]) -> tuple[str, str, str]:
        """(signature, timestamp, nonce), present and fresh, or a refusal."""
        sig = signature_param(query)
        ts, nonce = required(query, "timestamp", "nonce")
        if not sig:
            raise CallbackRefused(403, "missing msg_signature")
        self.fresh(ts)
        return sig, ts, nonce

    async def verify_url(self, query: dict[str, str]) -> bytes:
        sig, ts, nonce = self.signed_query(query)
        (echostr,) = required(query, "echostr", status=400)
        return self._crypt.verify_url(sig, ts, nonce, echostr)


class WeComAppSource(WeComSigned):
    Options = WeComAppSourceOptions
    options: WeComAppSourceOptions
    type_name = "wecom_app"

    def __init__(self, name: str, options: WeComAppSourceOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self._crypt: WXBizMsgCrypt = self.crypt(options.corp_id, options.encoding_aes_key)

    async def accept(self, request: web.Request, query: dict[str, str]) -> web.Response:
        sig, ts, nonce = self.signed_query(query)
        body = await read_body(request, self.options.max_body)
        self.fresh(ts)  # again: the body may have taken a while
        encrypt = scan_encrypt(body)
        self._crypt.verify_signature(sig, ts, nonce, encrypt)
        parse_signed_outer(body, encrypt)
        msg = parse_xml(self._crypt.decrypt(encrypt), "message")
        require_fields(msg, "MsgType", "FromUserName")
        meta = {"to": field(msg, "ToUserName")}
        if field(msg, "AgentID"):
            meta["agent_id"] = field(msg, "AgentID")
        user = field(msg, "FromUserName")
        env, key = xml_message(self.name, msg, Conversation(user, "direct"), meta)
        await self.publish(env, key)
        return web.Response(status=200, body=b"", content_type="text/plain")
