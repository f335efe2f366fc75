"""Proposed speed-ups outside the core, measured before anyone adopts them (bench-only monkeypatches).

The ingest profile (bench/RESULTS.md) puts most of the ``wecom_app`` inbound's own CPU in two places
the core does not own — adapters/wechat_inbound.py (``parse_xml``, twice per callback) and
adapters/wechat_crypto.py (``WXBizMsgCrypt.decrypt``) — so here are drop-in replacements with the same
results and refusals, applied only when a benchmark asks (``bench.ingest --proposals`` runs the bridge
a second time with them, ``bench.daemon_proc --proposals``):

* ``parse_xml``: pyexpat directly, the tree built in the handlers, instead of defusedxml's
  ElementTree (a new DefusedXMLParser + TreeBuilder per call, then a second walk). Same output (leaf
  text, nested dicts, lists for repeated tags, attributes/comments/tails ignored, namespaces
  resolved as ElementTree does), same refusals: any DOCTYPE, entity declaration or external
  reference refused before it is used; malformed XML, a root other than <xml>, nesting past 16.
* ``WXBizMsgCrypt.decrypt``: ``binascii.a2b_base64(strict_mode=True)`` alone (it already refuses
  what the regex refuses: no second pass over the text), and AES-CBC decryption as one cached AES-ECB
  decryption XORed with the previous blocks (no new cipher object per message). Same checks after.

``python -m bench.proposals`` compares old and new on the test vectors and on generated and mutated
inputs, and prints the per-call cost of each.
"""

from __future__ import annotations

import binascii
import hmac
import pyexpat
import struct
from typing import Any

from Crypto.Cipher import AES

from adapters import wechat_crypto as wc
from adapters import wechat_inbound as wi


class _DTD(Exception):
    pass


def _refuse_dtd(*_: Any) -> None:
    raise _DTD


def parse_xml(data: bytes, what: str) -> dict[str, Any]:
    """adapters.wechat_inbound.parse_xml, on pyexpat directly."""
    p = pyexpat.ParserCreate(None, "}")
    stack: list[list[Any]] = []  # [tag, children dict or None, text parts]
    root: list[Any] = []

    def start(tag: str, _attrs: Any) -> None:
        if len(stack) > wi._MAX_XML_DEPTH:
            raise wi.Refused(400, "XML nested too deeply")
        stack.append([tag, None, []])

    def end(_tag: str) -> None:
        tag, children, text = stack.pop()
        value = children if children is not None else "".join(text)
        if "}" in tag:
            tag = "{" + tag
        if not stack:
            root.append((tag, value))
            return
        parent = stack[-1]
        siblings = parent[1]
        if siblings is None:
            siblings = parent[1] = {}
        if tag in siblings:
            prev = siblings[tag]
            if isinstance(prev, list):
                prev.append(value)
            else:
                siblings[tag] = [prev, value]
        else:
            siblings[tag] = value

    def chars(text: str) -> None:
        if stack:
            stack[-1][2].append(text)

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = _refuse_dtd
    p.EntityDeclHandler = _refuse_dtd
    p.UnparsedEntityDeclHandler = _refuse_dtd
    p.ExternalEntityRefHandler = _refuse_dtd  # type: ignore[assignment]
    p.buffer_text = True
    try:
        p.Parse(data, True)
    except _DTD:
        raise wi.Refused(400, f"{what}: DTD or entity refused") from None
    except (pyexpat.ExpatError, ValueError, LookupError, RecursionError):
        raise wi.Refused(400, f"{what}: malformed XML") from None
    if not root:
        raise wi.Refused(400, f"{what}: malformed XML")
    tag, value = root[0]
    if tag != "xml":
        raise wi.Refused(400, f"{what}: root element is not <xml>")
    return value if isinstance(value, dict) else {}


_ECB: dict[bytes, Any] = {}


