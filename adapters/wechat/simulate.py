"""``wechat-bridge simulate``: send the running daemon a callback exactly as WeChat would.

It reads the inbound's token, EncodingAESKey and receive id from the config, builds the platform's
payload for the message kind, encrypts and signs it, and POSTs it to the inbound's path (on
``[http] listen``, or ``--url``). It prints the HTTP status and the body (an AI bot's encrypted
stream reply is also verified and decrypted) and exits 0 on a 2xx answer, 1 otherwise.
``--verify`` sends the GET URL verification instead and checks the answer.

    wechat-bridge simulate --config bridge.toml --inbound wecom --text "hello"
    wechat-bridge simulate --config bridge.toml --inbound aibot --chat wrkSFfCgAA --from alice --text hi
    wechat-bridge simulate --config bridge.toml --inbound oa --kind event --event subscribe
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from adapters.wechat.callback import InboundOptions
from adapters.wechat.crypto import CryptoError, WXBizMsgCrypt, plain_signature
from bridge.adapter import Registry
from bridge.config import Config, Secret, convert

KINDS: dict[str, tuple[str, ...]] = {
    "wecom_app": ("text", "image", "voice", "video", "location", "link", "event"),
    "wechat_oa": ("text", "image", "voice", "video", "shortvideo", "location", "link", "event"),
    "wecom_aibot": ("text", "image", "voice", "file", "mixed", "event", "stream"),
}
DEFAULT_EVENT = {"wecom_app": "enter_agent", "wechat_oa": "subscribe", "wecom_aibot": "enter_chat"}
_ALL_KINDS = sorted({k for ks in KINDS.values() for k in ks})
_PIC = "https://example.com/simulated.jpg"


def configure(p: argparse.ArgumentParser) -> None:
    p.description = "send the running daemon a signed, encrypted callback as WeChat would"
    p.add_argument("--inbound", required=True, help="the [[inbound]] name")
    p.add_argument("--text", default="hello from wechat-bridge simulate", help="the message text")
    p.add_argument("--kind", default="text", choices=_ALL_KINDS, help="message kind (default text)")
    p.add_argument("--chat", default=None, help="wecom_aibot: a group chat id (default: a single chat)")
    p.add_argument("--from", dest="sender", default="simulate-user", help="the sender's user id / OpenID")
    p.add_argument("--event", default=None, help="--kind event: the event name")
    p.add_argument("--event-key", default="", help="--kind event: EventKey (wecom_app, wechat_oa)")
    p.add_argument(
        "--msgid", default=None, help="the platform message id (default random; reuse to see a retry deduped)"
    )
    p.add_argument("--stream-id", default=None, help="--kind stream: the stream to refresh")
    p.add_argument("--response-url", default=None, help="wecom_aibot: the message's response_url")
    p.add_argument("--agent-id", default="1000002", help="wecom_app: AgentID")
    p.add_argument(
        "--mode",
        choices=("plaintext", "compatible", "safe"),
        default=None,
        help="wechat_oa: push mode (default safe with an encoding_aes_key, else plaintext)",
    )
    p.add_argument("--verify", action="store_true", help="send the GET URL verification instead")
    p.add_argument("--url", default=None, help="send here instead of http://<[http] listen><path>")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")  # fmt: skip


def run(args: argparse.Namespace, config: Config) -> int:
    return asyncio.run(simulate(args, config))


class _Usage(Exception):
    pass


async def simulate(args: argparse.Namespace, config: Config) -> int:
    inbound = config.inbound_by_name(args.inbound)
    if inbound is None:
        names = ", ".join(i.name for i in config.inbound) or "none"
        print(
            f"error: no inbound named {args.inbound!r} in {config.path} (inbound: {names})", file=sys.stderr
        )
        return 1
    if inbound.type not in KINDS:
        print(f"error: inbound {inbound.name!r} is a {inbound.type}; simulate speaks "
              f"{', '.join(KINDS)}", file=sys.stderr)  # fmt: skip
        return 2
    registry = Registry.from_module(getattr(args, "adapters", "adapters"))
    where = f"inbound.{inbound.name}"
    cls = registry.source(inbound.type, where, config.path)
    options = convert(inbound.options, cls.Options, where, config.path)
    if not isinstance(options, InboundOptions):
        print(f"error: inbound {inbound.name!r}: not a WeChat inbound", file=sys.stderr)
        return 2
    options.check()
    try:
        request = _build(inbound.type, options, args)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = args.url or _base_url(config) + options.path
    url += "?" + urllib.parse.urlencode(request.query, quote_via=urllib.parse.quote)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session,
            session.request(request.method, url, data=request.body, headers=request.headers) as resp,
        ):
            status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        print(f"error: cannot reach {url.split('?')[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"HTTP {status}")
    if body:
        print(body.decode("utf-8", "replace"))
    ok = 200 <= status < 300
    if ok and request.expect is not None:
        ok = body == request.expect
        print("URL verification OK" if ok else "URL verification FAILED: the answer is not the echostr")
    elif ok and request.crypt is not None and body:
        ok = _show_reply(request.crypt, body)
    return 0 if ok else 1


class _Request:
    def __init__(self, method: str, query: dict[str, str], body: bytes = b"", content_type: str = "") -> None:
        self.method = method
        self.query = query
        self.body = body
        self.headers = {"Content-Type": content_type} if content_type else {}
        self.expect: bytes | None = None
        self.crypt: WXBizMsgCrypt | None = None


def _base_url(config: Config) -> str:
    host, port = config.listen
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _build(type_: str, options: InboundOptions, args: argparse.Namespace) -> _Request:
    if args.kind not in KINDS[type_]:
        raise _Usage(f"--kind {args.kind}: a {type_} sends {', '.join(KINDS[type_])}")
    if args.chat is not None and type_ != "wecom_aibot":
        raise _Usage("--chat: only a wecom_aibot has chats (app and Official Account callbacks are 1:1)")
    ts = str(int(time.time()))
    nonce = str(secrets.randbelow(9 * 10**9) + 10**9)
    token = options.token.reveal()
    if type_ == "wechat_oa":
        return _oa(_keys(options, "app_id"), args, token, ts, nonce)
    keys = _keys(options, "corp_id" if type_ == "wecom_app" else None)
    if keys.aes_key is None:  # pragma: no cover - both WeCom types require the key
        raise _Usage(f"a {type_} inbound needs an encoding_aes_key")
    crypt = WXBizMsgCrypt(token, keys.aes_key.reveal(), keys.receive_id)
    if args.verify:
        echo = str(secrets.randbelow(10**18))
        enc = crypt.encrypt(echo.encode())
        req = _Request("GET", _signed(crypt, ts, nonce, enc) | {"echostr": enc})
        req.expect = echo.encode()
        return req
    if type_ == "wecom_app":
        msg = _xml(_app_fields(keys.receive_id, args, ts))
        enc = crypt.encrypt(msg)
        outer = _xml([("ToUserName", keys.receive_id), ("Encrypt", enc), ("AgentID", args.agent_id)])
        return _Request("POST", _signed(crypt, ts, nonce, enc), outer, "text/xml")
    enc = crypt.encrypt(json.dumps(_aibot_payload(args, ts), ensure_ascii=False).encode())
    req = _Request(
        "POST", _signed(crypt, ts, nonce, enc), json.dumps({"encrypt": enc}).encode(), "application/json"
    )
    req.crypt = crypt
    return req


def _signed(crypt: WXBizMsgCrypt, ts: str, nonce: str, enc: str) -> dict[str, str]:
    return {"msg_signature": crypt.signature(ts, nonce, enc), "timestamp": ts, "nonce": nonce}


def _msgid(args: argparse.Namespace, xml: bool) -> str:
    if args.msgid:
        return str(args.msgid)
    return str(secrets.randbelow(2**63)) if xml else secrets.token_urlsafe(18)


def _xml_kind_fields(args: argparse.Namespace) -> list[tuple[str, str]]:
    k = args.kind
    if k == "text":
        return [("Content", args.text)]
    if k == "image":
        return [("PicUrl", _PIC), ("MediaId", "simulated-media-id")]
    if k == "voice":
        return [("MediaId", "simulated-media-id"), ("Format", "amr")]
    if k in ("video", "shortvideo"):
        return [("MediaId", "simulated-media-id"), ("ThumbMediaId", "simulated-thumb-id")]
    if k == "location":
        return [
            ("Location_X", "23.134521"),
            ("Location_Y", "113.358803"),
            ("Scale", "20"),
            ("Label", args.text),
        ]
    if k == "link":
        return [("Title", args.text), ("Description", "a simulated link"), ("Url", "https://example.com/"),
                ("PicUrl", _PIC)]  # fmt: skip
    return []


def _xml_fields(to: str, args: argparse.Namespace, ts: str, type_: str) -> list[tuple[str, str]]:
    fields = [("ToUserName", to), ("FromUserName", args.sender), ("CreateTime", ts), ("MsgType", args.kind)]
    if args.kind == "event":
        fields.append(("Event", args.event or DEFAULT_EVENT[type_]))
        if args.event_key:
            fields.append(("EventKey", args.event_key))
    else:
        fields += _xml_kind_fields(args)
        fields.append(("MsgId", _msgid(args, xml=True)))
    return fields


def _app_fields(corp_id: str, args: argparse.Namespace, ts: str) -> list[tuple[str, str]]:
    return [*_xml_fields(corp_id, args, ts, "wecom_app"), ("AgentID", args.agent_id)]


@dataclass
class _Keys:
    """What the crypto needs from an inbound's options: its EncodingAESKey and receive id."""

    aes_key: Secret | None
    receive_id: str


