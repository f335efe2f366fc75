"""WeChat API plumbing shared by the WeCom and Official Account sinks and the ``wecom`` command.

- :class:`TokenCache`: an access token kept in Redis and shared by every instance. One process
  fetches (a Redis lock, ``SET NX PX``); the others wait for its result, so any number of
  concurrent sends on any number of instances make one ``gettoken``. A token is refreshed early
  (at ``refresh_ratio`` of its life) by one process while the others keep using the old one.
- :class:`JsonApi` / :class:`TokenApi`: JSON calls that branch on ``errcode``, never on ``errmsg``;
  a token WeChat rejects is dropped from the cache and refetched once, and the call tried once more.
  Network errors, timeouts, HTTP 429 and 5xx raise :class:`RetryableError`.
- :func:`send_error`: errcode → :class:`RetryableError` / :class:`PermanentError` with a reason
  that says what to fix.
- :func:`send_parts`: the parts of a split delivery go out in order, a retry starts after the
  last part sent, and every part after the first is charged to the same rate keys the runner
  charges once per attempt (through ``SendContext.charge_part``: the runner owns the rates).

Neither the access token nor a URL carrying it (``?access_token=``, ``?key=``) ever goes into an
error message or a log line.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from bridge import logging as blog
from bridge.adapter import PermanentError, RetryableError, SendContext, SendError
from bridge.config import Rate, Secret, parse_rates
from bridge.envelope import Attachment
from bridge.text import split_text

JSON = dict[str, Any]
WECOM_API = "https://qyapi.weixin.qq.com"
OA_API = "https://api.weixin.qq.com"

log = blog.get("wechat.api")


class ApiError(Exception):
    """WeChat answered with a non-zero errcode."""

    def __init__(self, path: str, errcode: int, errmsg: str = "") -> None:
        super().__init__(f"{path}: errcode {errcode}")
        self.path = path
        self.errcode = errcode
        # errmsg only ever serves as a hint for an unknown errcode; it never decides anything
        self.errmsg = blog.scrub(errmsg.split(", hint:")[0])[:120]


# -- the token cache -------------------------------------------------------------------------------

# KEYS[1] token, KEYS[2] lock; ARGV[1] value, ARGV[2] ttl ms, ARGV[3] lock owner
_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# drop the cached token only if it is still the one WeChat rejected (another process may have
# stored a fresh one meanwhile)
_DROP = """
local v = redis.call('GET', KEYS[1])
if v then
  local sp = string.find(v, ' ', 1, true)
  if sp and string.sub(v, sp + 1) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
