"""``http``: POST each delivery as JSON to a URL, signed with HMAC-SHA256.

Headers: ``X-Bridge-Timestamp`` (unix seconds) and ``X-Bridge-Signature: sha256=<hex>`` where the
hex is HMAC-SHA256(secret, f"{timestamp}.{body}"); ``X-Bridge-Delivery`` carries the delivery id so
a receiver can dedupe. 2xx = delivered (remote id: the response's ``id`` field or the delivery id);
429 and 5xx = retry, honouring Retry-After; any other 4xx = permanent.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import time

import aiohttp
import msgspec

from bridge.adapter import PermanentError, RetryableError, SendContext, Sink
from bridge.config import Secret
from bridge.envelope import Delivery, encode


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


class HttpSink(Sink):
    Options = HttpOptions
    options: HttpOptions

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        body = encode(delivery)
        ts = str(int(time.time()))
        headers = {
            **self.options.headers,
            "Content-Type": "application/json",
            "X-Bridge-Timestamp": ts,
            "X-Bridge-Delivery": delivery.id,
        }
        if self.options.secret:
            headers["X-Bridge-Signature"] = sign(self.options.secret.reveal(), ts, body)
        try:
            async with self.ctx.http().post(
                self.options.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.options.timeout),
            ) as resp:
                text = await resp.text(errors="replace")
                if 200 <= resp.status < 300:
                    try:
                        rid = msgspec.json.decode(text).get("id") if text.startswith("{") else None
                    except msgspec.DecodeError:
                        rid = None
                    return str(rid or delivery.id)
                if resp.status == 429 or resp.status >= 500:
                    raise RetryableError(
                        f"HTTP {resp.status} from the receiver", retry_after(resp.headers.get("Retry-After"))
                    )
                raise PermanentError(f"HTTP {resp.status} from the receiver: {text[:200]}")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"cannot reach the receiver: {type(e).__name__}: {e}") from None
