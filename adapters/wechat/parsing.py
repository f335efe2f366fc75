"""The callbacks' payloads as dicts: WeChat's XML (a fast path for its flat documents, expat for
the rest, no DTD and no entities ever) and JSON objects. A payload that does not parse raises
:class:`CallbackRefused` with status 400.
"""

from __future__ import annotations

import pyexpat
import re
from collections.abc import Mapping
from typing import Any

import msgspec

_MAX_XML_DEPTH = 16


class CallbackRefused(Exception):
    """A request we do not accept: ``status`` for the caller, ``reason`` (fixed text) for both."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Forbidden(Exception):
    """A DOCTYPE, an entity declaration or an external reference: refused where it appears."""


def _forbid(*_: Any) -> None:
    raise _Forbidden


def parse_xml(data: bytes, what: str) -> dict[str, Any]:
    """``<xml>…</xml>`` as a dict (leaf text, nested dicts, lists for repeated tags).

    What WeChat sends — a flat ``<xml>`` of leaves holding plain text or one CDATA section — takes a
    short path (:func:`_parse_flat`, figures in bench/RESULTS.md); anything else, and anything that
    path is unsure of, goes to expat as described below.

    Built on expat directly, as it parses (no tree first): a leaf's value is all its text (CDATA
    included, comments skipped), an element with children becomes a dict of them and its own text is
    dropped; attributes are ignored; namespaced tags read ``{uri}name``. Any DOCTYPE is refused the
    moment it starts, so no entity can ever be declared (no billion laughs, no external entities:
    what defusedxml's ``forbid_dtd`` does); nesting past 16 levels, malformed XML and a root other
    than ``<xml>`` are refused too. Every refusal is a 400.
    """
    flat = _parse_flat(data)
    if flat is not None:
        return flat
    return _parse_expat(data, what)


#: one leaf, after optional whitespace: ``<Name>`` (plain ASCII name, no attributes), then either one
#: CDATA section (any text without ``]]>``) or plain text (no ``<``, ``&`` or ``]``), then ``</Name>``
_LEAF = re.compile(
    r"[ \t\n]*<([A-Za-z_][A-Za-z0-9_.\-]{0,63})>"
    r"(?:<!\[CDATA\[([^\]]*(?:\](?!\]>)[^\]]*)*)\]\]>|([^<&\]]*))</\1>"
)
_FLAT_END = re.compile(r"[ \t\n]*</xml>[ \t\n]*")
#: bytes XML forbids (C0 controls but tab and newline) or changes (``\r`` is normalized) map to 0
_UNSURE = bytes(0 if b < 0x20 and b not in (0x09, 0x0A) else 1 for b in range(256))


def _parse_flat(data: bytes) -> dict[str, Any] | None:
    """A flat document as :func:`parse_xml`'s dict, or None when it is not plainly one.

    Only UTF-8 that starts with ``<xml>``, holds nothing but :data:`_LEAF` leaves separated by
    spaces, tabs or newlines, and has no byte XML forbids or rewrites: such a document is well formed,
    has no DTD, no entity and no markup in any text, so its dict is exactly what expat gives (tests
    check this against expat on generated documents). Everything else returns None: expat decides.
    """
    if not data.startswith(b"<xml>") or 0 in data.translate(_UNSURE):
        return None
    if b"\xef\xbf\xbe" in data or b"\xef\xbf\xbf" in data:  # U+FFFE, U+FFFF: not XML characters
        return None
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out: dict[str, Any] = {}
    pos = 5
    match = _LEAF.match
    while (m := match(s, pos)) is not None:
        name, cdata, text = m.groups()
        _put(out, name, text if cdata is None else cdata)
        pos = m.end()
    return out if _FLAT_END.fullmatch(s, pos) is not None else None


def _parse_expat(data: bytes, what: str) -> dict[str, Any]:
    stack: list[list[Any]] = []  # per open element: [tag, children dict or None, text parts]
    top: list[tuple[str, Any]] = []

    def start(tag: str, _attrs: Any) -> None:
        if len(stack) > _MAX_XML_DEPTH:
            raise CallbackRefused(400, "XML nested too deeply")
        stack.append([tag, None, []])

    def end(_tag: str) -> None:
        tag, children, text = stack.pop()
        value = children if children is not None else "".join(text)
        if "}" in tag:
            tag = "{" + tag
        if not stack:
            top.append((tag, value))
            return
        parent = stack[-1]
        siblings = parent[1]
        if siblings is None:
            siblings = parent[1] = {}
        _put(siblings, tag, value)

    def chars(text: str) -> None:
        if stack:
            stack[-1][2].append(text)

    p = pyexpat.ParserCreate(None, "}")
    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = _forbid
    p.EntityDeclHandler = _forbid
    p.UnparsedEntityDeclHandler = _forbid
    p.ExternalEntityRefHandler = _forbid  # type: ignore[assignment]
    p.buffer_text = True
    try:
        p.Parse(data, True)
    except _Forbidden:
        raise CallbackRefused(400, f"{what}: DTD or entity refused") from None
    except (pyexpat.ExpatError, ValueError, LookupError, RecursionError):
        raise CallbackRefused(400, f"{what}: malformed XML") from None
    if not top:  # pragma: no cover - expat refuses a document without a root element
        raise CallbackRefused(400, f"{what}: malformed XML")
    tag, value = top[0]
    if tag != "xml":
        raise CallbackRefused(400, f"{what}: root element is not <xml>")
    return value if isinstance(value, dict) else {}


def _put(out: dict[str, Any], tag: str, value: Any) -> None:
    """``out[tag] = value``; a repeated tag becomes the list of its values, in order."""
    prev = out.get(tag)
    if prev is None:  # values are strings, dicts or lists, never None
        out[tag] = value
    elif isinstance(prev, list):
        prev.append(value)
    else:
        out[tag] = [prev, value]


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(data)
    except (ValueError, RecursionError):  # msgspec.DecodeError, UnicodeDecodeError
        raise CallbackRefused(400, f"{what}: malformed JSON") from None
    if not isinstance(value, dict):
        raise CallbackRefused(400, f"{what}: not a JSON object")
    return value


def field(d: Mapping[str, Any], key: str) -> str:
    """A leaf field as a string ("" when missing or not a leaf)."""
    v = d.get(key)
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return ""
    if isinstance(v, float) or (isinstance(v, int) and -_INT_MAX <= v <= _INT_MAX):
        return str(v)
    return ""  # an integer past 64 bits is no WeChat field (and its str() may refuse: 4,300 digits)


_INT_MAX = 2**63


def seconds(value: str) -> float | None:
    v = value.strip()
    return float(v) if v.isascii() and v.isdigit() and len(v) <= 12 else None
