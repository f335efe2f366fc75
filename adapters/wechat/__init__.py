"""What WeCom and the Official Account share.

- ``crypto.py``: WXBizMsgCrypt (signatures, AES-CBC with PKCS#7 to 32 bytes, receive-id check);
- ``parsing.py``: the callbacks' XML and JSON payloads as dicts, refusals as :class:`CallbackRefused`;
- ``callback.py``: the callback base class (verify → decrypt → parse → dedupe + publish → answer)
  and the XML message → envelope table the WeCom app and the Official Account both use;
- ``client.py``: JSON calls that branch on errcode, with an access token (WeCom app, Official Account);
- ``tokens.py``: the access token cache in Redis, one fetch for every instance;
- ``errcodes.py``: errcode → retry, back off, or dead-letter with what to fix;
- ``parts.py``: a reply as parts on the wire (split text, news), sent in order and resumed;
- ``simulate.py``: ``wechat-bridge simulate``, a callback exactly as WeChat would send it.

Platform folders (``wecom/``, ``official_account/``) import from here and from ``bridge/``, never
from each other; nothing here imports from a platform folder.
"""
