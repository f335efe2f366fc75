"""``http``: POST each delivery as JSON to a URL, signed with HMAC-SHA256.

Headers: ``X-Bridge-Timestamp`` (unix seconds) and ``X-Bridge-Signature: sha256=<hex>`` where the
hex is HMAC-SHA256(secret, f"{timestamp}.{body}"); ``X-Bridge-Delivery`` carries the delivery id so
a receiver can dedupe. 2xx = delivered (remote id: the response's ``id`` field or the delivery id);
429 and 5xx = retry, honouring Retry-After; any other 4xx (and a 3xx: redirects are not followed)
= permanent.

Plain ``http://`` URLs go through a small keep-alive HTTP/1.1 client (bridge/http1.py);
``https://`` and URLs with credentials through the daemon's aiohttp session. Both sit behind one
interface (bridge/transport.py, which says why there are two).
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import msgspec

from bridge.adapter import Context, SendContext, Sink
from bridge.config import Secret
from bridge.envelope import Delivery, encode
from bridge.errors import PermanentError, RetryableError
from bridge.http1 import Http1Pool, ProtocolError

#: header names the sink sets itself; the same names in ``headers`` are ignored
_OWN = {
    "content-type",
    "content-length",
    "host",
    "x-bridge-timestamp",
    "x-bridge-delivery",
    "x-bridge-signature",
}


class HttpOptions(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    secret: Secret | None = None
    timeout: float = 10.0
    headers: dict[str, str] = {}

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: expected an http:// or https:// URL")
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        for name, value in self.headers.items():
            if not name or any(c in name for c in "\r\n:") or "\r" in value or "\n" in value:
                raise ValueError(f"headers.{name}: names and values must not hold CR or LF")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _remote_id(body: bytes, delivery: Delivery) -> str:
    rid: Any = None
    if body.startswith(b"{"):
        try:
            rid = msgspec.json.decode(body).get("id")
        except msgspec.DecodeError:
            rid = None
    return str(rid or delivery.id)


class HttpSink(Sink):
    Options = HttpOptions
    options: HttpOptions

    def __init__(self, name: str, options: HttpOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        extra = [(k, v) for k, v in options.headers.items() if k.lower() not in _OWN]
        self._poster = ctx.poster(options.url, [*extra, ("Content-Type", "application/json")])
        #: the small client when it serves this URL (plain http://), else None
        self._pool: Http1Pool | None = self._poster if isinstance(self._poster, Http1Pool) else None
        self._secret = options.secret.reveal().encode() if options.secret else None

    async def close(self) -> None:
        await self._poster.close()

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        body = encode(delivery)
        ts = str(int(time.time()))
        headers = [("X-Bridge-Timestamp", ts), ("X-Bridge-Delivery", delivery.id)]
        if self._secret is not None:
            mac = hmac.new(self._secret, ts.encode() + b"." + body, hashlib.sha256)
            headers.append(("X-Bridge-Signature", "sha256=" + mac.hexdigest()))
        try:
            resp = await self._poster.post(headers, body, self.options.timeout)
        except ValueError as e:
            raise PermanentError(str(e)) from None
        # IncompleteReadError is an EOFError; aiohttp's connection errors are OSErrors
        except (OSError, TimeoutError, EOFError, ProtocolError, aiohttp.ClientError) as e:
            raise RetryableError(f"cannot reach the receiver: {type(e).__name__}: {e}") from None
        status, text, after = resp.status, resp.body, resp.headers.get("retry-after")
        if 200 <= status < 300:
            return _remote_id(text, delivery)
        if status == 429 or status >= 500:
            raise RetryableError(f"HTTP {status} from the receiver", retry_after(after))
        raise PermanentError(f"HTTP {status} from the receiver: {text[:200].decode(errors='replace')}")
