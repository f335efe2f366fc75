"""What the agent is sent: the session key of a WeChat conversation, and the message text.

**Session keys.** The gateway stores ``agent:<agentId>:<rest>`` and lowercases all of it, so two
WeChat ids that differ only in case (Official Account OpenIDs, AI-bot chat ids are case-sensitive)
would share a session if they were used as they are. :func:`session_key` fills a template such as
``wechat:{source}:{conversation}``; every value is kept as it is when it is already lowercase and
plain (``[a-z0-9_-]``, at most 64 characters), and otherwise becomes a readable lowercase form plus
``.`` and 16 hex digits of its SHA-256 (``wrKx9Q`` → ``wrkx9q.3f2a…``). A kept value never holds a
``.``, an escaped one always does, so two different ids never give the same key.

**Messages.** :func:`shape` renders the envelope with ``group_template`` or ``direct_template``
(placeholders ``{text} {sender} {sender_id} {group} {conversation} {source}``), after stripping the
bot's own @mention and turning attachments into short placeholders (``[image]``, ``[file: a.pdf]``,
``[link: Title https://…]``) until media is passed through.
"""

from __future__ import annotations

import hashlib
import re
import string

from bridge.envelope import Attachment, Envelope

__all__ = [
    "MESSAGE_FIELDS",
    "SESSION_FIELDS",
    "attachment_placeholder",
    "check_session_template",
    "check_template",
    "safe_component",
    "session_key",
    "shape",
    "strip_mentions",
]

SESSION_FIELDS = ("source", "conversation", "kind", "sender")
MESSAGE_FIELDS = ("text", "sender", "sender_id", "group", "conversation", "source")
_PLAIN = re.compile(r"[a-z0-9_-]{1,64}")
_LITERAL = re.compile(r"[a-z0-9_:.-]*")
_UNSAFE = re.compile(r"[^a-z0-9_-]+")
# WeCom puts U+2005 (four-per-em space) after an @mention; any whitespace or the end closes one
_MENTION_END = r"(?=[\s\u2005\u00a0]|$)"


def safe_component(value: str) -> str:
    """``value`` as it is when lowercase and plain, else ``<readable>.<16 hex of sha256>``."""
    if _PLAIN.fullmatch(value):
        return value
    readable = _UNSAFE.sub("_", value.lower()).strip("_")[:40] or "id"
    return f"{readable}.{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def _fields(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pairs; ValueError for a malformed template."""
    out = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        if name is not None and (spec or conv):
            raise ValueError(f"{{{name}}}: no format specs or conversions")
        out.append((literal, name))
    return out


def check_session_template(template: str) -> None:
    """Raise ValueError (without the key name) when the session key template cannot work."""
    try:
        parts = _fields(template)
    except ValueError as e:
        raise ValueError(f"not a valid template: {e}") from None
    for literal, name in parts:
        if not _LITERAL.fullmatch(literal):
            raise ValueError(
                f"{literal!r}: write the fixed text in lowercase letters, digits, ':', '.', '_', '-' "
                "(the gateway lowercases session keys)"
            )
        if name is not None and name not in SESSION_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join(SESSION_FIELDS)})")
    rendered = template.format(**dict.fromkeys(SESSION_FIELDS, "x"))
    if not rendered.strip(":"):
        raise ValueError("must not be empty")
    if rendered.startswith(("agent:", "cron:", "subagent:", "acp:")):
        raise ValueError("must not start with agent:, cron:, subagent: or acp: (the bridge adds agent:<id>:)")


def check_template(template: str) -> None:
    try:
        parts = _fields(template)
    except ValueError as e:
        raise ValueError(f"not a valid template: {e}") from None
    names = [n for _, n in parts if n is not None]
    for n in names:
        if n not in MESSAGE_FIELDS:
            raise ValueError(f"unknown placeholder {{{n}}} (known: {', '.join(MESSAGE_FIELDS)})")
    if "text" not in names:
        raise ValueError("must contain {text}")


#: envelope meta key of the text a message quotes (set by an inbound that sees quotes: the AI bot)
QUOTE_TEXT = "quote_text"
#: characters of a quote kept in the prompt
QUOTE_MAX = 1000


def session_key(template: str, *, source: str, conversation: str, kind: str, sender: str | None) -> str:
    """The rest of ``agent:<id>:<rest>`` for a conversation (see the module's docstring)."""
    values = {
        "source": source,
        "conversation": conversation,
        "kind": kind,
        "sender": sender or "-",
    }
    return template.format(**{k: safe_component(v) for k, v in values.items()})


def strip_mentions(text: str, names: list[str]) -> str:
    """``text`` without ``@name`` for each of ``names`` (the bot's own mention), tidied up."""
    out = text
    for name in sorted({n for n in names if n}, key=len, reverse=True):
        out = re.sub("@" + re.escape(name) + _MENTION_END + r"[\s\u2005\u00a0]*", "", out)
    if out != text:
        out = re.sub(r"[ \t\u2005\u00a0]{2,}", " ", out).strip()
    return out


def attachment_placeholder(a: Attachment) -> str:
    """A short line standing for an attachment the agent cannot open yet."""
    label = a.title or a.name
    if a.kind == "link":
        inner = " ".join(x for x in (label, a.url) if x)
    elif a.kind == "location":
        lat, lon = a.extra.get("latitude"), a.extra.get("longitude")
        where = f"{lat}, {lon}" if lat is not None and lon is not None else ""
        inner = " ".join(x for x in (label, f"({where})" if where else "") if x)
    elif a.kind == "other":
        inner = str(a.extra.get("msg_type") or label or "")
    else:
        inner = label or ""
    return f"[{a.kind}: {inner}]" if inner else f"[{a.kind}]"


def shape(
    env: Envelope,
    *,
    group_template: str,
    direct_template: str,
    bot_names: list[str],
    conversation: str | None = None,
) -> str:
    """The message the agent gets for an envelope; ValueError when there is nothing to say."""
    text = env.text
    names = list(bot_names)
    if env.mentions_me:
        names += env.mentions
    text = strip_mentions(text, names)
    lines = [attachment_placeholder(a) for a in env.attachments]
    if env.kind == "event":
        lines.append(f"[event: {env.event or 'unknown'}]")
    body = "\n".join(x for x in (text, *lines) if x)
    quote = env.meta.get(QUOTE_TEXT, "").strip()
    if quote and body.strip():  # what the person replied to: context before their words
        body = "\n".join(f"> {q}" if q else ">" for q in quote[:QUOTE_MAX].splitlines()) + "\n" + body
    if not body.strip():
        raise ValueError("nothing to send: the message has no text and no attachment")
    sender_id = env.sender.id if env.sender else ""
    sender = (env.sender.name or env.sender.id) if env.sender else "someone"
    conv = conversation or env.conversation.id
    group = env.conversation.title or conv
    values = {
        "text": body,
        "sender": sender,
        "sender_id": sender_id,
        "group": group,
        "conversation": conv,
        "source": env.source,
    }
    template = group_template if env.conversation.kind == "group" else direct_template
    return template.format(**values)
