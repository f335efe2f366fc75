"""A local stand-in for the WeCom (企业微信) and Official Account (公众号) HTTP APIs.

Integration tests point our sinks at `FakeWeComAPI` instead of https://qyapi.weixin.qq.com and
https://api.weixin.qq.com. Shapes and errcodes follow the public docs (WeCom doc ids in brackets):
gettoken [91039], message/send [90236], appchat create/update/get/send [90245, 90246/98913,
90247/98914, 90248], webhook bot send/upload_media [91770], global error codes [90313]; Official
Account /cgi-bin/token and /cgi-bin/message/custom/send with their global return codes.

Like the real services, errors come back as HTTP 200 with {"errcode", "errmsg"}; errmsg texts
imitate the real ones but callers must branch on errcode only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Delivered", "FakeWeComAPI", "Recorded"]

JSON = dict[str, Any]
Handler = Callable[["web.Request", "Recorded"], Awaitable[web.StreamResponse]]

# Size limits in UTF-8 bytes, from the docs.
MESSAGE_TEXT_LIMIT = 2048  # message/send text: "超过将截断" (truncated, not rejected) [90236]
MESSAGE_MARKDOWN_LIMIT = 2048  # message/send markdown [90236]
APPCHAT_TEXT_LIMIT = 2048  # appchat/send text [90248]
APPCHAT_MARKDOWN_LIMIT = 2048
WEBHOOK_TEXT_LIMIT = 2048  # [91770]
WEBHOOK_MARKDOWN_LIMIT = 4096  # [91770]
WEBHOOK_IMAGE_LIMIT = 2 * 1024 * 1024  # before base64 [91770]
WEBHOOK_FILE_LIMIT = 20 * 1024 * 1024  # upload_media file: 5 B .. 20 MB [91770]
WEBHOOK_VOICE_LIMIT = 2 * 1024 * 1024  # upload_media voice: 5 B .. 2 MB, AMR [91770]
OA_TEXT_LIMIT = 2048  # custom/send text: undocumented; community reports 2048 bytes -> 45002

WECOM_ERRMSG = {
    -1: "system busy",
    40001: "invalid credential",
    40005: "invalid media type",
    40006: "invalid file size",
    40007: "invalid media_id",
    40008: "invalid message type",
    40009: "invalid image size",
    40013: "invalid corpid",
    40014: "invalid access_token",
    40032: "invalid userid list size",
    40058: "invalid parameter",
    41001: "access_token missing",
    41002: "corpid missing",
    41004: "corpsecret missing",
    41006: "media_id missing",
    41011: "agentid missing",
    42001: "access_token expired",
    44001: "empty media data",
    44004: "empty content",
    45002: "content size out of limit",
    45008: "article size out of limit",
    45009: "api freq out of limit",
    45033: "api concurrent out of limit",
    60020: "not allow to access from your ip",
    81013: "user & party & tag all invalid",
    82001: "touser & toparty & totag all empty",
    82002: "invalid partyid list size",
    82003: "invalid tagid list size",
    86001: "invalid chatid",
    86003: "chat not exist",
    86005: "invalid chat owner",
    86006: "invalid chat member list size",
    86007: "invalid chat member",
    86008: "chat not created by this app",
    86201: "chatid missing",
    86203: "chat owner missing",
    86205: "chatid too long",
    86207: "chat owner not in member list",
    86215: "chatid already exists",
    86216: "invalid chat member",
    93000: "invalid webhook url",
    301002: "not allow operate another agent with this accesstoken",
}

OA_ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40008: "invalid message type",
    40013: "invalid appid",
    40014: "invalid access_token",
    40125: "invalid appsecret",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    42001: "access_token expired",
    44004: "empty content",
    45002: "content size out of limit",
    45009: "reach max api daily quota limit",
    45015: "response out of time limit or subscription is canceled",
    45047: "out of response count limit",
    47001: "data format error",
}

WEBHOOK_MSGTYPES = {"text", "markdown", "markdown_v2", "image", "news", "file", "voice", "template_card"}
APPCHAT_MSGTYPES = {"text", "image", "voice", "video", "file", "textcard", "news", "mpnews", "markdown"}
MESSAGE_MSGTYPES = APPCHAT_MSGTYPES | {"miniprogram_notice", "template_card"}
OA_MSGTYPES = {"text", "image", "voice", "video", "music", "news", "mpnews", "mpnewsarticle", "msgmenu"}
OA_MSGTYPES |= {"wxcard", "miniprogrampage"}
CHATID_RE = re.compile(r"[0-9A-Za-z]+")


@dataclass
class Recorded:
    """One request as the fake saw it, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    json: Any  # the parsed JSON body, None when absent or not JSON
    form: dict[str, str]  # multipart fields; file fields map to their file name
    files: dict[str, bytes]
    time: float  # FakeWeComAPI.now() at arrival
    status: int = 0  # HTTP status answered
    response: JSON | None = None  # JSON answered, None for an injected HTTP error

    @property
    def errcode(self) -> int | None:
        if self.response is None:
            return None
        code = self.response.get("errcode", 0)
        return int(code) if isinstance(code, int) else None


