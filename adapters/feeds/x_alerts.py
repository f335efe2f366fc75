"""``x_alerts``: X-post alerts from the WallaWhats notifications history (seed 001).

``GET {base_url}/notifications`` with ``x-api-key``; ``from``/``to`` (ms) choose a window and
``lastKey`` pages through it (50 per page; no ``lastKey`` in the answer: the end). A poll asks for
the window from the checkpoint (less ``overlap``) to now; the first sync asks for everything up to
now (or the last ``backfill`` seconds). Each page is published and then its ``lastKey`` checkpointed,
so a restart resumes inside the window. Items dedupe by ``tweetId`` (one post alerted to two phones
is one message), else by ``notificationId``.

Errors (JSON ``{"error": "..."}`` with the status): 401 (key missing or invalid) and 402 (out of
credits) stop the feed with a clear message and readiness false; 400 stops it with the API's message
(a checkpointed ``lastKey`` the API no longer takes is dropped once and the window re-read first);
404 stops it (check ``base_url``); 403 (rate limited) and 429 back off honouring Retry-After; 500
and other 5xx back off exponentially.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from bridge.config import Secret
from bridge.envelope import Conversation, Sender
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


class XAlertsOptions(FeedOptions, kw_only=True):
    api_key: Secret
    base_url: str = "https://api.wallawhats.com"
    interval: float = 60.0
    #: seconds re-read before the last window's end on the next poll (late writes; deduplicated)
    overlap: float = 60.0
    #: first sync: only the last this many seconds (0: the whole history)
    backfill: float = 0.0

    def check(self) -> None:
        super().check()
        if not self.api_key:
            raise ValueError("api_key: required (or api_key_file)")
        if self.overlap < 0 or self.backfill < 0:
            raise ValueError("overlap: must not be negative (nor backfill)")


def _error(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return "no JSON error"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:200]
    return "no error message"


def parse_notification(n: Any) -> FeedItem:
    if not isinstance(n, dict):
        raise PermanentFeedError(f"x_alerts: a notification is a JSON {type(n).__name__}, not an object")
    nid, tid = n.get("notificationId"), n.get("tweetId")
    if not isinstance(nid, str) and not isinstance(tid, str):
        raise PermanentFeedError(
            "x_alerts: a notification has neither notificationId nor tweetId; "
            f"its keys: {', '.join(sorted(n))}"
        )
    user: str = n["xUsername"] if isinstance(n.get("xUsername"), str) and n["xUsername"] else "unknown"
    text = n.get("tweetText") if isinstance(n.get("tweetText"), str) else ""
    url = n.get("tweetUrl") if isinstance(n.get("tweetUrl"), str) else ""
    created = n.get("createdAt")
    return FeedItem(
        id=f"tweet:{tid}" if isinstance(tid, str) and tid else f"n:{nid}",
        conversation=Conversation(user, "direct", f"@{user}"),
        text="\n".join(p for p in (f"@{user}: {text}" if text else f"@{user}", url) if p),
        raw=n,
        created_at=created / 1000.0
        if isinstance(created, int | float) and not isinstance(created, bool)
        else None,
        sender=Sender(user, f"@{user}"),
    )


class XAlertsFeed(Feed):
    """Cursor (JSON): ``{"from": ms|null, "to": ms, "lastKey": k}`` inside a window,
    ``{"next_from": ms}`` between polls."""

    Options = XAlertsOptions
    options: XAlertsOptions

    def describe(self, cursor: str | None) -> str:
        if not cursor:
            return "first sync not started"
        c = json.loads(cursor)
        if "next_from" in c:
            return f"next from {_iso(c['next_from'])}"
        return f"window {_iso(c.get('from'))} .. {_iso(c['to'])}, next page {str(c.get('lastKey'))[:16]}…"

    async def fetch(self, cursor: str | None) -> Page:
        c: dict[str, Any] = json.loads(cursor) if cursor else {}
        now_ms = int(time.time() * 1000)
        if "to" in c:  # inside a window
            frm, to, last_key = c.get("from"), int(c["to"]), c.get("lastKey")
        else:
            if "next_from" in c:
                frm = max(int(c["next_from"]) - int(self.options.overlap * 1000), 0)
            else:
                frm = now_ms - int(self.options.backfill * 1000) if self.options.backfill else None
            to, last_key = now_ms, None
        params = {"to": str(to)}
        if frm is not None:
            params["from"] = str(frm)
        if last_key:
            params["lastKey"] = str(last_key)
        try:
            body = await self._get(params)
        except _BadRequest as e:
            if not last_key:
                raise PermanentFeedError(f"x_alerts: HTTP 400: {e}") from None
            self.log.warning("x_alerts.last_key_refused", error=str(e))
            del params["lastKey"]  # re-read the window from its start: duplicates dedupe
            try:
                body = await self._get(params)
            except _BadRequest as e2:
                raise PermanentFeedError(f"x_alerts: HTTP 400: {e2}") from None
        if not isinstance(body, dict) or not isinstance(body.get("notifications"), list):
            found = ", ".join(sorted(body)) if isinstance(body, dict) else f"a JSON {type(body).__name__}"
            raise PermanentFeedError(
                f"x_alerts: the response has no notifications list; found: {found or 'nothing'}"
            )
        items = [parse_notification(n) for n in body["notifications"]]
        items.sort(key=lambda i: i.created_at or 0.0)
        nxt_key = body.get("lastKey")
        if isinstance(nxt_key, str) and nxt_key:
            return Page(items, json.dumps({"from": frm, "to": to, "lastKey": nxt_key}), more=True)
        return Page(items, json.dumps({"next_from": to}), more=False)

    async def _get(self, params: dict[str, str]) -> Any:
        url = self.options.base_url.rstrip("/") + "/notifications"
        headers = {"x-api-key": self.options.api_key.reveal(), "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.options.timeout)
        async with self.ctx.http().get(url, params=params, headers=headers, timeout=timeout) as r:
            data = await read_body(r, self.options.max_response)
            st = r.status
            if st == 401:
                raise PermanentFeedError(
                    "x_alerts: HTTP 401: the API key is missing or invalid; create one in the console "
                    "(Settings → API Keys) and set api_key"
                )
            if st == 402:
                raise PermanentFeedError(
                    "x_alerts: HTTP 402: out of credits; top up the account, then restart"
                )
            if st == 400:
                raise _BadRequest(_error(data))
            if st == 404:
                raise PermanentFeedError(f"x_alerts: HTTP 404 ({_error(data)}): check base_url")
            if st in (403, 429) or st >= 500:
                raise TransientFeedError(
                    f"x_alerts: HTTP {st}: {_error(data)}", retry_after_seconds(r.headers.get("Retry-After"))
                )
            if st >= 300:
                raise PermanentFeedError(f"x_alerts: HTTP {st}: {_error(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise PermanentFeedError("x_alerts: the response is not JSON; check base_url") from None


class _BadRequest(Exception):
    pass


def _iso(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "the beginning"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
