"""A reply as parts on the wire, and sending them in order.

- :class:`Part` and the builders (:func:`text_parts`, :func:`news_parts`, :func:`attachment_line`):
  a delivery cut to the sink's byte limits, numbered "(i/n)" when split;
- :func:`send_parts`: the parts of a split delivery go out in order, a retry
  starts after the last part sent, and every part after the first is charged to the same rate keys
  the runner charges once per attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.adapter import SendContext
from bridge.config import Rate, parse_rates
from bridge.envelope import Attachment
from bridge.text import split_text

JSON = dict[str, Any]


@dataclass
class Part:
    """One message on the wire: its msgtype and the type's object; ``attachment`` when the part
    is built at send time (downloads, uploads)."""

    msgtype: str
    payload: JSON = field(default_factory=dict)
    attachment: Attachment | None = None


def text_parts(
    text: str, *, markdown: bool, text_limit: int, markdown_limit: int, number_parts: bool = True
) -> list[Part]:
    """``text`` cut to the limits, as text or markdown parts (numbered "(i/n)" when split)."""
    if not text:
        return []
    if markdown:
        chunks = split_text(text, markdown_limit, number_parts=number_parts, markdown=True)
        return [Part("markdown", {"content": c}) for c in chunks]
    return [Part("text", {"content": c}) for c in split_text(text, text_limit, number_parts=number_parts)]


def attachment_line(a: Attachment) -> str:
    """An attachment a sink cannot send natively, as a line of text (so it is never dropped)."""
    label = a.title or a.name or ""
    where = a.url or (f"media_id {a.media_id}" if a.media_id else "")
    if a.kind == "location":
        lat, lng = a.extra.get("lat", a.extra.get("latitude")), a.extra.get("lng", a.extra.get("longitude"))
        where = where or (f"{lat},{lng}" if lat is not None and lng is not None else "")
    return " ".join(x for x in (f"[{a.kind}]", label, where) if x)


def article(a: Attachment) -> JSON:
    """A news article from a link attachment (``extra.picurl`` for the cover)."""
    out: JSON = {"title": a.title or a.name or a.url or "", "url": a.url or ""}
    if a.description:
        out["description"] = a.description
    pic = a.extra.get("picurl") or a.extra.get("pic_url")
    if isinstance(pic, str) and pic:
        out["picurl"] = pic
    return out


def news_parts(links: Sequence[Attachment], per_message: int = 8) -> list[Part]:
    return [
        Part("news", {"articles": [article(a) for a in links[i : i + per_message]]})
        for i in range(0, len(links), per_message)
    ]


async def send_parts(
    ctx: SendContext,
    parts: Sequence[Part],
    send_one: Callable[[int, Part], Awaitable[str | None]],
) -> list[str]:
    """Send ``parts[k:]`` in order, where ``k`` parts went out on earlier attempts; record each."""
    first = await ctx.parts_sent()
    ids: list[str] = []
    for i in range(first, len(parts)):
        if i > first:
            await ctx.charge_part(f"rate limit: {i} of {len(parts)} parts sent")
        remote = await send_one(i, parts[i])
        if remote:
            ids.append(remote)
        await ctx.part_sent(i + 1)
    return ids


def check_limit(key: str, limit: int, ceiling: int) -> None:
    """Option check for a byte limit: sensible, and not past what WeChat accepts whole."""
    if not 64 <= limit <= ceiling:
        raise ValueError(f"{key}: must be between 64 and {ceiling} bytes (WeChat truncates or rejects more)")


def check_rates(key: str, spec: str) -> list[Rate]:
    try:
        return parse_rates(spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def fits(text: str | None, limit: int) -> bool:
    """True when ``text`` is at most ``limit`` UTF-8 bytes (WeChat truncates card fields past it)."""
    return len((text or "").encode()) <= limit
