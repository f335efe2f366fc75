"""``tencent_im_oa``: the history of a Tencent Cloud Chat official-account user (seed 003).

``POST https://<region domain>/v4/official_account_open_http_svc/official_account_msg_get_simple``
``?sdkappid=&identifier=<app admin>&usersig=&random=&contenttype=json`` with ``{"Official_Account",
"LastMsgKey", "ReqMsgNumber", "WithRecalledMsg"}``. The API pages *backwards*: without
``LastMsgKey`` it returns the latest messages, with one the messages before it. So one poll pages
back from the newest message until it reaches the checkpoint (the highest ``MsgSeq`` published),
the beginning of the history (an empty list, ``IsFinished`` = 2: all earlier messages expired, or
seq 1), then publishes what is new oldest first and checkpoints the highest seq. The first sync
pages to the beginning. ``IsPlaceMsg`` = 1 (deleted or expired) is skipped; 2 (recalled) is skipped
unless ``with_recalled`` (then published as an event ``recalled``).

The admin UserSig is generated from ``sdkappid`` and ``secret_key`` (TLS Sig API v2,
:mod:`adapters.feeds.usersig`), valid ``usersig_ttl`` and regenerated before its last tenth. Requests
of every feed on one SDKAppID share the API's 200 queries/s through a GCRA limit in Redis.

HTTP is 200 unless the network fails; ``ErrorCode`` says what happened: 10002 (internal error) and
the common rate/timeout codes are retried with back-off; 70001 (UserSig expired) regenerates it and
retries at once; 10003, 10004, 10007, 10010, 10015 and the common account/signature codes stop the
feed with a message saying what to check.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any, Literal

import aiohttp

from bridge.config import Rate, Secret
from bridge.envelope import Conversation, Sender
from bridge.poller import Feed, FeedItem, FeedOptions, Page, PermanentFeedError, TransientFeedError, read_body
from bridge.ratelimit import Limit, Limiter

from .usersig import gen_usersig

PATH = "/v4/official_account_open_http_svc/official_account_msg_get_simple"
REGIONS = {
    "china": "https://console.tim.qq.com",
    "singapore": "https://adminapisgp.im.qcloud.com",
    "seoul": "https://adminapikr.im.qcloud.com",
    "frankfurt": "https://adminapiger.im.qcloud.com",
    "silicon_valley": "https://adminapiusa.im.qcloud.com",
    "jakarta": "https://adminapiidn.im.qcloud.com",
}

#: ErrorCode → what to fix (the feed stops)
PERMANENT = {
    10003: "illegal request command word: check base_url (the API path is fixed)",
    10004: "invalid parameter: check official_account",
    10007: "insufficient permissions: identifier must be an app admin with rights on this official account",
    10010: "the official account does not exist (or was dissolved): check official_account",
    10015: "invalid official account id: check official_account (it looks like @TOA#_...)",
    60004: "the account or UserSig in the URL is wrong: check identifier and secret_key",
    60006: "the SDKAppID is disabled: check the Chat console",
    60010: "the request must come from an app admin: check identifier",
    70003: "the UserSig is invalid: check secret_key and sdkappid",
    70005: "the UserSig could not be decoded: check secret_key and sdkappid",
    70009: "the UserSig does not verify: check that secret_key belongs to sdkappid",
    70013: "the UserSig's identifier does not match: check identifier",
    70014: "the UserSig's sdkappid does not match: check sdkappid",
    70016: "no key for this SDKAppID: check sdkappid and secret_key",
    70107: "the identifier does not exist: check identifier",
}
#: ErrorCode → retried with back-off (10002 internal error; rate limit, timeouts)
TRANSIENT = {10002, 60007, 60008, 60011, 70169}
SIG_EXPIRED = 70001
#: the API returns at most this many messages a request
PAGE_MAX = 20


class TencentIMOAOptions(FeedOptions, kw_only=True):
    sdkappid: int
    secret_key: Secret
    official_account: str
    #: an app admin account
    identifier: str = "administrator"
    #: the SDKAppID's region (its dedicated domain); ``base_url`` overrides it
    region: Literal["china", "singapore", "seoul", "frankfurt", "silicon_valley", "jakarta"] = "china"
    base_url: str = ""
    page_size: int = PAGE_MAX
    with_recalled: bool = False
    #: seconds a generated UserSig is valid (regenerated before its last tenth)
    usersig_ttl: int = 86_400
    #: the API's limit, shared by every feed and instance on this SDKAppID
    max_qps: float = 200.0

    def __post_init__(self) -> None:
        if not self.base_url:
            self.base_url = REGIONS[self.region]

    def check(self) -> None:
        super().check()
        if self.sdkappid <= 0:
            raise ValueError("sdkappid: the Chat console's SDKAppID, a positive number")
        if not self.secret_key:
            raise ValueError("secret_key: required (or secret_key_file)")
        if not self.official_account.strip():
            raise ValueError("official_account: required (the official account user id, @TOA#_...)")
        if not self.identifier.strip():
            raise ValueError("identifier: required (an app admin account)")
        if not 1 <= self.page_size <= PAGE_MAX:
            raise ValueError(f"page_size: must be between 1 and {PAGE_MAX}")
        if self.usersig_ttl < 60:
            raise ValueError("usersig_ttl: at least 60 seconds")
        if self.max_qps <= 0:
            raise ValueError("max_qps: must be more than 0")


_ELEM_TEXT = {
    "TIMImageElem": "[image]",
    "TIMSoundElem": "[voice]",
    "TIMVideoFileElem": "[video]",
    "TIMFileElem": "[file]",
    "TIMLocationElem": "[location]",
    "TIMFaceElem": "[sticker]",
}


def body_text(body: Any) -> str:
    """A message's MsgBody as text: text elements as they are, others as short placeholders."""
    elems = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
    parts: list[str] = []
    for e in elems:
        if not isinstance(e, dict):
            continue
        kind, content = e.get("MsgType"), e.get("MsgContent")
        content = content if isinstance(content, dict) else {}
        if kind == "TIMTextElem" and isinstance(content.get("Text"), str):
            parts.append(content["Text"])
        elif kind == "TIMCustomElem":
            desc = content.get("Desc")
            parts.append(f"[custom: {desc}]" if isinstance(desc, str) and desc else "[custom]")
        elif isinstance(kind, str):
            parts.append(_ELEM_TEXT.get(kind, f"[{kind}]"))
    return " ".join(parts)