def decrypt(self: wc.WXBizMsgCrypt, encrypt: str) -> bytes:
    """adapters.wechat_crypto.WXBizMsgCrypt.decrypt, one cached ECB cipher and no regex pass."""
    if not isinstance(encrypt, str) or not encrypt:
        raise wc.BadCiphertext("ciphertext is not strict base64")
    try:
        raw = binascii.a2b_base64(encrypt, strict_mode=True)
    except (binascii.Error, ValueError):
        raise wc.BadCiphertext("ciphertext is not strict base64") from None
    if not raw or len(raw) % AES.block_size:
        raise wc.BadCiphertext("ciphertext length is not a positive multiple of 16")
    key: bytes = self._key
    ecb = _ECB.get(key)
    if ecb is None:
        ecb = _ECB[key] = AES.new(key, AES.MODE_ECB)
    n = len(raw)
    # CBC: P_i = D(C_i) xor C_(i-1), C_0 = IV (= key[:16] in this scheme)
    plain = (int.from_bytes(ecb.decrypt(raw), "big") ^ int.from_bytes(key[:16] + raw[:-16], "big")).to_bytes(
        n, "big"
    )
    plain = wc.pkcs7_unpad(plain)
    if len(plain) < wc._HEADER_LEN:
        raise wc.BadCiphertext("plaintext too short")
    (msg_len,) = struct.unpack(">I", plain[wc.RANDOM_PREFIX_LEN : wc._HEADER_LEN])
    end = wc._HEADER_LEN + msg_len
    if end > len(plain):
        raise wc.BadCiphertext("length field out of bounds")
    if not hmac.compare_digest(plain[end:], self._receive_id):
        raise wc.BadReceiveId("receive id mismatch")
    return plain[wc._HEADER_LEN : end]


def apply() -> None:
    """Swap the two functions in everywhere they were imported by name."""
    import importlib

    wi.parse_xml = parse_xml
    for mod in ("adapters.wecom.app_callback", "adapters.wecom.aibot", "adapters.official_account.push"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "parse_xml"):
            setattr(m, "parse_xml", parse_xml)  # noqa: B010
    wc.WXBizMsgCrypt.decrypt = decrypt  # type: ignore[method-assign]


# -- the check --------------------------------------------------------------------------------------


