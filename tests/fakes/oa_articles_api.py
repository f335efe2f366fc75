"""A stand-in for the Official Account article sync API of seed 000.

``GET /api/v1/wechat/messages`` with ``Authorization: Bearer <key>``; ``page`` (from 1) and
``pageSize`` page through the articles the service holds, newest first; ``since`` (unix seconds,
milliseconds or ISO 8601: the seed does not say which, so all are taken) keeps those the service
stored after it. A missing or wrong key is 401. The seed gives no response schema: the body's shape
is ``shape(articles, total, page, page_size)``, by default ``{"code": 0, "data": {"list": [...],
"total": n}}``; tests swap it for the other accepted shapes and for ones that fit none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from tests.fakes.feed_server import FakeFeedServer

Shape = Callable[[list[dict[str, Any]], int, int, int], Any]


def default_shape(items: list[dict[str, Any]], total: int, page: int, size: int) -> Any:
    return {"code": 0, "data": {"list": items, "total": total}}


def _since(v: str) -> float | None:
    try:
        n = float(v)
        return n / 1000 if n > 1e11 else n
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class FakeOAArticlesAPI(FakeFeedServer):
    def __init__(self, key: str = "oa-test-key") -> None:
        super().__init__()
        self.key = key
        #: (stored at, article), in the order the service stored them
        self.articles: list[tuple[float, dict[str, Any]]] = []
        self.shape: Shape = default_shape
        self._n = 0

    def add(
        self, title: str, *, account: str = "Tech Daily", stored_at: float | None = None, **extra: Any
    ) -> str:
        """Store one article (as the service does when an account publishes); returns its id."""
        self._n += 1
        aid = f"art-{self._n:05d}"
        now = time.time() if stored_at is None else stored_at
        article = {"id": aid, "title": title, "url": f"https://mp.weixin.qq.com/s/{aid}",
                   "accountName": account, "digest": f"summary of {title}",
                   "publishTime": int(now), **extra}  # fmt: skip
        self.articles.append((now, article))
        return aid

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/wechat/messages", self.messages)

    async def messages(self, request: web.Request) -> web.Response:
        fault = await self.enter(request, auth=request.headers.get("Authorization", ""))
        if fault is not None:
            if isinstance(fault.body, str | bytes):
                return web.Response(status=fault.status, body=fault.body, headers=fault.headers)
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "invalid api key"}, status=401)
        q = request.query
        try:
            page = int(q.get("page", "1"))
            size = int(q.get("pageSize", "20"))
        except ValueError:
            return web.json_response({"error": "page and pageSize must be integers"}, status=400)
        if page < 1 or not 1 <= size <= 100:
            return web.json_response({"error": "page must be >= 1 and pageSize 1..100"}, status=400)
        rows = self.articles
        if "since" in q:
            since = _since(q["since"])
            if since is None:
                return web.json_response({"error": "invalid since"}, status=400)
            rows = [r for r in rows if r[0] > since]
        newest_first = [a for _, a in sorted(rows, key=lambda r: r[0], reverse=True)]
        chunk = newest_first[(page - 1) * size : page * size]
        return web.json_response(self.shape(chunk, len(newest_first), page, size))
