"""WeChat / WeCom callback message crypto ("WXBizMsgCrypt"), written from the published scheme.

One scheme serves three inbound types; only the receive id differs:

* WeCom self-built app callbacks (XML):     receive_id = the CorpID
* WeCom AI bot (智能机器人) callbacks (JSON): receive_id = "" (empty)
* Official Account safe mode (XML):         receive_id = the AppID

Scheme (WeCom doc 90968 / 101033, Official Account "message encryption" docs):

* AES key = base64decode(EncodingAESKey + "="), 32 bytes; AES-256-CBC with iv = key[:16].
* plaintext = 16 random bytes + 4-byte big-endian len(msg) + msg + receive_id,
  PKCS#7-padded to a multiple of 32 bytes (pad values 1..32).
* msg_signature = sha1 hex of the sorted [token, timestamp, nonce, encrypt] joined with "".
* Official Account plaintext mode: signature = sha1 hex of the sorted [token, timestamp, nonce].

Bytes in, bytes out: the caller parses and builds the XML/JSON bodies.  The two reply-envelope
helpers only format fixed, validated fields (base64 text, hex, digits, a restricted nonce).

Errors: every failure on untrusted input raises a CryptoError subclass whose message is a fixed
string; no message ever carries the key, the token, a ciphertext or a plaintext.
Inbound handlers map BadSignature to HTTP 403 and every other CryptoError to 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import struct
from dataclasses import dataclass

from Crypto.Cipher import AES

__all__ = [
    "BLOCK_SIZE",
    "BadCiphertext",
    "BadKey",
    "BadReceiveId",
    "BadSignature",
    "CryptoError",
    "EncryptedReply",
    "WXBizMsgCrypt",
    "decode_aes_key",
    "pkcs7_pad",
    "pkcs7_unpad",
    "plain_signature",
    "signature",
    "verify_plain_signature",
    "verify_signature",
]

BLOCK_SIZE = 32  # WeChat pads to 32-byte blocks, not AES's 16.
RANDOM_PREFIX_LEN = 16
_HEADER_LEN = RANDOM_PREFIX_LEN + 4

_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,20}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CryptoError(Exception):
    """Base class of every failure on untrusted input (or on a bad key)."""


class BadKey(CryptoError):
    """The EncodingAESKey is not 43 base64 characters decoding to 32 bytes."""


class BadSignature(CryptoError):
    """The msg_signature / signature does not match (map to HTTP 403)."""


class BadCiphertext(CryptoError):
    """Bad base64, bad length, bad padding or a bad length field."""


class BadReceiveId(CryptoError):
    """The receive id inside the plaintext is not the expected CorpID / AppID / ""."""


def _utf8(value: str) -> bytes:
    # surrogatepass: never raise UnicodeEncodeError on odd (untrusted) input.
    return value.encode("utf-8", "surrogatepass")


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """msg_signature: sha1 hex of the four strings, sorted, joined with ""."""
    return hashlib.sha1(_utf8("".join(sorted((token, timestamp, nonce, encrypt))))).hexdigest()


def plain_signature(token: str, timestamp: str, nonce: str) -> str:
    """Official Account plaintext-mode `signature`: sha1 hex of the three strings, sorted."""
    return hashlib.sha1(_utf8("".join(sorted((token, timestamp, nonce))))).hexdigest()


def _check_signature(expected: str, given: str) -> None:
    if not hmac.compare_digest(_utf8(expected), _utf8(given)):
        raise BadSignature("signature mismatch")


def verify_signature(msg_signature: str, token: str, timestamp: str, nonce: str, encrypt: str) -> None:
    """Raise BadSignature unless msg_signature matches (constant-time compare)."""
    _check_signature(signature(token, timestamp, nonce, encrypt), msg_signature)


def verify_plain_signature(sig: str, token: str, timestamp: str, nonce: str) -> None:
    """Raise BadSignature unless the plaintext-mode signature matches (constant-time compare)."""
    _check_signature(plain_signature(token, timestamp, nonce), sig)


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """EncodingAESKey (43 base64 chars) -> 32-byte AES key.

    The 43rd character carries 2 spare bits that Tencent's keys do not zero (the published
    sample key ends in "C"), so they are ignored here rather than rejected.
    """
    if not isinstance(encoding_aes_key, str) or _KEY_RE.fullmatch(encoding_aes_key) is None:
        raise BadKey("EncodingAESKey must be 43 base64 characters")
    key = binascii.a2b_base64(encoding_aes_key + "=")
    if len(key) != 32:  # pragma: no cover - 43 valid chars + "=" always decode to 32 bytes
        raise BadKey("EncodingAESKey must decode to 32 bytes")
    return key


def cbc_decrypt_reference(key: bytes, iv: bytes, raw: bytes) -> bytes:
    """AES-CBC decryption the plain way, a new CBC cipher per message: what the fast path in
    :meth:`WXBizMsgCrypt._cbc_decrypt` must equal."""
    return bytes(AES.new(key, AES.MODE_CBC, iv=iv).decrypt(raw))


def pkcs7_pad(data: bytes, block_size: int = BLOCK_SIZE) -> bytes:
    """PKCS#7 pad to a multiple of block_size; always adds 1..block_size bytes."""
    n = block_size - len(data) % block_size
    return data + bytes((n,)) * n