def _outcome(f: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", f(*args)
    except wi.Refused as e:
        return "refused", (e.status, e.reason)
    except wc.CryptoError as e:
        return "crypto", (type(e).__name__, str(e))


def check() -> None:  # pragma: no cover - a script
    import random
    import timeit

    from bench.ingest import AES_KEY, CORP, TOKEN

    old_parse = wi.parse_xml
    old_decrypt = wc.WXBizMsgCrypt.decrypt
    docs: list[bytes] = [
        b"<xml><A>1</A><B><![CDATA[x < y]]></B><C><D>d</D><D>e</D><D>f</D></C><E/></xml>",
        b'<?xml version="1.0" encoding="utf-8"?>\n<xml>\n <A a="1">t&amp;u&#20320;</A> tail <!-- c --></xml>',
        b"<xml><n:a xmlns:n='urn:x'>1</n:a><b:c>2</b:c></xml>",
        b"<notxml><A>1</A></notxml>",
        b"<xml><A>1</A>",
        b'<!DOCTYPE xml [<!ENTITY a "b">]><xml><A>&a;</A></xml>',
        b'<!DOCTYPE xml SYSTEM "http://example.com/x.dtd"><xml/>',
        b"<xml><A>&undefined;</A></xml>",
        b"<xml>" + b"<a>" * 16 + b"x" + b"</a>" * 16 + b"</xml>",
        b"<xml>" + b"<a>" * 17 + b"x" + b"</a>" * 17 + b"</xml>",
        b"",
        b"<xml></xml>",
        b"<xml>text only</xml>",
        "<xml><A>你好</A></xml>".encode("gbk").replace(
            b"<xml>", b'<?xml version="1.0" encoding="gbk"?><xml>'
        ),
        b'<?xml version="1.0" encoding="nope"?><xml/>',
        b"\xff\xfe<\x00x\x00",
    ]
    vectors: list[Any] = []
    try:
        from tests.vectors import wechat_vectors as v

        vectors = [x for x in vars(v).values() if isinstance(x, v.CallbackVector)]
        docs += [x.expected for x in vectors]
    except ImportError:
        pass
    rnd = random.Random(7)
    base = docs[0]
    for _ in range(3000):
        mutated = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            mutated[rnd.randrange(len(mutated))] = rnd.choice(b"<>/&;![]CDATAx \n\x00\xff=\"'")
        docs.append(bytes(mutated))
    mismatches = 0
    for d in docs:
        a, b = _outcome(old_parse, d, "body"), _outcome(parse_xml, d, "body")
        if a != b:
            mismatches += 1
            if mismatches <= 5:
                print(f"parse_xml differs on {d[:80]!r}: {a} vs {b}")
    print(f"parse_xml: {len(docs)} documents, {mismatches} differences")

    crypt = wc.WXBizMsgCrypt(TOKEN, AES_KEY, CORP)
    texts = [crypt.encrypt(f"<xml><A>{i}</A></xml>".encode() * rnd.randint(1, 50)) for i in range(200)]
    texts += [
        "",
        "abc",
        "a===",
        "QUJD",
        "QUJDRA==",
        "QUJDRA=",
        "QUJD\n",
        "QUJ D",
        "é",
        texts[0][:-4],
        texts[1] + "A",
    ]
    texts += [
        crypt.encrypt(b"x")[:-8] + "AAAAAAA=",
        wc.WXBizMsgCrypt(TOKEN, AES_KEY, "other").encrypt(b"<xml/>"),
    ]
    for _ in range(2000):
        chars = list(rnd.choice(texts[:200]))
        chars[rnd.randrange(len(chars))] = rnd.choice("A/+=\n-_é")
        texts.append("".join(chars))
    cases = [(crypt, t) for t in texts]
    for x in vectors:
        try:
            cases.append((wc.WXBizMsgCrypt(x.token, x.encoding_aes_key, x.receive_id), x.encrypt))
        except (wc.CryptoError, ValueError):
            continue
    mismatches = 0
    for c, t in cases:
        a, b = _outcome(old_decrypt, c, t), _outcome(decrypt, c, t)
        if a != b:
            mismatches += 1
            if mismatches <= 5:
                print(f"decrypt differs on {t[:60]!r}: {a} vs {b}")
    print(f"decrypt: {len(cases)} ciphertexts ({len(vectors)} published vectors), {mismatches} differences")

    inner = crypt.decrypt(texts[5])
    msg = (
        b"<xml><ToUserName><![CDATA[ww]]></ToUserName><FromUserName><![CDATA[u]]></FromUserName>"
        b"<CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content>"
        b"<MsgId>1</MsgId><AgentID>1</AgentID></xml>"
    )
    n = 5000
    timings: list[tuple[str, Any]] = []
    try:  # what a user would otherwise call (the ingest benchmark's baseline b)
        from wechatpy.enterprise import parse_message
        from wechatpy.enterprise.crypto import WeChatCrypto

        wx = WeChatCrypto(TOKEN, AES_KEY, CORP)
        enc = crypt.encrypt(msg)
        body = f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
        sig = crypt.signature("1", "n", enc)
        plain = wx.decrypt_message(body, sig, "1", "n")
        timings += [
            ("wechatpy decrypt_message (+ outer parse)", lambda: wx.decrypt_message(body, sig, "1", "n")),
            ("wechatpy parse_message", lambda: parse_message(plain)),
        ]
    except ImportError:
        pass
    for name, f in (
        ("parse_xml (defusedxml ElementTree)", lambda: old_parse(msg, "m")),
        ("parse_xml (proposal: pyexpat)", lambda: parse_xml(msg, "m")),
        ("decrypt (AES.new CBC + regex)", lambda: old_decrypt(crypt, texts[5])),
        ("decrypt (proposal: cached ECB + xor)", lambda: decrypt(crypt, texts[5])),
        *timings,
    ):
        print(f"{name:42s} {timeit.timeit(f, number=n) / n * 1e6:6.1f} µs")
    del inner


if __name__ == "__main__":
    check()
