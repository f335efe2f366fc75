"""Published WXBizMsgCrypt test vectors (data only), each with its source.

Every inbound vector below was checked against adapters/wechat/crypto.py: the published
msg_signature matches AND the ciphertext decrypts (strict padding, exact receive id).  Where the
source does not print the plaintext, `expected` holds what we decrypted and the comment says so.
Encryption vectors fix the 16-byte random prefix, so our ciphertext must equal the published one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallbackVector:
    """An inbound callback: query params (msg_signature, timestamp, nonce) + Encrypt/echostr."""

    name: str
    token: str
    encoding_aes_key: str
    receive_id: str
    msg_signature: str
    timestamp: str
    nonce: str
    encrypt: str
    expected: bytes


@dataclass(frozen=True, slots=True)
class EncryptVector:
    """A reply encrypted with a fixed random prefix; msgsignature is "" where none is published."""

    name: str
    token: str
    encoding_aes_key: str
    receive_id: str
    random_prefix: bytes
    msg: bytes
    encrypt: str
    timestamp: str = ""
    nonce: str = ""
    msgsignature: str = ""


@dataclass(frozen=True, slots=True)
class PlainSignatureVector:
    """Official Account plaintext-mode `signature` = sha1(sorted(token, timestamp, nonce))."""

    name: str
    token: str
    timestamp: str
    nonce: str
    signature: str


# --- WeCom self-built app (XML, receive_id = CorpID) --------------------------------------------

_QDG_TOKEN = "QDG6eK"
_QDG_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
_QDG_CORP = "wx5823bf96d3bd56c7"

# Source: sbzhu/weworkapi_php callback/Sample.php (Tencent's official WeCom callback sample,
# linked from WeCom doc 90968), example 1 "验证回调URL".  In the sample's GET line the echostr is
# percent-encoded ("...xho%2FqYX3...dtp%2B4RPcs8...BO%2BFZXvnaqQ%3D%3D"): '+' arrives as %2B.
# The sample does not print the plaintext; we decrypted it.
WECOM_URL_VERIFY = CallbackVector(
    name="wecom-php-sample-verify-url",
    token=_QDG_TOKEN,
    encoding_aes_key=_QDG_KEY,
    receive_id=_QDG_CORP,
    msg_signature="5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
    timestamp="1409659589",
    nonce="263014780",
    encrypt="P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==",
    expected=b"1616140317555161061",
)

# Source: sbzhu/weworkapi_php callback/Sample.php, example 2 "对用户回复的消息解密" (POST with
# <ToUserName>wx5823bf96d3bd56c7</ToUserName><Encrypt>..</Encrypt><AgentID>218</AgentID>).
# Expected plaintext: the sample's own comment, byte for byte (newlines included).
WECOM_MSG = CallbackVector(
    name="wecom-php-sample-decrypt-msg",
    token=_QDG_TOKEN,
    encoding_aes_key=_QDG_KEY,
    receive_id=_QDG_CORP,
    msg_signature="477715d11cdb4164915debcba66cb864d751f3e6",
    timestamp="1409659813",
    nonce="1372623149",
    encrypt=(
        "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3Qczc"
        "dCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLj"
        "vd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMn"
        "vw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k"
        "22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2Yoy"
        "yH2uyPIGHBZZIs2pDBS8R07+qN+E7Q=="
    ),
    expected=(
        b"<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>\n"
        b"<FromUserName><![CDATA[mycreate]]></FromUserName>\n"
        b"<CreateTime>1409659813</CreateTime>\n"
        b"<MsgType><![CDATA[text]]></MsgType>\n"
        b"<Content><![CDATA[hello]]></Content>\n"
        b"<MsgId>4561255354251345929</MsgId>\n"
        b"<AgentID>218</AgentID>\n"
        b"</xml>"
    ),
)

_HJQ_TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
_HJQ_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
_HJQ_CORP = "ww1436e0e65a779aee"

# Source: sbzhu/weworkapi_python callback/Sample.py (official WeCom Python sample; newer
# parameters than the PHP one), example 1.  Plaintext not printed by the sample; we decrypted it.
WECOM_PY_URL_VERIFY = CallbackVector(
    name="wecom-python-sample-verify-url",
    token=_HJQ_TOKEN,
    encoding_aes_key=_HJQ_KEY,
    receive_id=_HJQ_CORP,
    msg_signature="012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb",
    timestamp="1476416373",
    nonce="47744683",
    encrypt="fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA==",
    expected=b"1288432023552776189",
)

# Source: sbzhu/weworkapi_python callback/Sample.py, example 2 (POST, AgentID 1000002).
# The plaintext equals the sRespData string of the sample's example 3 (no CDATA, UTF-8 "你好").
WECOM_PY_MSG = CallbackVector(
    name="wecom-python-sample-decrypt-msg",
    token=_HJQ_TOKEN,
    encoding_aes_key=_HJQ_KEY,
    receive_id=_HJQ_CORP,
    msg_signature="0c3914025cb4b4d68103f6bfc8db550f79dcf48e",
    timestamp="1476422779",
    nonce="1597212914",
    encrypt=(
        "Kl7kjoSf6DMD1zh7rtrHjFaDapSCkaOnwu3bqLc5tAybhhMl9pFeK8NslNPVdMwmBQTNoW4mY7AIjeLvEl3NyeTk"
        "AgGzBhzTtRLNshw2AEew+kkYcD+Fq72Kt00fT0WnN87hGrW8SqGc+NcT3mu87Ha3dz1pSDi6GaUA6A0sqfde0VJP"
        "QbZ9U+3JWcoD4Z5jaU0y9GSh010wsHF8KZD24YhmZH4ch4Ka7ilEbjbfvhKkNL65HHL0J6EYJIZUC2pFrdkJ7Mhm"
        "EbU2qARR4iQHE7wy24qy0cRX3Mfp6iELcDNfSsPGjUQVDGxQDCWjayJOpcwocugux082f49HKYg84EpHSGXAyh+/"
        "oxwaWbvL6aSDPOYuPDGOCI8jmnKiypE+"
    ),
    expected=(
        "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName>"
        "<CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content>"
        "<MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>"
    ).encode(),
)

# Source: sbzhu/weworkapi_python callback_json/Sample.py (official JSON-format sample), example 2.
# Surprises, recorded as found: the body's "ToUserName" says wx5823bf96d3bd56c7 but the receive id
# inside the ciphertext is ww1436e0e65a779aee (the sample's CorpID); and the decrypted text is NOT
# valid JSON (the sample's own typo `"FromUserName": :mycreate"`).  The crypto layer is bytes-only,
# so it decrypts fine; a JSON parser downstream must reject it.
WECOM_JSON_MSG = CallbackVector(
    name="wecom-python-json-sample-decrypt-msg",
    token=_HJQ_TOKEN,
    encoding_aes_key=_HJQ_KEY,
    receive_id=_HJQ_CORP,
    msg_signature="e3647471e395139e2308c1fa963f2d648a00b90e",
    timestamp="1409659813",
    nonce="1372623149",
    encrypt=(
        "cjhLUX7UU4yCSelv1vz7T0zT8huF51bAMVWriNvO1FMegHrQZNrtvRxbwf0fUPsFvwqR0U0fgiJNEA5Y30F2MoI2"
        "S7vv3EjVQ68C0cjw9frBoUE2Hj0BvFp9h3u6Vbsg4lc1C8AtHdaN8orKuNKkLRLuYEL52R1J3v8olJGZRLnRdVKI"
        "ivixmX/eQpzgeExtp20jI1HxRP1AAZ6xZoILdqDPO549LO4WeG+685JRUTdiwcY5fjZlqeMxuT4PpMn1X9OWsS7NR"
        "j06Wa5E3Tvg4twjWp39KPfOdRte6P1T4JU="
    ),
    expected=(
        b'{ "ToUserName": "wx5823bf96d3bd56c7", "FromUserName": :mycreate", "CreateTime": 1409659813,'
        b' "MsgType": "text", "Content": "hello", "MsgId": 4561255354251345929, "AgentID": 218}'
    ),
)

_WECHATPY_TOKEN = "123456"
_WECHATPY_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
_WECHATPY_CORP = "wx49f0ab532d5d035a"

# Source: wechatpy/wechatpy tests/test_crypto.py, test_check_signature_should_ok (WeCom echostr).
# The test only checks the signature; we decrypted the plaintext.  The same file's
# test_check_signature_should_fail uses nonce "437374424" with this signature (must fail).
WECHATPY_ECHO = CallbackVector(
    name="wechatpy-work-check-signature",
    token=_WECHATPY_TOKEN,
    encoding_aes_key=_WECHATPY_KEY,
    receive_id=_WECHATPY_CORP,
    msg_signature="dd6b9c95b495b3f7e2901bfbc76c664930ffdb96",
    timestamp="1411443780",
    nonce="437374425",
    encrypt="4ByGGj+sVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1+bXFXDQQb1o6co6Yh9Bv41n7hOchLF6p+Q==",
    expected=b"5927782489442352469",
)

# Source: wechatpy/wechatpy tests/test_crypto.py, test_decrypt_message (asserts Content "test",
# FromUserName "messense"; the full plaintext below is what we decrypted).
WECHATPY_MSG = CallbackVector(
    name="wechatpy-work-decrypt-message",
    token=_WECHATPY_TOKEN,
    encoding_aes_key=_WECHATPY_KEY,
    receive_id=_WECHATPY_CORP,
    msg_signature="74d92dfeb87ba7c714f89d98870ae5eb62dff26d",
    timestamp="1411525903",
    nonce="461056294",
    encrypt=(
        "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHC"
        "rsTyeDXzF6Bv283dGymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpX"
        "aG4+BiYyolBug/gYNx410cvkKR2/nPwBiT+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQi"
        "MS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQi"
        "pvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0="
    ),
    expected=(
        b"<xml><ToUserName><![CDATA[wx49f0ab532d5d035a]]></ToUserName>\n"
        b"<FromUserName><![CDATA[messense]]></FromUserName>\n"
        b"<CreateTime>1411525903</CreateTime>\n"
        b"<MsgType><![CDATA[text]]></MsgType>\n"
        b"<Content><![CDATA[test]]></Content>\n"
        b"<MsgId>4363689963896700987</MsgId>\n"
        b"<AgentID>1</AgentID>\n"
        b"</xml>"
    ),
)

# Source: wechatpy/wechatpy tests/test_crypto.py, test_encrypt_message (random string mocked to
# "1234567890123456"; expected Encrypt and MsgSignature taken from its expected reply XML).
WECHATPY_REPLY = EncryptVector(
    name="wechatpy-work-encrypt-message",
    token=_WECHATPY_TOKEN,
    encoding_aes_key=_WECHATPY_KEY,
    receive_id=_WECHATPY_CORP,
    random_prefix=b"1234567890123456",
    msg=(
        b"<xml>\n"
        b"<MsgType><![CDATA[text]]></MsgType>\n"
        b"<Content><![CDATA[test]]></Content>\n"
        b"<FromUserName><![CDATA[wx49f0ab532d5d035a]]></FromUserName>\n"
        b"<ToUserName><![CDATA[messense]]></ToUserName>\n"
        b"<AgentID>1</AgentID>\n"
        b"<CreateTime>1411525903</CreateTime>\n"
        b"</xml>"
    ),
    encrypt=(
        "9s4gMv99m88kKTh/H8IdkOiMg6bisoy3ypwy9H4hvSPe9nsGaqyw5hhSjdYbcrKk+j3nba4HMOTzHrluLBYqxgNc"
        "BqGsL8GqxlhZgURnAtObvesEl5nZ+uBE8bviY0LWke8Zy9V/QYKxNV2FqllNXcfmstttyIkMKCCmVbCFM2JTF5wY"
        "0nFhHZSjPUL2Q1qvSUCUld+/WIXrx0oyKQmpB6o8NRrrNrsDf03oxI1p9FxUgMnwKKZeOA/uu+2IEvEBtb7muXsV"
        "bwbgX05UPPJvFurDXafG0RQyPR+mf1nDnAtQmmNOuiR5MIkdQ39xn1vWwi1O5oazPoQJz0nTYjxxEE8kv3kFxtAG"
        "VRe3ypD3WeK2XeFYFMNMpatF9XiKzHo3"
    ),
    timestamp="1411525903",
    nonce="461056294",
    msgsignature="407518b7649e86ef23978113f92d27afa9296533",
)

# --- Official Account safe mode (XML, receive_id = AppID) ---------------------------------------

_OA_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

# Source: Tencent's official Official Account WXBizMsgCrypt Python sample (Sample.py, jonyqin,
# 2014), as mirrored in charlesXu86/Chatbot_CN Chatbot_Web/impl/weixin/Sample.py.  Its POST body is
# "compatible mode": plain fields AND <Encrypt>; the signature covers only the Encrypt text.
OA_MSG = CallbackVector(
    name="oa-python-sample-decrypt-msg",
    token="spamtest",
    encoding_aes_key=_OA_KEY,
    receive_id="wx2c2769f8efd9abc2",
    msg_signature="5d197aaffba7e9b25a30732f161a50dee96bd5fa",
    timestamp="1409735669",
    nonce="1320562132",
    encrypt=(
        "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6"
        "F8PGHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T33"
        "2jisa+h6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCg"
        "avjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6Oewp"
        "usjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE="
    ),
    expected=(
        b"<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n"
        b"<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n"
        b"<CreateTime>1409735668</CreateTime>\n"
        b"<MsgType><![CDATA[text]]></MsgType>\n"
        b"<Content><![CDATA[abcdteT]]></Content>\n"
        b"<MsgId>6054768590064713728</MsgId>\n"
        b"</xml>"
    ),
)

# Source: the same official OA sample package, C++ version, as mirrored in rdxz/FE11
# SampleCode/C++/src/Sample.cpp (the sample prints the plaintext; full text below is what we
# decrypted).  (One copy elsewhere swaps the AppID to wx68d81e4f937bbd00; that one fails the
# receive-id check, the official wx2c2769f8efd9abc2 passes.)
OA_MSG_CPP = CallbackVector(
    name="oa-cpp-sample-decrypt-msg",
    token="spamtest",
    encoding_aes_key=_OA_KEY,
    receive_id="wx2c2769f8efd9abc2",
    msg_signature="003fee52ecc56afb46c00b5c7721be87860ce785",
    timestamp="1410349438",
    nonce="298025754",
    encrypt=(
        "mfBCs65c67CeJw22u4VT2TD73q5H06+ocrAIxswCaeZ/d/Lw0msSZFHY0teqgSYiI1zR2gD2DKrB3TIrmX/liNSD"
        "rGqS8jSI/WPeKB5VPr7Ezr7gomZAyGCwJSgT1TRFWPfONGJMxuj2nk4faTuspAuVIFQ6SHwZuJBZC7mcJp7Cgr9c"
        "UhATQWDbOPaE7ukZBTV2YqyzH+UI2AK+J1S47cE79k1RX8t0hcTz/O0hlK8DGXKnvYv88qKQcI7z4iaajqHfRVZK"
        "BNyOODabs+It+ZfM3dWTeFcPgDbGtIEnpt/EDtuuA/zMvtkaKdHdswPnVZQ+xdwbYr3ldGvfT8HlEYEgkgKaThxT"
        "FobVlwzu2ZkXCjicbP3xdr15Iq48ObgzPpqYuZ3IEoyggZDKClquk0u0orMck4GTF/XyE8yGzc4="
    ),
    expected=(
        b"<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n"
        b"<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n"
        b"<CreateTime>1410349438</CreateTime>\n"
        b"<MsgType><![CDATA[text]]></MsgType>\n"
        b"<Content><![CDATA[abcdteT]]></Content>\n"
        b"<MsgId>6057404712141979648</MsgId>\n"
        b"</xml>"
    ),
)

_PAM_TOKEN = "pamtest"
_PAM_APPID = "wxb11529c136998cb6"
_PAM_RANDOM = b"aaaabbbbccccdddd"

# Source: chanjarster/weixin-java-tools (the project WxJava grew from)
# weixin-java-common/src/test/java/me/chanjar/weixin/common/util/crypto/WxCryptUtilTest.java,
# testAesEncrypt — same data as the official OA Java sample's WXBizMsgCryptTest.  No signature.
OA_ENCRYPT_SHORT = EncryptVector(
    name="oa-java-test-aes-encrypt",
    token=_PAM_TOKEN,
    encoding_aes_key=_OA_KEY,
    receive_id=_PAM_APPID,
    random_prefix=_PAM_RANDOM,
    msg="我是中文abcd123".encode(),
    encrypt="jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg==",
)

# Source: same file, testAesEncrypt2.
OA_ENCRYPT_VIDEO = EncryptVector(
    name="oa-java-test-aes-encrypt2",
    token=_PAM_TOKEN,
    encoding_aes_key=_OA_KEY,
    receive_id=_PAM_APPID,
    random_prefix=_PAM_RANDOM,
    msg=(
        "<xml><ToUserName><![CDATA[oia2Tj我是中文jewbmiOUlr6X-1crbLOvLw]]></ToUserName>"
        "<FromUserName><![CDATA[gh_7f083739789a]]></FromUserName><CreateTime>1407743423</CreateTime>"
        "<MsgType><![CDATA[video]]></MsgType><Video><MediaId><![CDATA[eYJ1MbwPRJtOvIEabaxHs7TX2D-HV71s7"
        "9GUxqdUkjm6Gs2Ed1KF3ulAOA9H1xG0]]></MediaId><Title><![CDATA[testCallBackReplyVideo]]></Title>"
        "<Description><![CDATA[testCallBackReplyVideo]]></Description></Video></xml>"
    ).encode(),
    encrypt=(
        "jn1L23DB+6ELqJ+6bruv23M2GmYfkv0xBh2h+XTBOKVKcgDFHle6gqcZ1cZrk3e1qjPQ1F4RsLWzQRG9udbKWesx"
        "lkupqcEcW7ZQweImX9+wLMa0GaUzpkycA8+IamDBxn5loLgZpnS7fVAbExOkK5DYHBmv5tptA9tklE/fTIILHR8H"
        "LXa5nQvFb3tYPKAlHF3rtTeayNf0QuM+UW/wM9enGIDIJHF7CLHiDNAYxr+r+OrJCmPQyTy8cVWlu9iSvOHPT/77"
        "bZqJucQHQ04sq7KZI27OcqpQNSto2OdHCoTccjggX5Z9Mma0nMJBU+jLKJ38YB1fBIz+vBzsYjrTmFQ44YfeEuZ+"
        "xRTQwr92vhA9OxchWVINGC50qE/6lmkwWTwGX9wtQpsJKhP+oS7rvTY8+VdzETdfakjkwQ5/Xka042OlUb1/slTw"
        "o4RscuQ+RdxSGvDahxAJ6+EAjLt9d8igHngxIbf6YyqqROxuxqIeIch3CssH/LqRs+iAcILvApYZckqmA7FNERsp"
        "KA5f8GoJ9sv8xmGvZ9Yrf57cExWtnX8aCMMaBropU/1k+hKP5LVdzbWCG0hGwx/dQudYR/eXp3P0XxjlFiy+9DMl"
        "aFExWUZQDajPkdPrEeOwofJb"
    ),
)

# --- Tencent's worked example in the Open Platform "消息推送" doc -------------------------------
# Source: https://developers.weixin.qq.com/doc/oplatform/Third-party_Platforms/2.0/api/Before_Develop/message_push.html
# (primary doc, found via a mirrored copy in the search index).  Token "AAAAA", key = 43 x "A"
# (AES key = 32 zero bytes), receive id = the third-party platform AppID.  Push URL:
#   ?signature=cc0c594499c1634947d5b502f158ee518947db27&timestamp=1715943329&nonce=1590219412
#   &openid=o9AgO5Kd5ggOC-bXrbNODIiE3bGY&encrypt_type=aes&msg_signature=6c12a4...
# The doc: "verify msg_signature; do not use signature" in safe mode.  It also gives the inner
# sizes: ciphertext 352 bytes, FullStr 330 bytes -> the PKCS#7 pad value here is 22 (> 16).
_OPEN_TOKEN = "AAAAA"
_OPEN_KEY = "A" * 43
_OPEN_APPID = "wx134c8103faa5a59e"

OPEN_PLATFORM_MSG = CallbackVector(
    name="open-platform-doc-debug-demo",
    token=_OPEN_TOKEN,
    encoding_aes_key=_OPEN_KEY,
    receive_id=_OPEN_APPID,
    msg_signature="6c12a4205838198b8fa631b3220723bb07f1015c",
    timestamp="1715943329",
    nonce="1590219412",
    encrypt=(
        "D7yzvUNAL930rd28wf21s4hvXhz0L6Uit/p2Di6C5DHyYGpEgdBRnKjBec34JwoQXicwaZC7fOVihW80F4VtsdvE"
        "//1vr7oAbqjDv8KenVp+ajKYpJnyQ4zMRhIC+a31fCVOMC03FfzV/QuC94kBP55a+Za3sJgvAn+ZbsNqZI5Dkyuz"
        "khQN8OBqCzFhizGmy0xpM0MEA4agpvE+RuNO1rhHTtuJB5yltw1FiYzecSXJ+y/D2r81VkRn2eYjh2ltsoyfbDR7"
        "Is6ookXIFxTfyeNyeHxMeT4KN5WpCDmSbTcUYrbBUlkGLJ9n/rU8YOywma6G7aTb7KZKOqCxgfoUlYEZPk4FUL/T"
        "K7ShriFDMVCLyjQJ15Ob++agDWtcxhfUfe6HIoIpRW8mKNBQiY/Jd1svvuskA1wLef1RTtzKfMpagSCX/laZINmd"
        "nX4zrF6kIaR9P4xQrWXbsTFHTYe0Mg=="
    ),
    expected=(
        b"<xml><ToUserName><![CDATA[gh_97417a04a28d]]></ToUserName>\n"
        b"<FromUserName><![CDATA[o9AgO5Kd5ggOC-bXrbNODIiE3bGY]]></FromUserName>\n"
        b"<CreateTime>1715943329</CreateTime>\n"
        b"<MsgType><![CDATA[event]]></MsgType>\n"
        b"<Event><![CDATA[debug_demo]]></Event>\n"
        b"<debug_str><![CDATA[hello world]]></debug_str>\n"
        b"</xml>"
    ),
)

# Same doc, the URL's plaintext-style `signature` parameter (sha1 of sorted token/timestamp/nonce).
OPEN_PLATFORM_PLAIN_SIGNATURE = PlainSignatureVector(
    name="open-platform-doc-signature",
    token=_OPEN_TOKEN,
    timestamp="1715943329",
    nonce="1590219412",
    signature="cc0c594499c1634947d5b502f158ee518947db27",
)

# Same doc, the encrypted reply: random(16B)="999951349e8ee746", msg_len=52, FullStr 90 bytes,
# ciphertext 96 bytes; TimeStamp 1713424427, Nonce 415670741.  (The msg really is
# "[CDATA[good luck]]" without "<!", as printed in the doc.)
OPEN_PLATFORM_REPLY = EncryptVector(
    name="open-platform-doc-reply",
    token=_OPEN_TOKEN,
    encoding_aes_key=_OPEN_KEY,
    receive_id=_OPEN_APPID,
    random_prefix=b"999951349e8ee746",
    msg=b"<xml><demo_resp>[CDATA[good luck]]</demo_resp></xml>",
    encrypt=(
        "hE8R6mGXHkJJjU72KxzKUd1GEkKJaEZq7vRL8XgK3o+00k8JGq6+pZJUIlTSyhsX+bxIBQ72g3GyvDdIZcr6+3HA"
        "ZbSvPT9t/o11MI7d6WELwqrGd7jMnV0zv3Zc9Nq7"
    ),
    timestamp="1713424427",
    nonce="415670741",
    msgsignature="03e0812039325c2712ef5f0f980fd14c70d6e307",
)

CALLBACK_VECTORS: tuple[CallbackVector, ...] = (
    WECOM_URL_VERIFY,
    WECOM_MSG,
    WECOM_PY_URL_VERIFY,
    WECOM_PY_MSG,
    WECOM_JSON_MSG,
    WECHATPY_ECHO,
    WECHATPY_MSG,
    OA_MSG,
    OA_MSG_CPP,
    OPEN_PLATFORM_MSG,
)

ENCRYPT_VECTORS: tuple[EncryptVector, ...] = (
    WECHATPY_REPLY,
    OA_ENCRYPT_SHORT,
    OA_ENCRYPT_VIDEO,
    OPEN_PLATFORM_REPLY,
)

PLAIN_SIGNATURE_VECTORS: tuple[PlainSignatureVector, ...] = (OPEN_PLATFORM_PLAIN_SIGNATURE,)