def pkcs7_unpad(data: bytes, block_size: int = BLOCK_SIZE) -> bytes:
    """Strict PKCS#7 unpad: pad value in 1..block_size, not longer than data, all bytes equal."""
    if not data:
        raise BadCiphertext("empty plaintext")
    n = data[-1]
    if n < 1 or n > block_size or n > len(data):
        raise BadCiphertext("bad padding")
    if not hmac.compare_digest(data[-n:], bytes((n,)) * n):
        raise BadCiphertext("bad padding")
    return data[:-n]


def _b64decode_strict(text: str) -> bytes:
    """Strict base64: the alphabet, "=" only as final padding, no whitespace, no missing padding."""
    if not isinstance(text, str) or not text:
        raise BadCiphertext("ciphertext is not strict base64")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        raise BadCiphertext("ciphertext is not strict base64") from None


@dataclass(frozen=True, slots=True)
class EncryptedReply:
    """The four fields of an encrypted passive reply."""

    encrypt: str
    msgsignature: str
    timestamp: str
    nonce: str

    def to_xml(self) -> bytes:
        """WeCom app / Official Account safe-mode passive reply body."""
        return (
            f"<xml><Encrypt><![CDATA[{self.encrypt}]]></Encrypt>"
            f"<MsgSignature><![CDATA[{self.msgsignature}]]></MsgSignature>"
            f"<TimeStamp>{self.timestamp}</TimeStamp>"
            f"<Nonce><![CDATA[{self.nonce}]]></Nonce></xml>"
        ).encode("ascii")

    def to_json(self) -> bytes:
        """WeCom AI bot passive reply body.

        timestamp is sent as a JSON string, as Tencent's WXBizJsonMsgCrypt sample and the WeCom
        team's own plugin do (doc 101033's example shows a number; both forms are in use).
        """
        body = {
            "encrypt": self.encrypt,
            "msgsignature": self.msgsignature,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
        }
        return json.dumps(body, separators=(",", ":")).encode("ascii")