def _keys(options: InboundOptions, receive_id_key: str | None) -> _Keys:
    """Read by key name: this module serves every WeChat inbound and imports none of them."""
    key = getattr(options, "encoding_aes_key", None)
    receive_id = getattr(options, receive_id_key, "") if receive_id_key else ""
    return _Keys(key if isinstance(key, Secret) else None, str(receive_id))


def _oa(keys: _Keys, args: argparse.Namespace, token: str, ts: str, nonce: str) -> _Request:
    key = keys.aes_key
    if args.verify:
        echo = str(secrets.randbelow(10**18))
        query = {
            "signature": plain_signature(token, ts, nonce),
            "timestamp": ts,
            "nonce": nonce,
            "echostr": echo,
        }
        req = _Request("GET", query)
        req.expect = echo.encode()
        return req
    mode = args.mode or ("safe" if key is not None else "plaintext")
    fields = _xml_fields("gh_simulated", args, ts, "wechat_oa")
    query = {
        "signature": plain_signature(token, ts, nonce),
        "timestamp": ts,
        "nonce": nonce,
        "openid": args.sender,
    }
    if mode == "plaintext":
        return _Request("POST", query, _xml(fields), "text/xml")
    if key is None:
        raise _Usage(f"--mode {mode}: the inbound has no encoding_aes_key")
    crypt = WXBizMsgCrypt(token, key.reveal(), keys.receive_id)
    enc = crypt.encrypt(_xml(fields))
    query |= {"encrypt_type": "aes", "msg_signature": crypt.signature(ts, nonce, enc)}
    outer = (
        [*fields, ("Encrypt", enc)]
        if mode == "compatible"
        else [("ToUserName", "gh_simulated"), ("Encrypt", enc)]
    )
    return _Request("POST", query, _xml(outer), "text/xml")


