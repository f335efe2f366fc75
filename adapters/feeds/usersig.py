"""Tencent Cloud Chat's UserSig, TLS Sig API v2 (HMAC-SHA256 with the app's secret key).

The signed text is ``TLS.identifier:<id>\\nTLS.sdkappid:<appid>\\nTLS.time:<t>\\nTLS.expire:<s>\\n``;
its HMAC-SHA256 under the secret key (its UTF-8 bytes, not decoded) goes base64 into a JSON document
``{"TLS.ver": "2.0", "TLS.identifier", "TLS.sdkappid", "TLS.expire", "TLS.time", "TLS.sig"}``, which is
zlib-compressed and base64-encoded with ``+ / =`` written ``* - _``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import zlib
from dataclasses import dataclass
from typing import Any


def _signed_text(identifier: str, sdkappid: int, issued: int, expire: int) -> bytes:
    return (
        f"TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{issued}\nTLS.expire:{expire}\n"
    ).encode()


def gen_usersig(sdkappid: int, secret_key: str, identifier: str, expire: int, now: int | None = None) -> str:
    """A UserSig for ``identifier`` valid ``expire`` seconds from ``now`` (default: the clock)."""
    issued = int(time.time()) if now is None else now
    mac = hmac.new(secret_key.encode(), _signed_text(identifier, sdkappid, issued, expire), hashlib.sha256)
    doc = {
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": sdkappid,
        "TLS.expire": expire,
        "TLS.time": issued,
        "TLS.sig": base64.b64encode(mac.digest()).decode(),
    }
    packed = zlib.compress(json.dumps(doc, separators=(",", ":")).encode())
    return base64.b64encode(packed).decode().translate(str.maketrans("+/=", "*-_"))


@dataclass(frozen=True)
class Decoded:
    identifier: str
    sdkappid: int
    issued: int
    expire: int
    sig: str


def decode_usersig(usersig: str) -> Decoded:
    """The fields of a UserSig (no check of its signature). Raises ValueError when malformed."""
    try:
        raw = base64.b64decode(usersig.translate(str.maketrans("*-_", "+/=")), validate=True)
        doc: dict[str, Any] = json.loads(zlib.decompress(raw))
        return Decoded(
            str(doc["TLS.identifier"]),
            int(doc["TLS.sdkappid"]),
            int(doc["TLS.time"]),
            int(doc["TLS.expire"]),
            str(doc["TLS.sig"]),
        )
    except (ValueError, KeyError, TypeError, zlib.error) as e:
        raise ValueError(f"not a UserSig: {type(e).__name__}") from None


def verify_usersig(
    usersig: str, sdkappid: int, secret_key: str, identifier: str, now: int | None = None
) -> str | None:
    """None when ``usersig`` is valid for (sdkappid, identifier) at ``now``, else why not."""
    try:
        d = decode_usersig(usersig)
    except ValueError as e:
        return str(e)
    if d.sdkappid != sdkappid:
        return "sdkappid does not match"
    if d.identifier != identifier:
        return "identifier does not match"
    t = int(time.time()) if now is None else now
    if t > d.issued + d.expire:
        return "expired"
    mac = hmac.new(
        secret_key.encode(), _signed_text(d.identifier, d.sdkappid, d.issued, d.expire), hashlib.sha256
    )
    if not hmac.compare_digest(base64.b64encode(mac.digest()).decode(), d.sig):
        return "signature does not match"
    return None