class WXBizMsgCrypt:
    """Verify, decrypt and encrypt for one (token, EncodingAESKey, receive_id) triple."""

    __slots__ = ("_ecb", "_iv", "_key", "_receive_id", "_token")

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._key = decode_aes_key(encoding_aes_key)
        self._iv = self._key[:16]
        # CBC decryption done as ECB + XOR: ECB is stateless, so one cipher object serves every
        # message (cheaper than a new CBC object per message: bench/RESULTS.md)
        self._ecb = AES.new(self._key, AES.MODE_ECB)
        self._token = token
        self._receive_id = _utf8(receive_id)

    def __repr__(self) -> str:  # never show the key or the token
        return f"WXBizMsgCrypt(receive_id={self._receive_id.decode('utf-8', 'replace')!r})"

    @property
    def receive_id(self) -> str:
        return self._receive_id.decode("utf-8", "surrogatepass")

    # --- signatures --------------------------------------------------------------------------

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return signature(self._token, timestamp, nonce, encrypt)

    def verify_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        verify_signature(msg_signature, self._token, timestamp, nonce, encrypt)

    def verify_plain_signature(self, sig: str, timestamp: str, nonce: str) -> None:
        """Official Account plaintext / compatible mode `signature` check."""
        verify_plain_signature(sig, self._token, timestamp, nonce)

    # --- decrypt -----------------------------------------------------------------------------

    def decrypt(self, encrypt: str) -> bytes:
        """Decrypt an Encrypt / encrypt / echostr value and return msg.  No signature check."""
        raw = _b64decode_strict(encrypt)
        if not raw or len(raw) % AES.block_size:
            raise BadCiphertext("ciphertext length is not a positive multiple of 16")
        plain = pkcs7_unpad(self._cbc_decrypt(raw))
        if len(plain) < _HEADER_LEN:
            raise BadCiphertext("plaintext too short")
        (msg_len,) = struct.unpack(">I", plain[RANDOM_PREFIX_LEN:_HEADER_LEN])
        end = _HEADER_LEN + msg_len
        if end > len(plain):
            raise BadCiphertext("length field out of bounds")
        if not hmac.compare_digest(plain[end:], self._receive_id):
            raise BadReceiveId("receive id mismatch")
        return plain[_HEADER_LEN:end]

    def _cbc_decrypt(self, raw: bytes) -> bytes:
        """AES-CBC decryption as one ECB decryption and one XOR (the fast path).

        CBC: P[i] = D(C[i]) xor C[i-1], with C[-1] = the IV; XORed as two big integers. The same
        bytes as :func:`cbc_decrypt_reference` (pycryptodome's own CBC) for any key and any
        ciphertext of whole blocks: tests/unit/test_wechat_crypto.py checks it with hypothesis.
        """
        chained = int.from_bytes(self._iv + raw[:-16], "big")
        return (int.from_bytes(self._ecb.decrypt(raw), "big") ^ chained).to_bytes(len(raw), "big")

    def verify_and_decrypt(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> bytes:
        """Check msg_signature over `encrypt`, then decrypt it (POST bodies and the GET echostr)."""
        self.verify_signature(msg_signature, timestamp, nonce, encrypt)
        return self.decrypt(encrypt)

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> bytes:
        """GET URL verification: the reply body is the returned bytes, verbatim."""
        return self.verify_and_decrypt(msg_signature, timestamp, nonce, echostr)

    # --- encrypt -----------------------------------------------------------------------------

    def encrypt(self, msg: bytes, *, random_prefix: bytes | None = None) -> str:
        """Encrypt msg; random_prefix (16 bytes) is injectable for deterministic tests."""
        if random_prefix is None:
            random_prefix = secrets.token_bytes(RANDOM_PREFIX_LEN)
        elif len(random_prefix) != RANDOM_PREFIX_LEN:
            raise ValueError("random_prefix must be 16 bytes")
        if len(msg) > 0xFFFFFFFF:
            raise ValueError("message too long")
        plain = random_prefix + struct.pack(">I", len(msg)) + msg + self._receive_id
        cipher = AES.new(self._key, AES.MODE_CBC, iv=self._iv).encrypt(pkcs7_pad(plain))
        return base64.b64encode(cipher).decode("ascii")

    def encrypt_reply(
        self, msg: bytes, timestamp: str, nonce: str, *, random_prefix: bytes | None = None
    ) -> EncryptedReply:
        """Encrypt msg and sign it for a passive reply; then .to_xml() or .to_json().

        timestamp must be decimal digits; nonce is usually echoed from the callback URL and
        must match [A-Za-z0-9_-]{1,64} so it can be embedded without escaping.
        """
        if _TIMESTAMP_RE.fullmatch(timestamp) is None:
            raise ValueError("timestamp must be decimal digits")
        if _NONCE_RE.fullmatch(nonce) is None:
            raise ValueError("nonce must match [A-Za-z0-9_-]{1,64}")
        encrypt = self.encrypt(msg, random_prefix=random_prefix)
        return EncryptedReply(encrypt, self.signature(timestamp, nonce, encrypt), timestamp, nonce)

    def reply_xml(
        self, msg: bytes, timestamp: str, nonce: str, *, random_prefix: bytes | None = None
    ) -> bytes:
        """Encrypted passive-reply XML (WeCom app, Official Account safe mode)."""
        return self.encrypt_reply(msg, timestamp, nonce, random_prefix=random_prefix).to_xml()

    def reply_json(
        self, msg: bytes, timestamp: str, nonce: str, *, random_prefix: bytes | None = None
    ) -> bytes:
        """Encrypted passive-reply JSON (WeCom AI bot)."""
        return self.encrypt_reply(msg, timestamp, nonce, random_prefix=random_prefix).to_json()
