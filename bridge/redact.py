"""The one place that decides what is secret-shaped and hides it: used by the log pipeline, error
texts, /readyz and ``check-config``.

* a key that names a secret (:data:`SECRET_KEYS`: ``token``, ``secret``, ``password``, ``api_key``,
  ``authorization``, ``cookie``…) has its value shown as ``***``, in a mapping or in a list of
  ``(name, value)`` pairs (HTTP headers);
* in any text, credentials that ride in URLs — ``user:pass@``, and query parameters named like
  secrets (``?password=``, ``?access_token=``, ``?key=``…) — become ``***``;
* a :class:`bridge.config.Secret` is always ``***`` (checked by the callers, which know the type).

This module imports nothing of the bridge, so everything can use it.
"""

from __future__ import annotations

import re
from typing import Any

#: key names whose values are secrets (config keys, log keys, HTTP header names)
SECRET_KEYS = re.compile(
    r"(token|secret|password|passwd|pwd|aes_key|api[_-]?key|^key$|credential|authorization|cookie"
    r"|signature)",
    re.I,
)
_URL_CRED = re.compile(r"(://)[^/@\s]*@")
_QUERY_SECRET = re.compile(
    r"((?:access_token|token|key|corpsecret|secret|password|passwd|pwd|api_key|apikey|auth|sig"
    r"|signature|msg_signature)=)[^&\s\"']+",
    re.IGNORECASE,
)
#: ``Authorization: Bearer …`` / ``X-Api-Key: …`` written into a text
_HEADER_LINE = re.compile(
    r"((?:authorization|x-api-key|api-key|cookie)\s*[:=]\s*)[^\s,;\"']+(?:\s+[^\s,;\"']+)?", re.I
)


def secret_key(key: str) -> bool:
    """Whether a key (config, log or header name) names a secret."""
    return SECRET_KEYS.search(key) is not None


def scrub(text: str) -> str:
    """``text`` with the credentials that ride in URLs and header lines replaced by ``***``."""
    if "://" in text:
        text = _URL_CRED.sub(r"\1***@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(r"\1***", text)
    if ":" in text or "=" in text:
        text = _HEADER_LINE.sub(r"\1***", text)
    return text


def masked(value: Any, key: str = "") -> Any:
    """A copy of a value fit to print: secrets (by key, by shape) shown as ``***``."""
    if type(value).__name__ == "Secret":
        return "***"
    if isinstance(value, dict):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) == 2 and all(isinstance(x, str) for x in value) and secret_key(value[0]):
            return [value[0], "***" if value[1] else value[1]]  # a (header name, value) pair
        return [masked(v, key) for v in value]
    if key and secret_key(key) and isinstance(value, str) and value:
        return "***"
    if isinstance(value, str):
        return scrub(value)
    return value