@dataclass
class Delivered:
    """A message the platform accepted for a target (userid, chatid, webhook key or openid)."""

    api: str  # "message" | "appchat" | "webhook" | "custom"
    target: str
    msgtype: str
    body: JSON  # the type-specific object, e.g. {"content": "..."}
    time: float
    truncated: bool = False  # message/send text cut at 2048 bytes, as the real API does
    dropped: str = ""  # "duplicate" | "rate_limited" for messages the API accepted but dropped

    @property
    def content(self) -> str | None:
        value = self.body.get("content")
        return value if isinstance(value, str) else None


@dataclass
class _Token:
    kind: str  # "wecom" | "oa"
    owner: str  # WeCom: the app secret; OA: the appid
    agentid: int
    valid_until: float
    dead_code: int = 42001  # errcode once past valid_until


@dataclass
class _Fault:
    path_suffix: str
    errcode: int | None
    http_status: int | None
    times: int
    delay: float | None


@dataclass
class _Chat:
    chatid: str
    name: str
    owner: str
    userlist: list[str]
    agentid: int


@dataclass
class _Media:
    key: str
    type: str
    data: bytes
    filename: str


@dataclass
class _Reject(Exception):
    """Raised inside handlers to answer with an errcode."""

    errcode: int
    detail: str = ""
    extra: JSON = field(default_factory=dict)