end
return 0
"""

Fetch = Callable[[], Awaitable[tuple[str, int]]]


class TokenCache:
    """An access token in Redis (``key``), fetched by one process at a time.

    The value is ``"<refresh-at, unix seconds> <token>"`` with a Redis TTL a little shorter than
    the token's life. ``redis=None`` keeps the token in this process only (the CLI without Redis).
    """

    def __init__(
        self,
        redis: Any | None,
        key: str,
        fetch: Fetch,
        *,
        refresh_ratio: float = 0.8,
        lock_ttl: float = 20.0,
        wait: float = 20.0,
        poll: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.lock_key = key + ":lock"
        self.refresh_ratio = refresh_ratio
        self.lock_ttl = lock_ttl
        self.wait = wait
        self.poll = poll
        self.clock = clock
        self._fetch = fetch
        self._redis = redis
        self._local: tuple[str, float, float] | None = None  # token, refresh at, expires at
        self._local_lock = asyncio.Lock()
        if redis is not None:
            self._store = redis.register_script(_STORE)
            self._release = redis.register_script(_RELEASE)
            self._drop = redis.register_script(_DROP)

    async def get(self) -> str:
        if self._redis is None:
            return await self._get_local()
        deadline = time.monotonic() + self.wait
        while True:
            cached = await self._read()
            if cached is not None:
                token, refresh_at = cached
                if self.clock() < refresh_at:
                    return token
                # due for an early refresh: one process refreshes, the others go on with this one
                owner = await self._lock()
                if owner is None:
                    return token
                try:
                    return await self._refresh(owner)
                except SendError as e:  # the cached token is still valid: use it, refresh later
                    log.warning("wechat.token_refresh_failed", cache=self.key, error=str(e))
                    return token
            owner = await self._lock()
            if owner is not None:
                return await self._refresh(owner)
            if time.monotonic() >= deadline:
                raise RetryableError("timed out waiting for another instance to fetch the access token")
            await asyncio.sleep(self.poll)

    async def invalidate(self, token: str) -> None:
        """Forget ``token`` (WeChat rejected it) unless a newer one replaced it already."""
        if self._redis is None:
            if self._local is not None and self._local[0] == token:
                self._local = None
            return
        await self._drop(keys=[self.key], args=[token])

    async def _read(self) -> tuple[str, float] | None:
        raw = await self._redis.get(self.key) if self._redis is not None else None
        if not raw:
            return None
        at, _, token = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")
        try:
            return token, float(at)
        except ValueError:
            return None

    async def _lock(self) -> str | None:
        assert self._redis is not None
        owner = uuid.uuid4().hex
        ok = await self._redis.set(self.lock_key, owner, nx=True, px=int(self.lock_ttl * 1000))
        return owner if ok else None

    async def _refresh(self, owner: str) -> str:
        try:
            cached = await self._read()  # another process may have stored one since we looked
            if cached is not None and self.clock() < cached[1]:
                return cached[0]
            token, expires_in = await self._fetch()
            ttl, refresh_at = self._times(token, expires_in, cached[0] if cached else None)
            await self._store(
                keys=[self.key, self.lock_key], args=[f"{refresh_at:.3f} {token}", int(ttl * 1000), owner]
            )
            log.info("wechat.token_fetched", cache=self.key, expires_in=expires_in)
            return token
        finally:
            await self._release(keys=[self.lock_key], args=[owner])

    def _times(self, token: str, expires_in: int, previous: str | None) -> tuple[float, float]:
        """(seconds to keep the token, unix time of its early refresh)."""
        ttl = max(1.0, expires_in - min(60.0, expires_in * 0.05))
        # WeCom answers the same token until it expires: refreshing that one early gains nothing
        early = ttl if token == previous else expires_in * self.refresh_ratio
        return ttl, self.clock() + early

    async def _get_local(self) -> str:
        async with self._local_lock:
            now = self.clock()
            if self._local is not None and now < self._local[1] and now < self._local[2]:
                return self._local[0]
            token, expires_in = await self._fetch()
            ttl, refresh_at = self._times(token, expires_in, self._local[0] if self._local else None)
            self._local = (token, refresh_at, self.clock() + ttl)
            return token


# -- JSON calls ------------------------------------------------------------------------------------


class JsonApi:
    """JSON over HTTP to a WeChat API: errors by errcode, transport problems retryable."""

    service: ClassVar[str] = "WeCom"

    def __init__(self, api_base: str, http: Callable[[], aiohttp.ClientSession], timeout: float) -> None:
        self.api_base = api_base.rstrip("/")
        self.host = urlsplit(self.api_base).netloc or self.api_base
        self.timeout = timeout
        self._http = http

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        data: aiohttp.FormData | None = None,
    ) -> JSON:
        """One call; the answer when errcode is 0 (or absent), else :class:`ApiError`."""
        kwargs: dict[str, Any] = {"params": params, "timeout": aiohttp.ClientTimeout(total=self.timeout)}
        if body is not None:
            # a stream: aiohttp warns (an error under our test settings) on big raw bodies
            kwargs["data"] = io.BytesIO(msgspec.json.encode(body))
            kwargs["headers"] = {"Content-Type": "application/json"}
        elif data is not None:
            kwargs["data"] = data
        where = f"{self.service} {path}"
        try:
            async with self._http().request(method, self.api_base + path, **kwargs) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            raise RetryableError(f"{where}: no answer from {self.host} within {self.timeout:g} s") from None
        except aiohttp.ClientError as e:
            detail = blog.scrub(str(e))[:200]
            raise RetryableError(f"{where}: cannot reach {self.host}: {type(e).__name__}: {detail}") from None
        if status == 429 or status >= 500:
            raise RetryableError(f"{where}: HTTP {status} from {self.host}")
        if status != 200:
            raise PermanentError(f"{where}: HTTP {status} from {self.host}: check api_base ({self.api_base})")
        try:
            answer = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise RetryableError(f"{where}: {self.host} answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise RetryableError(f"{where}: {self.host} answered JSON that is not an object")
        code = answer.get("errcode", 0)
        if code != 0:
            raise ApiError(path, int(code) if isinstance(code, int) else -1, str(answer.get("errmsg", "")))
        return answer


class TokenApi(JsonApi):
    """Calls that carry ``?access_token=`` from a :class:`TokenCache`."""

    #: errcodes that mean "this token is no good": drop it, fetch another, try once more
    token_errors: ClassVar[frozenset[int]] = frozenset({40014, 42001, 41001})

    def __init__(
        self,
        api_base: str,
        http: Callable[[], aiohttp.ClientSession],
        timeout: float,
        redis: Any | None,
        token_key: str,
        *,
        refresh_ratio: float = 0.8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(api_base, http, timeout)
        self.tokens = TokenCache(
            redis, token_key, self.fetch_token, refresh_ratio=refresh_ratio,
            lock_ttl=timeout + 5, wait=timeout + 5, clock=clock,
        )  # fmt: skip

    async def fetch_token(self) -> tuple[str, int]:
        raise NotImplementedError

    async def call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> JSON:
        token = await self.tokens.get()
        try:
            return await self.request(
                method, path, params={**(params or {}), "access_token": token}, body=body
            )
        except ApiError as e:
            if e.errcode not in self.token_errors:
                raise
            log.info("wechat.token_rejected", service=self.service, path=path, errcode=e.errcode)
            await self.tokens.invalidate(token)
        token = await self.tokens.get()
        return await self.request(method, path, params={**(params or {}), "access_token": token}, body=body)


class WeComApi(TokenApi):
    """A WeCom self-built app: corp id + the app's secret; tokens shared by all who use the app."""

    def __init__(
        self,
        *,
        corp_id: str,
        corp_secret: Secret,
        agent_id: int | None,
        api_base: str,
        http: Callable[[], aiohttp.ClientSession],
        timeout: float,
        redis: Any | None,
        state_key: Callable[[str, str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = state_key("wecom", f"token:{corp_id}:{agent_id if agent_id is not None else 'app'}")
        super().__init__(api_base, http, timeout, redis, key, clock=clock)
        self.corp_id = corp_id
        self._secret = corp_secret

    async def fetch_token(self) -> tuple[str, int]:
        params = {"corpid": self.corp_id, "corpsecret": self._secret.reveal()}
        try:
            answer = await self.request("GET", "/cgi-bin/gettoken", params=params)
        except ApiError as e:
            raise _token_error(e, WECOM_TOKEN_ERRORS) from None
        return str(answer["access_token"]), int(answer.get("expires_in") or 7200)


class OfficialAccountApi(TokenApi):
    """An Official Account: app id + app secret (``/cgi-bin/token``)."""

    service = "Official Account"
    # an OA token superseded by a newer one, or unknown, answers 40001
    token_errors = frozenset({40001, 40014, 42001, 41001})

    def __init__(
        self,
        *,
        app_id: str,
        app_secret: Secret,
        api_base: str,
        http: Callable[[], aiohttp.ClientSession],
        timeout: float,
        redis: Any | None,
        state_key: Callable[[str, str], str],
        refresh_ratio: float = 0.8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = state_key("wechat_oa", f"token:{app_id}")
        super().__init__(api_base, http, timeout, redis, key, refresh_ratio=refresh_ratio, clock=clock)
        self.app_id = app_id
        self._secret = app_secret

    async def fetch_token(self) -> tuple[str, int]:
        params = {"grant_type": "client_credential", "appid": self.app_id, "secret": self._secret.reveal()}
        try:
            answer = await self.request("GET", "/cgi-bin/token", params=params)
        except ApiError as e:
            raise _token_error(e, OA_TOKEN_ERRORS) from None
        return str(answer["access_token"]), int(answer.get("expires_in") or 7200)


# -- errcode → what the runner does ----------------------------------------------------------------

WECOM_TOKEN_ERRORS = {
    40001: "corp_secret is wrong: copy the app's Secret from the WeCom admin console (应用管理 → the app)",
    40013: "corp_id is wrong: copy the CorpID from the WeCom admin console (我的企业 → 企业信息)",
    41002: "corp_id is missing",
    41004: "corp_secret is missing",
}
OA_TOKEN_ERRORS = {
    40013: "app_id is wrong: copy the AppID from the Official Account platform (设置与开发 → 基本配置)",
    40125: "app_secret is wrong: copy the AppSecret from the Official Account platform "
    "(设置与开发 → 基本配置)",
    40164: "this server's IP is not on the account's IP whitelist: add it under 设置与开发 → 基本配置 → "
    "IP白名单 in the Official Account platform",
    41002: "app_id is missing",
    41004: "app_secret is missing",
}

#: errcodes that are final, and what to fix
PERMANENT = {
    60020: "this server's IP is not a trusted IP of the WeCom app: add its public IP under the app's "
    "'Trusted IP' (企业可信IP) in the WeCom admin console (应用管理 → the app → 企业可信IP)",
    93000: "the webhook key is not valid (the robot was removed or the key is wrong): copy the robot's "
    "webhook URL again from the group's robot settings into this sink's key",
    81013: "no valid recipient: the user id is unknown or outside the app's visible range (可见范围); "
    "check the user id and the app's visible range in the WeCom admin console",
    82001: "no recipient given: the target needs a user id, department or tag",
    301002: "agent_id does not belong to the app whose corp_secret is configured: fix agent_id",
    86008: "the chat was not created by this app: an app can only send to chats it created "
    "(wechat-bridge wecom appchat create)",
    40008: "WeChat does not accept this message type here",
    41006: "the attachment's media_id is missing",
    40007: "the attachment's media_id is not valid (WeChat media ids expire after 3 days)",
    44004: "the message is empty",
    45008: "too many articles in one news message (the bridge sends at most 8)",
    40003: "the openid is not a follower of this Official Account: check the conversation id",
    45015: "the 48-hour customer-service window is closed (or the user unfollowed): the user must send "
    "a message to the Official Account before it can answer",
    45047: "too many customer-service messages since the user's last message: the user must write "
    "to the Official Account again",
    48001: "the Official Account has no permission for customer-service messages (verified service "
    "accounts only)",
}
TOO_LONG = (40058, 45002)
CHAT_GONE = (86001, 86003, 40050)


def _token_error(e: ApiError, table: dict[int, str]) -> SendError:
    if e.errcode in table:
        return PermanentError(
            f"fetching the access token failed with errcode {e.errcode}: {table[e.errcode]}"
        )
    return send_error(e, backoff=60.0, oa=table is OA_TOKEN_ERRORS)


WECOM_CODES = "https://developer.work.weixin.qq.com/devtool/query?e="
OA_CODES = "https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html"


def send_error(e: ApiError, *, target: str = "", backoff: float = 60.0, oa: bool = False) -> SendError:
    """The error to raise for a failed call: retry, back off, or dead-letter with what to fix."""
    code = e.errcode
    head = f"{e.path}: errcode {code}"
    if code == -1:
        return RetryableError(f"{head}: WeChat is busy")
    if code == 45009:
        return RetryableError(f"{head}: frequency limit reached, backing off", retry_after=backoff)
    if code == 45033:
        return RetryableError(f"{head}: too many concurrent calls, backing off", retry_after=backoff / 12)
    if code in TokenApi.token_errors or code == 40001:
        return RetryableError(f"{head}: the access token was rejected again after a refresh")
    if code in CHAT_GONE:
        return PermanentError(
            f"{head}: the chat {target or ''} does not exist (any more): create one with `wechat-bridge "
            "wecom appchat create` and put chat:<chatid> in the route's conversation"
        )
    if code in TOO_LONG:
        return PermanentError(
            f"{head}: WeChat rejected a parameter as invalid or too long; the bridge splits text to the "
            "sink's text_limit/markdown_limit before sending, so a too-long part should not happen: "
            "lower those limits for this sink and report it"
        )
    if code in PERMANENT:
        return PermanentError(
            f"{head}: {PERMANENT[code]}" + (f" ({target})" if target and code == 81013 else "")
        )
    hint = f" ({e.errmsg})" if e.errmsg else ""
    docs = OA_CODES if oa else f"{WECOM_CODES}{code}"
    return PermanentError(f"{head}{hint}: look the errcode up at {docs}")


# -- parts of one delivery -------------------------------------------------------------------------


@dataclass
class Part:
    """One message on the wire: its msgtype and the type's object; ``attachment`` when the part
    is built at send time (downloads, uploads)."""

    msgtype: str
    payload: JSON = field(default_factory=dict)
    attachment: Attachment | None = None


def text_parts(
    text: str, *, markdown: bool, text_limit: int, markdown_limit: int, number_parts: bool = True
) -> list[Part]:
    """``text`` cut to the limits, as text or markdown parts (numbered "(i/n)" when split)."""
    if not text:
        return []
    if markdown:
        chunks = split_text(text, markdown_limit, number_parts=number_parts, markdown=True)
        return [Part("markdown", {"content": c}) for c in chunks]
    return [Part("text", {"content": c}) for c in split_text(text, text_limit, number_parts=number_parts)]


def attachment_line(a: Attachment) -> str:
    """An attachment a sink cannot send natively, as a line of text (so it is never dropped)."""
    label = a.title or a.name or ""
    where = a.url or (f"media_id {a.media_id}" if a.media_id else "")
    if a.kind == "location":
        lat, lng = a.extra.get("lat", a.extra.get("latitude")), a.extra.get("lng", a.extra.get("longitude"))
        where = where or (f"{lat},{lng}" if lat is not None and lng is not None else "")
    return " ".join(x for x in (f"[{a.kind}]", label, where) if x)


def article(a: Attachment) -> JSON:
    """A news article from a link attachment (``extra.picurl`` for the cover)."""
    out: JSON = {"title": a.title or a.name or a.url or "", "url": a.url or ""}
    if a.description:
        out["description"] = a.description
    pic = a.extra.get("picurl") or a.extra.get("pic_url")
    if isinstance(pic, str) and pic:
        out["picurl"] = pic
    return out


def news_parts(links: Sequence[Attachment], per_message: int = 8) -> list[Part]:
    return [
        Part("news", {"articles": [article(a) for a in links[i : i + per_message]]})
        for i in range(0, len(links), per_message)
    ]


async def send_parts(
    ctx: SendContext,
    parts: Sequence[Part],
    send_one: Callable[[int, Part], Awaitable[str | None]],
) -> list[str]:
    """Send ``parts[k:]`` in order, where ``k`` parts went out on earlier attempts; record each.

    The attempt's claim paid the rate for its first part; each further part is charged to the
    runner's rate keys through ``ctx.charge_part`` (which yields to the runner when the wait runs
    past the attempt's budget: the next attempt goes on from the parts recorded)."""
    first = await ctx.parts_sent()
    ids: list[str] = []
    for i in range(first, len(parts)):
        if i > first:
            await ctx.charge_part(f"rate limit: {i} of {len(parts)} parts sent")
        remote = await send_one(i, parts[i])
        if remote:
            ids.append(remote)
        await ctx.part_sent(i + 1)
    return ids


def check_limit(key: str, limit: int, ceiling: int) -> None:
    """Option check for a byte limit: sensible, and not past what WeChat accepts whole."""
    if not 64 <= limit <= ceiling:
        raise ValueError(f"{key}: must be between 64 and {ceiling} bytes (WeChat truncates or rejects more)")


def check_rates(key: str, spec: str) -> list[Rate]:
    try:
        return parse_rates(spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def fits(text: str | None, limit: int) -> bool:
    """True when ``text`` is at most ``limit`` UTF-8 bytes (WeChat truncates card fields past it)."""
    return len((text or "").encode()) <= limit
