"""UserSig (TLS Sig API v2) against the algorithm's published test data.

Tencent's tls-sig-api-v2 libraries (Go, Java, C#, PHP, Python, Node) all test with SDKAppID
1400000000, the key 5bd2850f…b93b5e and the identifier "xiaojun", but publish no fixed expected
UserSig (their tests sign at the current time and verify the result). So: the HMAC of a fixed time
is checked against a value computed outside Python (``openssl dgst -sha256 -hmac <key> -binary |
base64`` over the documented signed text), and the whole UserSig is taken apart independently of
the code under test (base64 with ``*-_``, zlib, JSON) and its fields and signature checked.
"""

from __future__ import annotations

import base64
import json
import zlib

from adapters.feeds.usersig import decode_usersig, gen_usersig, verify_usersig

SDKAPPID = 1400000000
KEY = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"
#: printf 'TLS.identifier:xiaojun\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:15552000\n'
#:   | openssl dgst -sha256 -hmac 5bd2850f…b93b5e -binary | base64
OPENSSL_XIAOJUN = "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="
#: the same for administrator, time 1698741698 (the seed's sample MsgTimeStamp), expire 86400
OPENSSL_ADMIN = "EALEe2EeJKN6hS+cGLlQyqku/Dt167Yc6GZZLQkIR4Y="


def _open(sig: str) -> dict[str, object]:
    """An independent unpacking: undo the URL-safe escapes by hand, base64, zlib, JSON."""
    std = sig.replace("*", "+").replace("-", "/").replace("_", "=")
    doc: dict[str, object] = json.loads(zlib.decompress(base64.b64decode(std)))
    return doc


def test_published_test_data_fixed_time() -> None:
    sig = gen_usersig(SDKAPPID, KEY, "xiaojun", 86400 * 180, now=1700000000)
    assert set(sig) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-_")
    assert _open(sig) == {
        "TLS.ver": "2.0",
        "TLS.identifier": "xiaojun",
        "TLS.sdkappid": SDKAPPID,
        "TLS.expire": 15552000,
        "TLS.time": 1700000000,
        "TLS.sig": OPENSSL_XIAOJUN,
    }


def test_admin_sig_fixed_time() -> None:
    sig = gen_usersig(SDKAPPID, KEY, "administrator", 86400, now=1698741698)
    assert _open(sig)["TLS.sig"] == OPENSSL_ADMIN


def test_verify_accepts_and_refuses() -> None:
    sig = gen_usersig(SDKAPPID, KEY, "xiaojun", 100, now=1700000000)
    assert verify_usersig(sig, SDKAPPID, KEY, "xiaojun", now=1700000050) is None
    assert verify_usersig(sig, SDKAPPID, KEY, "xiaojun", now=1700000101) == "expired"
    assert verify_usersig(sig, SDKAPPID + 1, KEY, "xiaojun", now=1700000050) == "sdkappid does not match"
    assert verify_usersig(sig, SDKAPPID, KEY, "other", now=1700000050) == "identifier does not match"
    assert (
        verify_usersig(sig, SDKAPPID, KEY[:-1] + "f", "xiaojun", now=1700000050) == "signature does not match"
    )
    assert verify_usersig("not-a-sig", SDKAPPID, KEY, "xiaojun") is not None
    d = decode_usersig(sig)
    assert (d.identifier, d.sdkappid, d.issued, d.expire) == ("xiaojun", SDKAPPID, 1700000000, 100)