def _aibot_payload(args: argparse.Namespace, ts: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"msgid": _msgid(args, xml=False), "aibotid": "simulated-aibot"}
    if args.chat:
        msg |= {"chatid": args.chat, "chattype": "group"}
    else:
        msg["chattype"] = "single"
    msg["from"] = {"userid": args.sender}
    k = args.kind
    if k == "stream":
        if not args.stream_id:
            raise _Usage("--kind stream needs --stream-id (the stream id of an earlier message's reply)")
        return msg | {"msgtype": "stream", "stream": {"id": args.stream_id}}
    if k == "event":
        return msg | {
            "create_time": int(ts),
            "msgtype": "event",
            "event": {"eventtype": args.event or "enter_chat"},
        }
    if args.response_url:
        msg["response_url"] = args.response_url
    msg["msgtype"] = k
    if k in ("text", "voice"):
        msg[k] = {"content": args.text}
    elif k in ("image", "file"):
        msg[k] = {"url": _PIC if k == "image" else "https://example.com/simulated.pdf"}
    elif k == "mixed":
        msg[k] = {"msg_item": [{"msgtype": "text", "text": {"content": args.text}},
                               {"msgtype": "image", "image": {"url": _PIC}}]}  # fmt: skip
    return msg


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _xml(fields: list[tuple[str, str]]) -> bytes:
    """WeChat's XML: strings in CDATA, numbers bare."""
    parts = [f"<{k}>{v if v.isdigit() else _cdata(v)}</{k}>" for k, v in fields]
    return ("<xml>" + "".join(parts) + "</xml>").encode()


def _show_reply(crypt: WXBizMsgCrypt, body: bytes) -> bool:
    """Verify and decrypt an AI bot's encrypted reply; print it."""
    try:
        reply = json.loads(body)
        plain = crypt.verify_and_decrypt(reply["msgsignature"], str(reply["timestamp"]), reply["nonce"],
                                         reply["encrypt"])  # fmt: skip
    except (ValueError, KeyError, TypeError, CryptoError) as e:
        print(f"the reply does not verify: {type(e).__name__}", file=sys.stderr)
        return False
    print("reply: " + plain.decode("utf-8", "replace"))
    return True
