"""Tests for adapters.wechat.crypto: published vectors, error classes, round trips, properties."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import struct

import pytest
from Crypto.Cipher import AES
from defusedxml import ElementTree
from hypothesis import given
from hypothesis import strategies as st

from adapters.wechat.crypto import (
    BLOCK_SIZE,
    BadCiphertext,
    BadKey,
    BadReceiveId,
    BadSignature,
    CryptoError,
    WXBizMsgCrypt,
    cbc_decrypt_reference,
    decode_aes_key,
    pkcs7_pad,
    pkcs7_unpad,
    plain_signature,
    signature,
    verify_plain_signature,
    verify_signature,
)
from tests.vectors.wechat_vectors import (
    CALLBACK_VECTORS,
    ENCRYPT_VECTORS,
    OPEN_PLATFORM_REPLY,
    PLAIN_SIGNATURE_VECTORS,
    WECHATPY_ECHO,
    WECOM_MSG,
    WECOM_URL_VERIFY,
    CallbackVector,
    EncryptVector,
    PlainSignatureVector,
)

TOKEN = "QDG6eK"
KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
CORP = "wx5823bf96d3bd56c7"


def _crypt(receive_id: str = CORP) -> WXBizMsgCrypt:
    return WXBizMsgCrypt(TOKEN, KEY, receive_id)


def _raw_encrypt(padded_plaintext: bytes, key: str = KEY) -> str:
    """AES-CBC over bytes we lay out by hand (no padding added), to forge bad plaintexts."""
    k = decode_aes_key(key)
    return base64.b64encode(AES.new(k, AES.MODE_CBC, iv=k[:16]).encrypt(padded_plaintext)).decode()


def _raw_decrypt(encrypt: str, key: str) -> bytes:
    k = decode_aes_key(key)
    return AES.new(k, AES.MODE_CBC, iv=k[:16]).decrypt(base64.b64decode(encrypt))


def _frame(msg: bytes, receive_id: bytes = CORP.encode(), length: int | None = None) -> bytes:
    n = len(msg) if length is None else length
    return b"R" * 16 + struct.pack(">I", n) + msg + receive_id


# --- published vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("v", CALLBACK_VECTORS, ids=lambda v: v.name)
def test_published_callback_vector_signature_and_decrypt(v: CallbackVector) -> None:
    c = WXBizMsgCrypt(v.token, v.encoding_aes_key, v.receive_id)
    assert signature(v.token, v.timestamp, v.nonce, v.encrypt) == v.msg_signature
    assert c.signature(v.timestamp, v.nonce, v.encrypt) == v.msg_signature
    verify_signature(v.msg_signature, v.token, v.timestamp, v.nonce, v.encrypt)
    assert c.verify_and_decrypt(v.msg_signature, v.timestamp, v.nonce, v.encrypt) == v.expected
    assert c.verify_url(v.msg_signature, v.timestamp, v.nonce, v.encrypt) == v.expected


@pytest.mark.parametrize("v", CALLBACK_VECTORS, ids=lambda v: v.name)
def test_published_callback_vector_rejects_tampering(v: CallbackVector) -> None:
    c = WXBizMsgCrypt(v.token, v.encoding_aes_key, v.receive_id)
    with pytest.raises(BadSignature):
        c.verify_and_decrypt(v.msg_signature, v.timestamp, v.nonce + "1", v.encrypt)
    with pytest.raises(BadSignature):
        c.verify_and_decrypt(v.msg_signature.upper(), v.timestamp, v.nonce, v.encrypt)
    with pytest.raises(BadSignature):
        WXBizMsgCrypt(v.token + "x", v.encoding_aes_key, v.receive_id).verify_and_decrypt(
            v.msg_signature, v.timestamp, v.nonce, v.encrypt
        )
    for other in (v.receive_id + "x", v.receive_id[:-1], "" if v.receive_id else "wx0000000000000000"):
        with pytest.raises(BadReceiveId):
            WXBizMsgCrypt(v.token, v.encoding_aes_key, other).decrypt(v.encrypt)


def test_wechatpy_published_bad_nonce_fails() -> None:
    # wechatpy tests/test_crypto.py test_check_signature_should_fail: nonce 437374424.
    v = WECHATPY_ECHO
    with pytest.raises(BadSignature):
        verify_signature(v.msg_signature, v.token, v.timestamp, "437374424", v.encrypt)


@pytest.mark.parametrize("v", ENCRYPT_VECTORS, ids=lambda v: v.name)
def test_published_encrypt_vector(v: EncryptVector) -> None:
    c = WXBizMsgCrypt(v.token, v.encoding_aes_key, v.receive_id)
    assert c.encrypt(v.msg, random_prefix=v.random_prefix) == v.encrypt
    assert c.decrypt(v.encrypt) == v.msg
    if v.msgsignature:
        reply = c.encrypt_reply(v.msg, v.timestamp, v.nonce, random_prefix=v.random_prefix)
        assert (reply.encrypt, reply.msgsignature) == (v.encrypt, v.msgsignature)
        assert c.verify_and_decrypt(v.msgsignature, v.timestamp, v.nonce, v.encrypt) == v.msg


@pytest.mark.parametrize("v", PLAIN_SIGNATURE_VECTORS, ids=lambda v: v.name)
def test_published_plain_signature(v: PlainSignatureVector) -> None:
    assert plain_signature(v.token, v.timestamp, v.nonce) == v.signature
    verify_plain_signature(v.signature, v.token, v.timestamp, v.nonce)
    WXBizMsgCrypt(v.token, "A" * 43, "").verify_plain_signature(v.signature, v.timestamp, v.nonce)
    with pytest.raises(BadSignature):
        verify_plain_signature(v.signature, v.token, v.timestamp, v.nonce + "0")


def test_published_vectors_need_32_byte_padding() -> None:
    # Tencent pads to 32: every published ciphertext is a multiple of 32 bytes, and several
    # carry pad values 17..32, which a 16-byte PKCS#7 unpad would reject.
    pads = []
    for v in CALLBACK_VECTORS:
        raw = _raw_decrypt(v.encrypt, v.encoding_aes_key)
        assert len(raw) % 32 == 0
        pads.append(raw[-1])
    assert any(p > 16 for p in pads)
    assert {30, 22} <= set(pads)


def test_open_platform_reply_xml_fields() -> None:
    v = OPEN_PLATFORM_REPLY
    c = WXBizMsgCrypt(v.token, v.encoding_aes_key, v.receive_id)
    root = ElementTree.fromstring(c.reply_xml(v.msg, v.timestamp, v.nonce, random_prefix=v.random_prefix))
    assert root.tag == "xml"
    assert [child.tag for child in root] == ["Encrypt", "MsgSignature", "TimeStamp", "Nonce"]
    assert root.findtext("Encrypt") == v.encrypt
    assert root.findtext("MsgSignature") == v.msgsignature
    assert root.findtext("TimeStamp") == v.timestamp
    assert root.findtext("Nonce") == v.nonce


def test_echostr_plus_turned_into_space_is_rejected() -> None:
    # A query parser that maps '+' to ' ' corrupts echostr; it must fail, never decrypt garbage.
    v = WECOM_URL_VERIFY
    broken = v.encrypt.replace("+", " ")
    assert broken != v.encrypt
    with pytest.raises(BadSignature):
        _crypt().verify_url(v.msg_signature, v.timestamp, v.nonce, broken)
    with pytest.raises(BadCiphertext):
        _crypt().decrypt(broken)


def test_signature_checked_before_decrypt() -> None:
    # Garbage ciphertext with a wrong signature is a 403 (BadSignature), not a 400.
    with pytest.raises(BadSignature):
        _crypt().verify_and_decrypt("0" * 40, "1", "2", "!!not base64!!")


# --- error classes --------------------------------------------------------------------------------


def test_exception_hierarchy() -> None:
    for cls in (BadSignature, BadCiphertext, BadReceiveId, BadKey):
        assert issubclass(cls, CryptoError)
    assert issubclass(CryptoError, Exception)
    assert len({BadSignature, BadCiphertext, BadReceiveId, BadKey}) == 4
    assert not issubclass(BadSignature, BadCiphertext)


@pytest.mark.parametrize(
    "key",
    [
        "",
        KEY[:42],
        KEY + "A",
        KEY[:42] + "!",
        KEY[:42] + "=",
        KEY[:42] + "\u00e9",
        " " + KEY[1:],
        KEY + "=",
    ],
)
def test_bad_key(key: str) -> None:
    with pytest.raises(BadKey):
        WXBizMsgCrypt(TOKEN, key, CORP)
    with pytest.raises(BadKey):
        decode_aes_key(key)


def test_key_decoding() -> None:
    assert decode_aes_key("A" * 43) == bytes(32)
    # The published key's last char 'C' has non-zero spare bits; it must still be accepted.
    assert len(decode_aes_key(KEY)) == 32
    assert decode_aes_key(KEY) == base64.b64decode(KEY + "=")


def test_empty_token_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="token"):
        WXBizMsgCrypt("", KEY, CORP)


@pytest.mark.parametrize("pad", [0, 33, 48, 255])
def test_pad_value_out_of_range(pad: int) -> None:
    frame = _frame(b"hello")
    body = frame + b"\x00" * (-(len(frame) + 1) % 32)
    forged = _raw_encrypt(body + bytes((pad,)))
    with pytest.raises(BadCiphertext, match="padding"):
        _crypt().decrypt(forged)


def test_inconsistent_pad_bytes() -> None:
    frame = _frame(b"hello")
    n = 32 - len(frame) % 32
    good = frame + bytes((n,)) * n
    assert _crypt().decrypt(_raw_encrypt(good)) == b"hello"
    for i in range(n - 1):  # corrupt each pad byte except the last (which sets the value)
        bad = bytearray(good)
        bad[len(frame) + i] ^= 0x01
        with pytest.raises(BadCiphertext, match="padding"):
            _crypt().decrypt(_raw_encrypt(bytes(bad)))


def test_pad_longer_than_plaintext() -> None:
    with pytest.raises(BadCiphertext):
        _crypt().decrypt(_raw_encrypt(bytes((32,)) * 16))


@pytest.mark.parametrize("msg_len", range(0, 70))
def test_every_pad_value_round_trips(msg_len: int) -> None:
    # Covers pad values 1..32, including the 17..32 that a 16-byte unpad gets wrong.
    c = _crypt()
    msg = bytes(range(msg_len))
    enc = c.encrypt(msg)
    raw = base64.b64decode(enc)
    assert len(raw) % BLOCK_SIZE == 0
    expected_pad = BLOCK_SIZE - (20 + msg_len + len(CORP)) % BLOCK_SIZE
    assert _raw_decrypt(enc, KEY)[-1] == expected_pad
    assert c.decrypt(enc) == msg


@pytest.mark.parametrize("msg_len", range(0, 40))
def test_peer_padding_to_16_still_decrypts(msg_len: int) -> None:
    # A peer that pads to 16 bytes (pad 1..16) yields valid PKCS#7 under our 1..32 rule.
    frame = _frame(b"m" * msg_len)
    n = 16 - len(frame) % 16
    assert _crypt().decrypt(_raw_encrypt(frame + bytes((n,)) * n)) == b"m" * msg_len


def test_wrong_receive_id() -> None:
    enc = _crypt().encrypt(b"hi")
    for other in ("", "wx5823bf96d3bd56c", "wx5823bf96d3bd56c7 ", "WX5823BF96D3BD56C7"):
        with pytest.raises(BadReceiveId):
            WXBizMsgCrypt(TOKEN, KEY, other).decrypt(enc)
    # AI bot: receive id "" means nothing may follow the message.
    enc_bot = WXBizMsgCrypt(TOKEN, KEY, "").encrypt(b"{}")
    assert WXBizMsgCrypt(TOKEN, KEY, "").decrypt(enc_bot) == b"{}"
    with pytest.raises(BadReceiveId):
        _crypt().decrypt(enc_bot)


def test_length_field_out_of_bounds() -> None:
    for length in (24, 1000, 2**31, 2**32 - 1):  # only 5 + 18 (receive id) = 23 bytes follow
        frame = _frame(b"hello", length=length)
        n = 32 - len(frame) % 32
        with pytest.raises(BadCiphertext, match="length"):
            _crypt().decrypt(_raw_encrypt(frame + bytes((n,)) * n))


def test_length_field_shifted_into_receive_id() -> None:
    frame = _frame(b"hello", length=6)
    n = 32 - len(frame) % 32
    with pytest.raises(BadReceiveId):
        _crypt().decrypt(_raw_encrypt(frame + bytes((n,)) * n))


def test_plaintext_shorter_than_header() -> None:
    with pytest.raises(BadCiphertext, match="short"):
        _crypt().decrypt(_raw_encrypt(b"x" * 16 + bytes((16,)) * 16))


def test_truncated_ciphertext() -> None:
    raw = base64.b64decode(WECOM_MSG.encrypt)
    for cut in (16, 32, len(raw) - 16):
        with pytest.raises(CryptoError):
            _crypt().decrypt(base64.b64encode(raw[:-cut]).decode())
    with pytest.raises(BadCiphertext, match="padding"):
        _crypt().decrypt(base64.b64encode(raw[:-32]).decode())


@pytest.mark.parametrize("size", [1, 15, 17, 20, 31, 33, 47])
def test_length_not_multiple_of_16(size: int) -> None:
    with pytest.raises(BadCiphertext, match="multiple of 16"):
        _crypt().decrypt(base64.b64encode(b"\x01" * size).decode())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "=",
        "====",
        "abc",  # missing padding
        "ab=",
        "ab==cd==",  # padding in the middle
        "YWJjZA===",
        "!!!!",
        "AAAA AAAA",
        "AAAA\nAAAA",
        "AAAA-AAA",  # urlsafe alphabet is not accepted
        "AAAA_AAA",
        "\u00c0AAA",
        WECOM_MSG.encrypt + "\n",
        " " + WECOM_MSG.encrypt,
    ],
)
def test_bad_base64(text: str) -> None:
    with pytest.raises(BadCiphertext):
        _crypt().decrypt(text)


def test_messages_never_leak_secrets() -> None:
    secret_token = "TopSecretToken42"
    c = WXBizMsgCrypt(secret_token, KEY, CORP)
    plaintext = b"very private plaintext"
    enc = c.encrypt(plaintext)
    errors: list[CryptoError] = []
    for call in (
        lambda: c.verify_and_decrypt("0" * 40, "1", "2", enc),
        lambda: WXBizMsgCrypt(secret_token, KEY, "other").decrypt(enc),
        lambda: c.decrypt(enc[:-4]),
        lambda: c.decrypt("!" + enc),
        lambda: WXBizMsgCrypt(secret_token, KEY[:-1], CORP),
    ):
        with pytest.raises(CryptoError) as info:
            call()
        errors.append(info.value)
    for err in errors:
        text = f"{err!s} {err!r}"
        for secret in (secret_token, KEY, KEY[:-1], enc, plaintext.decode(), CORP):
            assert secret not in text
    assert secret_token not in repr(c) and KEY not in repr(c)


# --- round trips and envelopes ---------------------------------------------------------------------


@pytest.mark.parametrize("receive_id", [CORP, "", "wxb11529c136998cb6", "企业"])
def test_round_trip(receive_id: str) -> None:
    c = _crypt(receive_id)
    assert c.receive_id == receive_id
    for msg in (b"", b"x", "你好".encode(), b"\x00" * 100, bytes(range(256)) * 5):
        enc = c.encrypt(msg)
        assert c.decrypt(enc) == msg
        sig = c.signature("1700000000", "nonce", enc)
        assert c.verify_and_decrypt(sig, "1700000000", "nonce", enc) == msg


def test_random_prefix_is_random_and_injectable() -> None:
    c = _crypt()
    assert c.encrypt(b"x") != c.encrypt(b"x")
    fixed = b"0123456789abcdef"
    assert c.encrypt(b"x", random_prefix=fixed) == c.encrypt(b"x", random_prefix=fixed)
    assert _raw_decrypt(c.encrypt(b"x", random_prefix=fixed), KEY)[:16] == fixed
    for bad in (b"", b"short", b"x" * 17):
        with pytest.raises(ValueError, match="random_prefix"):
            c.encrypt(b"x", random_prefix=bad)


def test_reply_xml_round_trip() -> None:
    c = _crypt()
    body = c.reply_xml(b"<xml><Content>hi</Content></xml>", "1409659813", "1372623149")
    root = ElementTree.fromstring(body)
    enc = root.findtext("Encrypt")
    sig = root.findtext("MsgSignature")
    assert enc is not None and sig is not None
    assert root.findtext("TimeStamp") == "1409659813" and root.findtext("Nonce") == "1372623149"
    assert c.verify_and_decrypt(sig, "1409659813", "1372623149", enc) == b"<xml><Content>hi</Content></xml>"


def test_reply_json_round_trip_ai_bot() -> None:
    bot = WXBizMsgCrypt(TOKEN, KEY, "")
    msg = json.dumps({"msgtype": "stream", "stream": {"id": "s1", "finish": True, "content": "好"}}).encode()
    body = json.loads(bot.reply_json(msg, "1641002400", "nonce_1"))
    assert sorted(body) == ["encrypt", "msgsignature", "nonce", "timestamp"]
    assert body["timestamp"] == "1641002400" and body["nonce"] == "nonce_1"
    assert bot.verify_and_decrypt(body["msgsignature"], "1641002400", "nonce_1", body["encrypt"]) == msg


@pytest.mark.parametrize(
    ("timestamp", "nonce"),
    [("", "n"), ("12a", "n"), ("-1", "n"), ("1", ""), ("1", "a]]>b"), ("1", "a<b"), ("1", "x" * 65)],
)
def test_reply_rejects_unsafe_fields(timestamp: str, nonce: str) -> None:
    with pytest.raises(ValueError):
        _crypt().encrypt_reply(b"x", timestamp, nonce)


def test_signature_helpers() -> None:
    parts = ("QDG6eK", "1409659589", "263014780", WECOM_URL_VERIFY.encrypt)
    for perm in itertools.permutations(parts):
        assert signature(*perm) == WECOM_URL_VERIFY.msg_signature
    with pytest.raises(BadSignature):
        verify_signature("", *parts)
    with pytest.raises(BadSignature):
        verify_signature("\u00e9" * 40, *parts)


# --- properties --------------------------------------------------------------------------------------

_keys = st.binary(min_size=32, max_size=32).map(lambda k: base64.b64encode(k).decode()[:43])
_text = st.text(max_size=40)


@given(key=_keys, msg=st.binary(max_size=600), receive_id=_text, prefix=st.binary(min_size=16, max_size=16))
def test_property_round_trip(key: str, msg: bytes, receive_id: str, prefix: bytes) -> None:
    c = WXBizMsgCrypt("token", key, receive_id)
    enc = c.encrypt(msg, random_prefix=prefix)
    assert len(base64.b64decode(enc)) % BLOCK_SIZE == 0
    assert c.decrypt(enc) == msg
    sig = c.signature("123", "n", enc)
    assert c.verify_and_decrypt(sig, "123", "n", enc) == msg


@given(key=_keys, msg=st.binary(max_size=200), a=_text, b=_text)
def test_property_other_receive_id_rejected(key: str, msg: bytes, a: str, b: str) -> None:
    if a == b:
        return
    enc = WXBizMsgCrypt("token", key, a).encrypt(msg)
    with pytest.raises(CryptoError):
        WXBizMsgCrypt("token", key, b).decrypt(enc)


@given(garbage=st.text(max_size=300))
def test_property_garbage_text_only_raises_crypto_errors(garbage: str) -> None:
    with contextlib.suppress(CryptoError):
        _crypt().decrypt(garbage)


@given(
    blocks=st.integers(min_value=0, max_value=20).flatmap(
        lambda n: st.binary(min_size=16 * n, max_size=16 * n)
    )
)
def test_property_random_ciphertext_only_raises_crypto_errors(blocks: bytes) -> None:
    for receive_id in (CORP, ""):
        with contextlib.suppress(CryptoError):
            _crypt(receive_id).decrypt(base64.b64encode(blocks).decode())


@given(raw=st.binary(max_size=300))
def test_property_any_base64_only_raises_crypto_errors(raw: bytes) -> None:
    with contextlib.suppress(CryptoError):
        _crypt().decrypt(base64.b64encode(raw).decode())


@given(sig=_text, timestamp=_text, nonce=_text, encrypt=_text)
def test_property_verify_and_decrypt_only_raises_crypto_errors(
    sig: str, timestamp: str, nonce: str, encrypt: str
) -> None:
    with contextlib.suppress(CryptoError):
        _crypt().verify_and_decrypt(sig, timestamp, nonce, encrypt)
    with contextlib.suppress(CryptoError):
        _crypt().verify_plain_signature(sig, timestamp, nonce)


@given(key=st.text(max_size=60))
def test_property_any_key_string_is_bad_key_or_valid(key: str) -> None:
    with contextlib.suppress(BadKey):
        WXBizMsgCrypt("t", key, "")


@given(data=st.binary(max_size=200))
def test_property_pkcs7(data: bytes) -> None:
    padded = pkcs7_pad(data)
    assert len(padded) % BLOCK_SIZE == 0 and 1 <= len(padded) - len(data) <= BLOCK_SIZE
    assert pkcs7_unpad(padded) == data


@given(parts=st.tuples(_text, _text, _text, _text), perm=st.permutations(range(4)))
def test_property_signature_is_order_independent(parts: tuple[str, str, str, str], perm: list[int]) -> None:
    shuffled = [parts[i] for i in perm]
    assert signature(*parts) == signature(shuffled[0], shuffled[1], shuffled[2], shuffled[3])


@given(
    key=st.binary(min_size=32, max_size=32),
    blocks=st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=64),
)
def test_fast_cbc_decryption_equals_the_reference(key: bytes, blocks: list[bytes]) -> None:
    """The ECB + XOR fast path gives what pycryptodome's own CBC gives, for any key and ciphertext."""
    aes_key = base64.b64encode(key).decode().rstrip("=")
    crypt = WXBizMsgCrypt("token", aes_key, "rid")
    raw = b"".join(blocks)
    assert crypt._cbc_decrypt(raw) == cbc_decrypt_reference(key, key[:16], raw)