class FakeWeComAPI:
    """An aiohttp server imitating the WeCom and Official Account APIs on 127.0.0.1.

    Behaviour worth knowing when writing sink tests:
    - WeCom gettoken returns the same token while it is valid; `invalidate_tokens()` or the clock
      (`advance`, `token_ttl`) make tokens fail with 42001, an unknown token gives 40014, a missing
      one 41001. OA tokens: a new one supersedes the old, which lives on 5 min and then gives 40001;
      an unknown OA token also gives 40001 (not 40014).
    - message/send truncates text over 2048 bytes and still answers 0 (`Delivered.truncated`);
      duplicates (enable_duplicate_check) and the per-member limits (30/min message/send, 200/min
      appchat) answer 0 too but land in `dropped`, not in `delivered`.
    - The webhook bot allows `webhook_per_minute` (20) messages a minute per key, then 45009.
    - `fail_next()` injects errcodes, HTTP errors and delays; `ip_not_trusted` makes every WeCom
      app API call (not gettoken, not the webhook) answer 60020.
    """

    def __init__(
        self,
        *,
        corpid: str = "wwfakecorp0001",
        corpsecret: str = "fake-corp-secret",
        agentid: int = 1000002,
        users: tuple[str, ...] = ("alice", "bob", "carol", "dave"),
        appid: str = "wxfakeappid0001",
        appsecret: str = "fake-app-secret",
        openids: tuple[str, ...] = ("oAlice", "oBob"),
        token_ttl: int = 7200,
    ) -> None:
        self.corpid = corpid
        self.corpsecret = corpsecret
        self.agentid = agentid
        self.appid = appid
        self.appsecret = appsecret
        self.token_ttl = token_ttl
        self.oa_token_grace = 300.0  # an OA token stays valid 5 min after a newer one is issued
        self.apps: dict[str, int] = {corpsecret: agentid}  # WeCom app secret -> agentid
        self.users: set[str] = {u.lower() for u in users}
        self.parties: dict[str, set[str]] = {"1": set(self.users)}
        self.tags: dict[str, set[str]] = {}
        self.openids: set[str] = set(openids)
        self.outside_window: set[str] = set()
        self.webhook_keys: set[str] = set()
        self.webhook_rate_limit = True
        self.webhook_per_minute = 20
        self.member_rate_limits = True  # message/send 30/min/member, appchat 200/min/member
        self.ip_not_trusted = False
        self.requests: list[Recorded] = []
        self.delivered: dict[str, list[Delivered]] = {}
        self.dropped: list[Delivered] = []
        self.chats: dict[str, _Chat] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._media: dict[str, _Media] = {}
        self._webhook_sent: dict[str, deque[float]] = {}
        self._member_sent: dict[tuple[str, str], deque[float]] = {}
        self._recent: dict[str, float] = {}  # duplicate check: request fingerprint -> time
        self._skew = 0.0
        self._runner: web.AppRunner | None = None
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/cgi-bin/gettoken"): self._gettoken,
            ("POST", "/cgi-bin/message/send"): self._message_send,
            ("POST", "/cgi-bin/appchat/create"): self._appchat_create,
            ("POST", "/cgi-bin/appchat/update"): self._appchat_update,
            ("GET", "/cgi-bin/appchat/get"): self._appchat_get,
            ("POST", "/cgi-bin/appchat/send"): self._appchat_send,
            ("POST", "/cgi-bin/webhook/send"): self._webhook_send,
            ("POST", "/cgi-bin/webhook/upload_media"): self._webhook_upload,
            ("GET", "/cgi-bin/token"): self._oa_token,
            ("POST", "/cgi-bin/message/custom/send"): self._oa_custom_send,
        }

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen on a free port of 127.0.0.1 and return the base URL, e.g. http://127.0.0.1:PORT."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- test controls ---------------------------------------------------------------------

    def now(self) -> float:
        """The fake's clock: monotonic time plus whatever `advance` added."""
        return time.monotonic() + self._skew

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward: expires tokens, opens rate-limit windows."""
        self._skew += seconds

    def invalidate_tokens(self, kind: str | None = None) -> None:
        """Make every current token (of `kind`, "wecom" or "oa") fail with 42001, as if expired."""
        now = self.now()
        for token in self._tokens.values():
            if (kind is None or token.kind == kind) and token.valid_until > now:
                token.valid_until = now
                token.dead_code = 42001

    def add_app(self, secret: str, agentid: int) -> None:
        self.apps[secret] = agentid

    def add_user(self, userid: str) -> None:
        self.users.add(userid.lower())
        self.parties["1"].add(userid.lower())

    def add_openid(self, openid: str) -> None:
        self.openids.add(openid)

    def add_webhook_key(self, key: str) -> None:
        self.webhook_keys.add(key)

    def set_outside_window(self, openid: str, outside: bool = True) -> None:
        """custom/send to this openid answers 45015 (48 h window closed or unsubscribed)."""
        if outside:
            self.outside_window.add(openid)
        else:
            self.outside_window.discard(openid)

    def fail_next(
        self,
        path_suffix: str,
        errcode: int | None = None,
        http_status: int | None = None,
        times: int = 1,
        delay: float | None = None,
    ) -> None:
        """Make the next `times` calls to a path ending in `path_suffix` misbehave.

        With `delay` the call first hangs that long; then it answers `errcode` (HTTP 200 JSON),
        or `http_status` with a non-JSON body, or, when neither is given, is handled normally.
        """
        self._faults.append(_Fault(path_suffix, errcode, http_status, times, delay))

    # ---- inspection ------------------------------------------------------------------------

    def sent(self, path_suffix: str) -> list[Recorded]:
        """Recorded requests to paths ending in `path_suffix`, in arrival order."""
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    def token_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path in ("/cgi-bin/gettoken", "/cgi-bin/token")]

    def delivered_to(self, target: str) -> list[Delivered]:
        return list(self.delivered.get(target, []))

    def contents(self, target: str) -> list[str | None]:
        """The `content` of each message delivered to `target`, in order."""
        return [d.content for d in self.delivered.get(target, [])]

    # ---- plumbing --------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        fault = self._take_fault(request.path)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.http_status is not None:
                record.status = fault.http_status
                return web.Response(status=fault.http_status, text=f"<html>{fault.http_status}</html>")
            if fault.errcode is not None:
                return self._answer(record, self._error_body(request.path, fault.errcode))
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            record.status = 404
            return web.Response(status=404, text="404 Not Found")
        try:
            return await handler(request, record)
        except _Reject as reject:
            body = self._error_body(request.path, reject.errcode, reject.detail)
            body.update(reject.extra)
            return self._answer(record, body)

    async def _record(self, request: web.Request) -> Recorded:
        form: dict[str, str] = {}
        files: dict[str, bytes] = {}
        parsed: Any = None
        if request.content_type.startswith("multipart/"):
            for name, value in (await request.post()).items():
                if isinstance(value, web.FileField):
                    form[name] = value.filename
                    files[name] = value.file.read()
                else:
                    form[name] = str(value)
        else:
            raw = await request.read()
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
        record = Recorded(request.method, request.path, dict(request.query), parsed, form, files, self.now())
        self.requests.append(record)
        return record

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if path.endswith(fault.path_suffix):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _answer(self, record: Recorded, body: JSON) -> web.Response:
        record.status = 200
        record.response = body
        return web.json_response(body)

    def _ok(self, record: Recorded, **fields: Any) -> web.Response:
        return self._answer(record, {"errcode": 0, "errmsg": "ok", **fields})

    @staticmethod
    def _is_oa(path: str) -> bool:
        return path in ("/cgi-bin/token", "/cgi-bin/message/custom/send")

    def _error_body(self, path: str, errcode: int, detail: str = "") -> JSON:
        hint = secrets.token_hex(8)
        if self._is_oa(path):
            text = detail or OA_ERRMSG.get(errcode, "invalid parameter")
            return {"errcode": errcode, "errmsg": f"{text} rid: {hint[:8]}-{hint[8:]}"}
        text = detail or WECOM_ERRMSG.get(errcode, "invalid parameter")
        return {
            "errcode": errcode,
            "errmsg": f"{text}, hint: [{int(time.time())}_{hint}], from ip: 127.0.0.1, "
            f"more info at https://open.work.weixin.qq.com/devtool/query?e={errcode}",
        }

    def _body(self, record: Recorded) -> JSON:
        if not isinstance(record.json, dict):
            raise _Reject(47001 if self._is_oa(record.path) else 40058, "Warning: wrong json format.")
        return record.json

    def _issue_token(self, kind: str, owner: str, agentid: int) -> tuple[str, int]:
        now = self.now()
        for value, token in self._tokens.items():
            if kind == "wecom" and token.kind == kind and token.owner == owner and token.valid_until > now:
                # WeCom: "有效期内重复获取返回相同结果" [91039]
                return value, max(1, int(token.valid_until - now))
            superseded = kind == "oa" and token.kind == kind and token.owner == owner
            if superseded and token.valid_until > now + self.oa_token_grace:
                # OA: a new token supersedes the old one, which lives on for 5 minutes.
                token.valid_until = now + self.oa_token_grace
                token.dead_code = 40001
        value = secrets.token_urlsafe(48)
        self._tokens[value] = _Token(kind, owner, agentid, now + self.token_ttl)
        return value, self.token_ttl

    def _check_token(self, record: Recorded, kind: str) -> _Token:
        value = record.query.get("access_token", "")
        if not value:
            raise _Reject(41001)
        token = self._tokens.get(value)
        if token is None or token.kind != kind:
            raise _Reject(40001 if kind == "oa" else 40014)
        if self.now() >= token.valid_until:
            raise _Reject(token.dead_code)
        if kind == "wecom" and self.ip_not_trusted:
            raise _Reject(60020)
        return token

    def _window(self, key: tuple[str, str], now: float) -> deque[float]:
        window = self._member_sent.setdefault(key, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        return window

    def _deliver(self, message: Delivered, members: list[str], per_minute: int) -> None:
        """Deliver, unless a member already got `per_minute` messages from this API in the last
        minute: then the API still answers ok but the message is dropped ("超过部分会被丢弃不下发")."""
        if self.member_rate_limits:
            windows = [self._window((message.api, m), message.time) for m in members]
            if any(len(w) >= per_minute for w in windows):
                message.dropped = "rate_limited"
                self.dropped.append(message)
                return
            for window in windows:
                window.append(message.time)
        self.delivered.setdefault(message.target, []).append(message)

    # ---- WeCom: token ----------------------------------------------------------------------

    async def _gettoken(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        corpid = record.query.get("corpid", "")
        secret = record.query.get("corpsecret", "")
        if not corpid:
            raise _Reject(41002)
        if corpid != self.corpid:
            raise _Reject(40013)
        if not secret:
            raise _Reject(41004)
        if secret not in self.apps:
            raise _Reject(40001)
        token, expires_in = self._issue_token("wecom", secret, self.apps[secret])
        return self._ok(record, access_token=token, expires_in=expires_in)

    # ---- WeCom: application messages [90236] ---------------------------------------------

    async def _message_send(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        token = self._check_token(record, "wecom")
        body = self._body(record)
        if "agentid" not in body:
            raise _Reject(41011)
        if str(body["agentid"]) != str(token.agentid):
            raise _Reject(301002)
        msgtype = body.get("msgtype")
        if msgtype not in MESSAGE_MSGTYPES or not isinstance(body.get(msgtype), dict):
            raise _Reject(40008)
        payload = dict(body[msgtype])
        truncated = self._check_content(
            msgtype, payload, MESSAGE_TEXT_LIMIT, MESSAGE_MARKDOWN_LIMIT, truncate_text=True
        )

        users, parties, tags = (str(body.get(k) or "") for k in ("touser", "toparty", "totag"))
        if not (users or parties or tags):
            raise _Reject(82001)
        user_list = [u for u in users.split("|") if u]
        party_list = [p for p in parties.split("|") if p]
        tag_list = [t.strip() for t in tags.split("|") if t.strip()]
        if len(user_list) > 1000:
            raise _Reject(40032)
        if len(party_list) > 100:
            raise _Reject(82002)
        if len(tag_list) > 100:
            raise _Reject(82003)
        targets: list[str] = []
        invalid_users: list[str] = []
        for user in user_list:
            if user == "@all":
                targets.extend(sorted(self.users))
            elif user.lower() in self.users:
                targets.append(user.lower())
            else:
                invalid_users.append(user.lower())  # "统一转为小写"
        invalid_parties = [p for p in party_list if p not in self.parties]
        invalid_tags = [t for t in tag_list if t not in self.tags]
        for p in party_list:
            targets.extend(sorted(self.parties.get(p, ())))
        for t in tag_list:
            targets.extend(sorted(self.tags.get(t, ())))
        result = {
            "invaliduser": "|".join(invalid_users),
            "invalidparty": "|".join(invalid_parties),
            "invalidtag": "|".join(invalid_tags),
            "unlicenseduser": "",
        }
        if not targets:
            raise _Reject(81013, extra=result)
        msgid = secrets.token_urlsafe(24)
        now = self.now()
        duplicate = False
        if body.get("enable_duplicate_check") in (1, "1", True):
            # "在一定时间间隔内，同样内容（请求json）的消息，不会重复收到" (default 1800 s)
            interval = float(body.get("duplicate_check_interval") or 1800)
            fingerprint = json.dumps(body, sort_keys=True, ensure_ascii=False)
            last = self._recent.get(fingerprint)
            duplicate = last is not None and now - last < interval
            if not duplicate:
                self._recent[fingerprint] = now
        for user in dict.fromkeys(targets):
            message = Delivered("message", user, msgtype, payload, now, truncated)
            if duplicate:
                message.dropped = "duplicate"
                self.dropped.append(message)
            else:
                self._deliver(message, [user], 30)  # 30/min per member and app [90236]
        return self._ok(record, **result, msgid=msgid)

    @staticmethod
    def _check_content(
        msgtype: str, payload: JSON, text_limit: int, markdown_limit: int, *, truncate_text: bool = False
    ) -> bool:
        """Validate text/markdown/news/media payloads; returns True when the text was truncated."""
        if msgtype in ("text", "markdown"):
            content = payload.get("content")
            if not isinstance(content, str) or not content:
                raise _Reject(44004)
            raw = content.encode()
            limit = text_limit if msgtype == "text" else markdown_limit
            if len(raw) <= limit:
                return False
            if msgtype == "text" and truncate_text:
                payload["content"] = raw[:limit].decode("utf-8", "ignore")
                return True
            raise _Reject(45002)
        elif msgtype in ("news", "mpnews"):
            articles = payload.get("articles")
            if not isinstance(articles, list) or not articles:
                raise _Reject(40058, "articles missing")
            if len(articles) > 8:
                raise _Reject(45008)
        elif msgtype in ("image", "voice", "video", "file") and not payload.get("media_id"):
            raise _Reject(41006)
        return False

    # ---- WeCom: group chats created by the app [90245-90248] -------------------------------

    def _chat(self, chatid: Any, token: _Token) -> _Chat:
        if not chatid:
            raise _Reject(86201)
        chat = self.chats.get(str(chatid))
        if chat is None:
            raise _Reject(86003)
        if chat.agentid != token.agentid:  # "chatid所代表的群必须是该应用所创建"
            raise _Reject(86008)
        return chat

    async def _appchat_create(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        token = self._check_token(record, "wecom")
        body = self._body(record)
        userlist = body.get("userlist")
        if not isinstance(userlist, list) or not 2 <= len(userlist) <= 2000:
            raise _Reject(86006)
        members = [str(u).lower() for u in userlist]
        if any(m not in self.users for m in members):
            raise _Reject(86007)
        owner = str(body.get("owner") or members[0]).lower()
        if owner not in self.users:
            raise _Reject(86005)
        if owner not in members:
            raise _Reject(86207)
        chatid = str(body.get("chatid") or "")
        if chatid:
            if len(chatid) > 32:
                raise _Reject(86205)
            if not CHATID_RE.fullmatch(chatid):
                raise _Reject(86001)
            if chatid in self.chats:
                raise _Reject(86215)
        else:
            chatid = "wr" + secrets.token_hex(15)
        name = str(body.get("name") or "")[:50]  # "最多50个utf8字符，超过将截断"
        self.chats[chatid] = _Chat(chatid, name, owner, list(dict.fromkeys(members)), token.agentid)
        return self._ok(record, chatid=chatid)

    async def _appchat_update(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        token = self._check_token(record, "wecom")
        body = self._body(record)
        chat = self._chat(body.get("chatid"), token)
        add = [str(u).lower() for u in body.get("add_user_list") or []]
        remove = [str(u).lower() for u in body.get("del_user_list") or []]
        if any(u not in self.users for u in add) or any(u not in chat.userlist for u in remove):
            raise _Reject(86216)
        members = [u for u in dict.fromkeys([*chat.userlist, *add]) if u not in remove]
        owner = str(body.get("owner") or "").lower()
        if not owner and chat.owner in remove:
            raise _Reject(86203)  # "del_user_list包含群主时本字段必填"
        owner = owner or chat.owner
        if owner not in members:
            raise _Reject(86207)
        if len(members) > 2000:
            raise _Reject(86006)
        chat.userlist, chat.owner = members, owner
        if body.get("name"):
            chat.name = str(body["name"])[:50]
        return self._ok(record)

    async def _appchat_get(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        token = self._check_token(record, "wecom")
        chat = self._chat(record.query.get("chatid"), token)
        info = {
            "chatid": chat.chatid,
            "name": chat.name,
            "owner": chat.owner,
            "userlist": list(chat.userlist),
            "chat_type": 0,
        }
        return self._ok(record, chat_info=info)

    async def _appchat_send(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        token = self._check_token(record, "wecom")
        body = self._body(record)
        chat = self._chat(body.get("chatid"), token)
        msgtype = body.get("msgtype")
        if msgtype not in APPCHAT_MSGTYPES or not isinstance(body.get(msgtype), dict):
            raise _Reject(40008)
        payload = dict(body[msgtype])
        self._check_content(msgtype, payload, APPCHAT_TEXT_LIMIT, APPCHAT_MARKDOWN_LIMIT)
        message = Delivered("appchat", chat.chatid, msgtype, payload, self.now())
        # "每个成员在群中收到的同一个应用的消息不可超过200条/分…超过会被丢弃，而接口不会报错" [90248]
        self._deliver(message, chat.userlist, 200)
        return self._ok(record)

    # ---- WeCom: group webhook bot [91770] --------------------------------------------------

    def _webhook_key(self, record: Recorded) -> str:
        key = record.query.get("key", "")
        if key not in self.webhook_keys:
            raise _Reject(93000)
        return key

    async def _webhook_send(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        key = self._webhook_key(record)
        body = self._body(record)
        msgtype = body.get("msgtype")
        if msgtype not in WEBHOOK_MSGTYPES or not isinstance(body.get(msgtype), dict):
            raise _Reject(40008)
        payload = dict(body[msgtype])
        if msgtype in ("text", "markdown", "markdown_v2"):
            content = payload.get("content")
            if not isinstance(content, str) or not content:
                raise _Reject(44004)
            limit = WEBHOOK_TEXT_LIMIT if msgtype == "text" else WEBHOOK_MARKDOWN_LIMIT
            if len(content.encode()) > limit:
                raise _Reject(40058, f"{msgtype}.content exceed max length {limit}")
            for name in ("mentioned_list", "mentioned_mobile_list"):
                value = payload.get(name, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise _Reject(40058, f"invalid {name}")
        elif msgtype == "image":
            try:
                data = base64.b64decode(str(payload.get("base64", "")), validate=True)
            except binascii.Error:
                raise _Reject(40058, "invalid image base64") from None
            if not data or len(data) > WEBHOOK_IMAGE_LIMIT:
                raise _Reject(40009)
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != str(payload.get("md5", "")).lower():
                raise _Reject(40058, "image md5 not match")
        elif msgtype == "news":
            articles = payload.get("articles")
            if not isinstance(articles, list) or not articles:
                raise _Reject(40058, "articles missing")
            if len(articles) > 8:
                raise _Reject(45008)
        elif msgtype in ("file", "voice"):
            media = self._media.get(str(payload.get("media_id", "")))
            if media is None or media.key != key or media.type != msgtype:
                raise _Reject(40007)
        now = self.now()
        if self.webhook_rate_limit:
            window = self._webhook_sent.setdefault(key, deque())
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= self.webhook_per_minute:  # "每个机器人发送的消息不能超过20条/分钟"
                raise _Reject(45009)
            window.append(now)
        self.delivered.setdefault(key, []).append(Delivered("webhook", key, msgtype, payload, now))
        return self._ok(record)

    async def _webhook_upload(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        key = self._webhook_key(record)
        kind = record.query.get("type", "")
        if kind not in ("file", "voice"):
            raise _Reject(40005)
        data = record.files.get("media")
        if data is None:
            raise _Reject(44001)
        limit = WEBHOOK_FILE_LIMIT if kind == "file" else WEBHOOK_VOICE_LIMIT
        if not 5 < len(data) <= limit:  # "文件大小在5B~20M之间" / voice ≤ 2 MB
            raise _Reject(40006)
        media_id = secrets.token_urlsafe(40)
        self._media[media_id] = _Media(key, kind, data, record.form.get("media", ""))
        return self._ok(record, type=kind, media_id=media_id, created_at=str(int(time.time())))

    # ---- Official Account ------------------------------------------------------------------

    async def _oa_token(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        q = record.query
        if q.get("grant_type") != "client_credential":
            raise _Reject(40002)
        if not q.get("appid"):
            raise _Reject(41002)
        if q["appid"] != self.appid:
            raise _Reject(40013)
        if not q.get("secret"):
            raise _Reject(41004)
        if q["secret"] != self.appsecret:
            raise _Reject(40125)
        token, expires_in = self._issue_token("oa", self.appid, 0)
        # Success carries no errcode on this endpoint.
        return self._answer(record, {"access_token": token, "expires_in": expires_in})

    async def _oa_custom_send(self, request: web.Request, record: Recorded) -> web.StreamResponse:
        self._check_token(record, "oa")
        body = self._body(record)
        openid = str(body.get("touser") or "")
        if openid not in self.openids:
            raise _Reject(40003)
        msgtype = body.get("msgtype")
        if msgtype not in OA_MSGTYPES or not isinstance(body.get(msgtype), dict):
            raise _Reject(40008)
        payload = dict(body[msgtype])
        if msgtype == "text":
            content = payload.get("content")
            if not isinstance(content, str) or not content:
                raise _Reject(44004)
            if len(content.encode()) > OA_TEXT_LIMIT:
                raise _Reject(45002)
        if openid in self.outside_window:
            raise _Reject(45015)
        message = Delivered("custom", openid, msgtype, payload, self.now())
        self.delivered.setdefault(openid, []).append(message)
        return self._ok(record)