class TencentIMOAFeed(Feed):
    """Cursor: ``{"seq": n}``, the highest MsgSeq published (absent: the first sync)."""

    Options = TencentIMOAOptions
    options: TencentIMOAOptions

    def __init__(self, name: str, options: Any, ctx: Any) -> None:
        super().__init__(name, options, ctx)
        self._sig: tuple[str, float] | None = None  # (usersig, regenerate after)
        self._limiter = Limiter(ctx.redis)
        self._limit = Limit(
            ctx.state_key("tencent_im", f"{options.sdkappid}:rl"), Rate(options.max_qps, 1.0), burst=1
        )

    def describe(self, cursor: str | None) -> str:
        return f"MsgSeq {json.loads(cursor)['seq']}" if cursor else "first sync not started"

    def usersig(self, *, fresh: bool = False) -> str:
        now = time.time()
        if fresh or self._sig is None or now >= self._sig[1]:
            ttl = self.options.usersig_ttl
            sig = gen_usersig(
                self.options.sdkappid, self.options.secret_key.reveal(), self.options.identifier, ttl
            )
            self._sig = (sig, now + ttl * 0.9)
        return self._sig[0]

    async def fetch(self, cursor: str | None) -> Page:
        last = int(json.loads(cursor)["seq"]) if cursor else 0
        new: dict[int, dict[str, Any]] = {}
        key: str | None = None
        for _ in range(self.options.max_pages):
            resp = await self._call(key)
            msgs = resp.get("RspMsgList") or []
            if not isinstance(msgs, list):
                raise PermanentFeedError(
                    f"tencent_im_oa: RspMsgList is a JSON {type(msgs).__name__}, not a list"
                )
            seqs = []
            for m in msgs:
                if not isinstance(m, dict) or not isinstance(m.get("MsgSeq"), int):
                    raise PermanentFeedError("tencent_im_oa: a message without an integer MsgSeq")
                seqs.append(m["MsgSeq"])
                if m["MsgSeq"] > last:
                    new[m["MsgSeq"]] = m
            next_key = resp.get("LastMsgKey")
            if (
                not msgs
                or min(seqs) <= last + 1
                or resp.get("IsFinished") == 2
                or min(seqs) <= 1
                or not isinstance(next_key, str)
                or not next_key
                or next_key == key
            ):
                break
            key = next_key
        else:
            raise TransientFeedError(
                f"tencent_im_oa: more than max_pages ({self.options.max_pages}) pages back"
            )
        items = [it for s in sorted(new) if (it := self._item(new[s])) is not None]
        top = max(new, default=last)
        return Page(items, json.dumps({"seq": top}) if top > last or cursor is None else None, more=False)

    def _item(self, m: dict[str, Any]) -> FeedItem | None:
        place = m.get("IsPlaceMsg", 0)
        if place == 1 or (place == 2 and not self.options.with_recalled):
            return None
        account = self.options.official_account
        sender = m.get("From_Account")
        ts = m.get("MsgTimeStamp")
        return FeedItem(
            id=str(m.get("MsgKey") or f"seq:{m['MsgSeq']}"),
            conversation=Conversation(account, "direct", account),
            text="" if place == 2 else body_text(m.get("MsgBody")),
            raw=m,
            created_at=float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None,
            sender=Sender(str(sender)) if sender else None,
            kind="event" if place == 2 else "message",
            event="recalled" if place == 2 else None,
        )

    async def _take_rate(self) -> None:
        """Wait for a slot of the SDKAppID's queries per second (shared through Redis)."""
        for _ in range(1000):
            wait = await self._limiter.acquire([self._limit])
            if wait <= 0:
                return
            await asyncio.sleep(wait)
        raise TransientFeedError("tencent_im_oa: no request slot under max_qps")

    async def _call(self, last_key: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"Official_Account": self.options.official_account,
                                "ReqMsgNumber": self.options.page_size}  # fmt: skip
        if last_key:
            body["LastMsgKey"] = last_key
        if self.options.with_recalled:
            body["WithRecalledMsg"] = 1
        for attempt in (1, 2):
            await self._take_rate()
            params = {
                "sdkappid": str(self.options.sdkappid),
                "identifier": self.options.identifier,
                "usersig": self.usersig(fresh=attempt == 2),
                "random": str(random.randint(0, 4294967295)),
                "contenttype": "json",
            }
            url = self.options.base_url.rstrip("/") + PATH
            timeout = aiohttp.ClientTimeout(total=self.options.timeout)
            async with self.ctx.http().post(url, params=params, json=body, timeout=timeout) as r:
                data = await read_body(r, self.options.max_response)
                if r.status != 200:
                    raise TransientFeedError(f"tencent_im_oa: HTTP {r.status}")
            try:
                resp = json.loads(data)
            except ValueError:
                raise TransientFeedError("tencent_im_oa: the answer is not JSON") from None
            if not isinstance(resp, dict):
                raise PermanentFeedError(f"tencent_im_oa: the answer is a JSON {type(resp).__name__}")
            code = resp.get("ErrorCode", 0)
            if code == 0 and resp.get("ActionStatus", "OK") == "OK":
                return resp
            info = str(resp.get("ErrorInfo", ""))[:200]
            if code == SIG_EXPIRED and attempt == 1:
                continue  # a new UserSig, at once
            if code in PERMANENT:
                raise PermanentFeedError(f"tencent_im_oa: ErrorCode {code}: {PERMANENT[code]} ({info})")
            if code in TRANSIENT or code == SIG_EXPIRED:
                raise TransientFeedError(f"tencent_im_oa: ErrorCode {code}: {info}")
            raise TransientFeedError(f"tencent_im_oa: ErrorCode {code} (not documented for this API): {info}")
        raise AssertionError("unreachable")
