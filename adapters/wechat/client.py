"""JSON calls to a WeChat API, with an access token when the API needs one.

- :class:`JsonApi` / :class:`TokenApi`: JSON calls that branch on ``errcode``, never on ``errmsg``;
  a token WeChat rejects is dropped from the cache (:mod:`adapters.wechat.tokens`) and refetched
  once, and the call tried once more. Network errors, timeouts, HTTP 429 and 5xx raise
  :class:`RetryableError`; a non-zero errcode raises :class:`ApiError`, which
  :func:`adapters.wechat.errcodes.send_error` turns into what the runner does.
- :class:`WeComApi` (a self-built app) and :class:`OfficialAccountApi`: how each gets its token.

Neither the access token nor a URL carrying it (``?access_token=``, ``?key=``) ever goes into an
error message or a log line.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from adapters.wechat.errcodes import OA_TOKEN_ERRORS, TOKEN_ERRORS, WECOM_TOKEN_ERRORS, ApiError, token_error
from adapters.wechat.tokens import TokenCache
from bridge import logging as blog
from bridge.config import Secret
from bridge.errors import PermanentError, RetryableError
from bridge.redact import scrub

JSON = dict[str, Any]
WECOM_API = "https://qyapi.weixin.qq.com"
OA_API = "https://api.weixin.qq.com"

log = blog.get("wechat.api")


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
            detail = scrub(str(e))[:200]
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
    token_errors: ClassVar[frozenset[int]] = TOKEN_ERRORS

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
            raise token_error(e, WECOM_TOKEN_ERRORS) from None
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
            raise token_error(e, OA_TOKEN_ERRORS) from None
        return str(answer["access_token"]), int(answer.get("expires_in") or 7200)
