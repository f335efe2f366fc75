"""``oa_articles``: articles of subscribed WeChat Official Accounts from a hosted sync API (seed 000).

``GET {base_url}/api/v1/wechat/messages`` with ``Authorization: Bearer <api_key>``. The first sync
pages with ``page``/``pageSize`` to the end; later polls ask ``since`` = the start of the last
successful poll (less ``since_overlap``: clocks differ, and an article the service stored late is
not missed), paging the same way. Articles dedupe by their id.

The API documents no response schema, so the body is read by shape (:func:`parse_body`) and a body
that fits none of the accepted shapes stops the feed with an error naming the keys it found.
Accepted:

- the list of articles at the top level, or under ``data``, ``items``, ``list``, ``messages``,
  ``articles``, ``records`` or ``results`` — or one level deeper under one of those (``{"data":
  {"list": [...]}}``);
- each article an object with its id under ``id``, ``articleId``, ``article_id``, ``msgId`` or
  ``msg_id`` (a string or a number); title under ``title``; link under ``url``, ``link``,
  ``articleUrl``, ``contentUrl``; summary under ``summary``, ``digest``, ``description``; the account
  under ``accountName``, ``account_name``, ``mpName``, ``nickname``, ``account``, ``source``
  (an object with ``name``/``nickname`` too), its id under ``accountId``, ``mpId``, ``biz``; the
  publish time under ``publishTime``, ``publishedAt``, ``publish_time``, ``published_at``,
  ``pubTime``, ``createTime``, ``createdAt``, ``create_time``, ``created_at``, ``time``,
  ``timestamp`` — unix seconds, milliseconds, or ISO 8601;
- the end of the pages: ``hasMore``/``has_more`` false, or ``total`` reached (either beside the
  list or at the top level), else an empty page or one shorter than ``pageSize``.

Errors: 401/403 stop the feed (the key is wrong or revoked); 429 and 5xx back off, honouring
Retry-After; another 4xx stops the feed with the API's message.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp

from bridge.config import Secret
from bridge.envelope import Attachment, Conversation, Sender
from bridge.poller import (
    Feed,
    FeedItem,
    FeedOptions,
    Page,
    PermanentFeedError,
    TransientFeedError,
    read_body,
    retry_after_seconds,
)

PATH = "/api/v1/wechat/messages"
LIST_KEYS = ("data", "items", "list", "messages", "articles", "records", "results")
ID_KEYS = ("id", "articleId", "article_id", "msgId", "msg_id")
URL_KEYS = ("url", "link", "articleUrl", "article_url", "contentUrl", "content_url")
SUMMARY_KEYS = ("summary", "digest", "description")
ACCOUNT_KEYS = ("accountName", "account_name", "mpName", "mp_name", "nickname", "account", "source")
ACCOUNT_ID_KEYS = ("accountId", "account_id", "mpId", "mp_id", "biz")
TIME_KEYS = ("publishTime", "publishedAt", "publish_time", "published_at", "pubTime", "createTime",
             "createdAt", "create_time", "created_at", "time", "timestamp")  # fmt: skip
MORE_KEYS = ("hasMore", "has_more")


class OAArticlesOptions(FeedOptions, kw_only=True):
    api_key: Secret
    base_url: str = "https://api.fafafa.ai"
    page_size: int = 20
    #: how ``since`` is written: unix seconds, unix milliseconds or ISO 8601 (UTC)
    since_format: Literal["unix", "unix_ms", "iso8601"] = "unix"
    #: seconds subtracted from the last poll's start when asking ``since`` (overlap, deduplicated)
    since_overlap: float = 300.0

    def check(self) -> None:
        super().check()
        if not self.api_key:
            raise ValueError("api_key: required (or api_key_file)")
        if not 1 <= self.page_size <= 1000:
            raise ValueError("page_size: must be between 1 and 1000")
        if self.since_overlap < 0:
            raise ValueError("since_overlap: must not be negative")


class ShapeError(ValueError):
    """The body fits none of the accepted shapes; the message names the keys found."""


def _keys(obj: Any) -> str:
    if isinstance(obj, dict):
        return ", ".join(sorted(str(k) for k in obj)) or "none (an empty object)"
    return f"none (a JSON {type(obj).__name__})"


def _find_list(body: Any) -> tuple[list[Any], dict[str, Any]]:
    """The article list and the object it was found in (where total/hasMore would be)."""
    if isinstance(body, list):
        return body, {}
    if not isinstance(body, dict):
        raise ShapeError(f"the body is a JSON {type(body).__name__}, not an object or a list")
    for k in LIST_KEYS:
        if isinstance(body.get(k), list):
            return body[k], body
    for k in LIST_KEYS:
        inner = body.get(k)
        if isinstance(inner, dict):
            for k2 in LIST_KEYS:
                if isinstance(inner.get(k2), list):
                    return inner[k2], inner
    raise ShapeError(
        f"no list of articles at the top level or under {', '.join(LIST_KEYS)} (one level deeper "
        f"too); top-level keys found: {_keys(body)}"
    )


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = d.get(k)
        if v is not None and v != "":
            return v
    return None


def parse_time(v: Any) -> float | None:
    """Unix seconds from seconds, milliseconds (numbers or digit strings) or ISO 8601."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v) / 1000.0 if v > 1e11 else float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            return parse_time(float(s))
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace(" ", "T", 1))
        except ValueError:
            return None
        if dt.tzinfo is None:  # no zone given: read as UTC (the README says so)
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    return None


