"""A stand-in for Tencent Cloud Chat's ``official_account_msg_get_simple`` (seed 003).

``POST /v4/official_account_open_http_svc/official_account_msg_get_simple?sdkappid=&identifier=
&usersig=&random=&contenttype=json``. The UserSig is verified as the service does (TLS Sig API v2
with the app's secret key, expiry included). Without ``LastMsgKey`` the latest ``ReqMsgNumber``
messages come back (at most 20), with one the messages before it; each page in ascending seq with
``LastMsgKey`` the oldest's key. ``IsFinished``: 1 all of the requested range returned, 0 when more
than 20 were asked, 2 when everything before the range has expired. Deleted or expired messages
come back as holes (``IsPlaceMsg`` 1, empty ``MsgBody``), recalled ones with ``IsPlaceMsg`` 2 (their
body only with ``WithRecalledMsg`` 1). HTTP is always 200: errors are ``ErrorCode``/``ErrorInfo``
(10003, 10004, 10007, 10010, 10015 as listed; 70001 an expired UserSig, 70009 a wrong one, 60007
over 200 queries a second).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from aiohttp import web

from adapters.feeds.usersig import verify_usersig
from tests.fakes.feed_server import FakeFeedServer

PATH = "/v4/official_account_open_http_svc/official_account_msg_get_simple"


class FakeTencentIM(FakeFeedServer):
    def __init__(
        self,
        sdkappid: int = 1400000000,
        key: str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e",
    ) -> None:
        super().__init__()
        self.sdkappid = sdkappid
        self.key = key
        self.admins = {"administrator"}
        self.accounts: dict[str, list[dict[str, Any]]] = {}
        self.deleted: set[int] = set()
        self.recalled: set[int] = set()
        #: messages below this seq have expired
        self.expired_below = 0
        self.qps_limit = 200
        self.over_rate = 0
        self._times: deque[float] = deque()

    def post(self, account: str, text: str, *, sender: str = "144115197276518801") -> dict[str, Any]:
        msgs = self.accounts.setdefault(account, [])
        seq = len(msgs) + 1
        ts = int(time.time())
        m = {"From_Account": sender, "IsPlaceMsg": 0,
             "MsgBody": [{"MsgContent": {"Text": text}, "MsgType": "TIMTextElem"}],
             "MsgSeq": seq, "MsgKey": f"{seq}_1_{ts}", "MsgTimeStamp": ts}  # fmt: skip
        msgs.append(m)
        return m

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.get_simple)
        app.router.add_route("*", "/v4/{tail:.*}", self.unknown)

    @staticmethod
    def _err(code: int, info: str) -> web.Response:
        return web.json_response({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info})

    async def unknown(self, request: web.Request) -> web.Response:
        return self._err(10003, "illegal request command word")

    def _view(self, m: dict[str, Any], with_recalled: bool) -> dict[str, Any]:
        seq = m["MsgSeq"]
        if seq in self.deleted:
            return {**m, "IsPlaceMsg": 1, "MsgBody": []}
        if seq in self.recalled:
            return {**m, "IsPlaceMsg": 2, "MsgBody": m["MsgBody"] if with_recalled else []}
        return m

    async def get_simple(self, request: web.Request) -> web.Response:
        raw = await request.read()
        fault = await self.enter(request, body=raw.decode(errors="replace"))
        now = time.monotonic()
        self._times.append(now)
        while self._times and self._times[0] < now - 1.0:
            self._times.popleft()
        if len(self._times) > self.qps_limit:
            self.over_rate += 1
            return self._err(60007, "REST API call frequency exceeds the limit")
        if fault is not None:
            if fault.status != 200:
                return web.Response(status=fault.status, text="bad gateway")
            return web.json_response(fault.body)
        q = request.query
        for p in ("sdkappid", "identifier", "usersig", "random", "contenttype"):
            if p not in q:
                return self._err(60002, f"HTTP parse error: {p} missing")
        if q["contenttype"] != "json" or not q["random"].isdigit() or not 0 <= int(q["random"]) <= 4294967295:
            return self._err(60002, "HTTP parse error: contenttype or random")
        if q["sdkappid"] != str(self.sdkappid):
            return self._err(70014, "sdkappid mismatch")
        why = verify_usersig(q["usersig"], self.sdkappid, self.key, q["identifier"])
        if why == "expired":
            return self._err(70001, "usersig expired")
        if why is not None:
            return self._err(70009, f"usersig check failed: {why}")
        if q["identifier"] not in self.admins:
            return self._err(10007, "insufficient operational permissions")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._err(10004, "invalid parameter: body is not JSON")
        account = body.get("Official_Account") if isinstance(body, dict) else None
        if not isinstance(account, str) or not account:
            return self._err(10004, "invalid parameter: Official_Account")
        if not account.startswith("@TOA#"):
            return self._err(10015, "invalid official account user id")
        if account not in self.accounts:
            return self._err(10010, "official account user does not exist")
        want = body.get("ReqMsgNumber", 20)
        if not isinstance(want, int) or want < 1:
            return self._err(10004, "invalid parameter: ReqMsgNumber")
        msgs = [m for m in self.accounts[account] if m["MsgSeq"] >= self.expired_below]
        last_key = body.get("LastMsgKey")
        if last_key is not None:
            try:
                before = int(str(last_key).split("_")[0])
            except ValueError:
                return self._err(10004, "invalid parameter: LastMsgKey")
            msgs = [m for m in msgs if m["MsgSeq"] < before]
        n = min(want, 20)
        page = msgs[-n:] if msgs else []
        finished = 0 if want > 20 and len(msgs) > 20 else 1
        if page and page[0]["MsgSeq"] <= self.expired_below and self.expired_below > 1:
            finished = 2
        if not msgs and self.expired_below > 1:
            finished = 2
        out: dict[str, Any] = {
            "ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0, "Official_Account": account,
            "IsFinished": finished,
            "RspMsgList": [self._view(m, body.get("WithRecalledMsg") == 1) for m in page],
        }  # fmt: skip
        if page:
            out["LastMsgKey"] = page[0]["MsgKey"]
        return web.json_response(out)
