"""A stand-in for the WallaWhats REST API's notification history (seed 001).

``GET /notifications`` with ``x-api-key``; ``from``/``to`` (ms, inclusive) filter on ``createdAt``;
50 a page, newest first; ``lastKey`` (opaque, as returned) continues, and its absence in an answer
means the end. Errors are JSON ``{"error": ...}`` with the documented status: 400 bad parameters,
401 key missing or invalid, 402 out of credits, 404 not found, 500 server error; 403 is the rate
limit. ``credits`` set to 0 makes every call 402.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from aiohttp import web

from tests.fakes.feed_server import FakeFeedServer

PAGE = 50


class FakeXAlertsAPI(FakeFeedServer):
    def __init__(self, key: str = "bws_prod_" + "0" * 27) -> None:
        super().__init__()
        self.key = key
        self.credits: int | None = None
        self.notifications: list[dict[str, Any]] = []

    def alert(
        self, user: str, text: str, *, created_ms: int | None = None, tweet: str | None = None
    ) -> dict[str, Any]:
        """Record an alert for a post of ``user`` (as the service does when the account posts)."""
        now = int(time.time() * 1000) if created_ms is None else created_ms
        tid = tweet or str(1797123456789000000 + len(self.notifications))
        n = {"notificationId": str(uuid.uuid4()), "userId": "5a4cbd70-0000", "phoneNumber": "+34612345678",
             "xUsername": user, "tweetId": tid, "tweetText": text,
             "tweetUrl": f"https://x.com/{user}/status/{tid}", "waMessageId": "wamid.HBgN" + tid[-6:],
             "status": "delivered", "errorMessage": None, "createdAt": now, "updatedAt": now + 2000}  # fmt: skip
        self.notifications.append(n)
        return n

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/notifications", self.list)
        app.router.add_route("*", "/{tail:.*}", self.not_found)

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "not found"}, status=404)

    @staticmethod
    def _key(n: dict[str, Any]) -> tuple[int, str]:
        return (-int(n["createdAt"]), str(n["notificationId"]))

    async def list(self, request: web.Request) -> web.Response:
        fault = await self.enter(request, key=request.headers.get("x-api-key", ""))
        if fault is not None:
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        if request.headers.get("x-api-key") != self.key:
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.credits == 0:
            return web.json_response({"error": "insufficient credits"}, status=402)
        q = request.query
        bounds: dict[str, int] = {}
        for name in ("from", "to"):
            if name in q:
                if not q[name].isdigit():
                    return web.json_response({"error": f"{name} must be a timestamp in ms"}, status=400)
                bounds[name] = int(q[name])
        rows = [n for n in self.notifications
                if bounds.get("from", 0) <= n["createdAt"] <= bounds.get("to", 2**62)]  # fmt: skip
        rows.sort(key=self._key)
        if "lastKey" in q:
            try:
                last = json.loads(base64.urlsafe_b64decode(q["lastKey"]))
                after = (-int(last["c"]), str(last["n"]))
            except (ValueError, KeyError, TypeError):
                return web.json_response({"error": "invalid lastKey"}, status=400)
            rows = [n for n in rows if self._key(n) > after]
        chunk = rows[:PAGE]
        body: dict[str, Any] = {"notifications": chunk}
        if len(rows) > PAGE:
            tail = chunk[-1]
            body["lastKey"] = base64.urlsafe_b64encode(
                json.dumps({"c": tail["createdAt"], "n": tail["notificationId"]}).encode()
            ).decode()
        return web.json_response(body)