def _text(v: Any) -> str | None:
    if isinstance(v, str):
        return v.strip() or None
    if isinstance(v, dict):
        return _text(_first(v, ("name", "nickname", "title")))
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return None


def parse_article(a: Any, feed: str) -> FeedItem:
    if not isinstance(a, dict):
        raise ShapeError(f"an article is a JSON {type(a).__name__}, not an object")
    aid = _first(a, ID_KEYS)
    if isinstance(aid, bool) or not isinstance(aid, str | int):
        raise ShapeError(f"an article has no id under {', '.join(ID_KEYS)}; its keys: {_keys(a)}")
    title = _text(a.get("title")) or ""
    url = _text(_first(a, URL_KEYS))
    summary = _text(_first(a, SUMMARY_KEYS))
    account = _text(_first(a, ACCOUNT_KEYS))
    account_id = _text(_first(a, ACCOUNT_ID_KEYS)) or account
    published = parse_time(_first(a, TIME_KEYS))
    text = "\n".join(p for p in (title, summary, url) if p)
    conv = Conversation(account_id or feed, "direct", account or None)
    return FeedItem(
        id=str(aid),
        conversation=conv,
        text=text,
        raw=a,
        created_at=published,
        sender=Sender(account_id, account) if account_id else None,
        attachments=(Attachment("link", url=url, title=title or None, description=summary),) if url else (),
    )


def parse_body(body: Any, feed: str, page_size: int, page: int) -> tuple[list[FeedItem], bool]:
    """(articles oldest first, whether another page follows). Raises ShapeError."""
    raw_items, holder = _find_list(body)
    items = [parse_article(a, feed) for a in raw_items]
    items.sort(key=lambda i: i.created_at or 0.0)
    more: bool | None = None
    for where in (holder, body if isinstance(body, dict) else {}):
        flag = _first(where, MORE_KEYS)
        if isinstance(flag, bool):
            more = flag
            break
        total = where.get("total")
        if isinstance(total, int) and not isinstance(total, bool):
            more = page * page_size < total
            break
    if not raw_items:  # an empty page ends it, whatever the flags say
        more = False
    elif more is None:  # no flag, no total: a short page is the last
        more = len(raw_items) >= page_size
    return items, more


class OAArticlesFeed(Feed):
    """Cursor (JSON): ``{"page": n, "since": t|null, "started": t}`` while paging, ``{"since": t}``
    between polls (``since`` null: the first sync, which pages through everything)."""

    Options = OAArticlesOptions
    options: OAArticlesOptions

    def _since(self, t: float) -> str:
        fmt = self.options.since_format
        if fmt == "unix_ms":
            return str(int(t * 1000))
        if fmt == "iso8601":
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        return str(int(t))

    def describe(self, cursor: str | None) -> str:
        if not cursor:
            return "first sync not started"
        c = json.loads(cursor)
        since = c.get("since")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since is not None else None
        if "page" in c:
            return f"{'first sync' if since is None else 'since ' + str(when)}: next page {c['page']}"
        return f"since {when}"

    async def fetch(self, cursor: str | None) -> Page:
        c: dict[str, Any] = json.loads(cursor) if cursor else {"since": None}
        page = int(c.get("page", 1))
        since = c.get("since")
        started = float(c.get("started", time.time()))
        params = {"page": str(page), "pageSize": str(self.options.page_size)}
        if since is not None:
            params["since"] = self._since(float(since))
        body = await self._get(params)
        try:
            items, more = parse_body(body, self.name, self.options.page_size, page)
        except ShapeError as e:
            raise PermanentFeedError(
                f"oa_articles: the response fits none of the accepted shapes: {e}"
            ) from None
        if more:
            nxt = {"page": page + 1, "since": since, "started": started}
        else:  # done: the next poll asks for what is newer than this poll's start
            nxt = {"since": max(started - self.options.since_overlap, float(since or 0))}
        return Page(items, json.dumps(nxt), more)

    async def _get(self, params: dict[str, str]) -> Any:
        url = self.options.base_url.rstrip("/") + PATH
        headers = {"Authorization": f"Bearer {self.options.api_key.reveal()}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.options.timeout)
        async with self.ctx.http().get(url, params=params, headers=headers, timeout=timeout) as r:
            data = await read_body(r, self.options.max_response)
            if r.status in (401, 403):
                raise PermanentFeedError(
                    f"oa_articles: HTTP {r.status}: the API key was refused; create or reveal a valid key "
                    "in the web app (API Key management) and set api_key"
                )
            if r.status == 429 or r.status >= 500:
                raise TransientFeedError(
                    f"oa_articles: HTTP {r.status}", retry_after_seconds(r.headers.get("Retry-After"))
                )
            if r.status >= 400:
                raise PermanentFeedError(f"oa_articles: HTTP {r.status}: {_message(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise PermanentFeedError(
                    f"oa_articles: HTTP {r.status} with a body that is not JSON "
                    f"(Content-Type {r.headers.get('Content-Type', 'absent')}); check base_url"
                ) from None


def _message(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return "no JSON error message"
    if isinstance(body, dict):
        for k in ("error", "message", "msg", "detail"):
            if isinstance(body.get(k), str):
                return str(body[k])[:200]
    return "no error message"
