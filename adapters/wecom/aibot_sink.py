"""``wecom_aibot`` (outbound): an answer routed back to a WeCom AI-bot conversation reaches the user.

An AI bot in API mode cannot post on its own; it answers the message that reached it, in two ways:

1. **The stream** the inbound opened when it acknowledged the message. This sink stores the final
   answer as the origin message's draft (``ctx.set_draft(origin, text, final=True)``); WeCom's next
   stream refresh gets it with ``finish=true``, and the inbound marks the state ``final_by=stream``.
   The sink waits for that mark until the stream window closes.
2. **response_url** (once, within an hour): when the window has closed (a slow answer, or WeCom
   stopped polling), the sink claims ``final_by=response_url`` and POSTs the answer as markdown.

``final_by`` is set once (HSETNX) by whichever side comes first, so the answer is shown once.
Both channels take at most 20480 UTF-8 bytes; a longer answer goes in two parts (the stream, then
response_url), cut on character boundaries; one that does not fit in two is refused whole, never
truncated. An answer that cannot go back this way (too long, or the stream window and response_url
both closed) raises ``NoWayBack``: with ``fallback = "<outbound>"`` on this outbound (e.g. the WeCom
app, ``fallback_conversation = "user:{sender}"``) the runner relays it there to the member who
asked, else it is a dead letter that says why (bridge/fallback.py).

Only replies go here (``reply_via`` of a ``wecom_aibot`` inbound): the delivery's envelope is the
reply, ``origin.envelope_id`` the message it answers.

Config::

    [[outbound]]
    name = "aibot_reply"
    type = "wecom_aibot"
    # timeout = 10          # seconds for the response_url POST
    # poll_interval = 0.2   # seconds between looks at whether WeCom fetched the final stream
    # fallback = "wecom"    # answers the AI bot cannot carry go through the WeCom app instead
    # fallback_conversation = "user:{sender}"
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec

from adapters.wecom.aibot import CONTENT_MAX_BYTES
from adapters.wecom.aibot_state import ADAPTER, RESPONSE_URL_TTL, TTL, FinalBy, StreamState
from bridge.adapter import SendContext, Sink
from bridge.envelope import Delivery
from bridge.errors import NoWayBack, PermanentError, RetryableError
from bridge.text import split_text

#: a response_url is not used this close to its expiry
_RESPONSE_URL_MARGIN = 30


class WeComAIBotSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    timeout: float = 10.0
    poll_interval: float = 0.2

    def check(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        if not 0.01 <= self.poll_interval <= 5:
            raise ValueError("poll_interval: must be between 0.01 and 5 seconds")


class WeComAIBotSink(Sink):
    Options = WeComAIBotSinkOptions
    options: WeComAIBotSinkOptions

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        env = delivery.envelope
        if env.kind != "reply" or env.origin is None:
            raise PermanentError(
                "a wecom_aibot outbound only answers messages of a wecom_aibot inbound: "
                "name it in that inbound's reply_via instead of routing messages to it"
            )
        origin = env.origin.envelope_id
        state = StreamState(self.ctx.redis, self.ctx.state_key(ADAPTER, origin))
        if not await state.exists():
            raise PermanentError(
                "no AI-bot state for the message this answers: it is older than "
                f"{TTL // 3600} h, or it did not come from a wecom_aibot inbound"
            )
        parts = (
            split_text(env.text, CONTENT_MAX_BYTES, number_parts=False, markdown=True) if env.text else [""]
        )
        if len(parts) > 2:
            size = len(env.text.encode())
            raise NoWayBack(
                f"the answer is {size} UTF-8 bytes: an AI bot shows at most 2 x {CONTENT_MAX_BYTES} "
                "(stream + response_url); set this outbound's fallback to send long answers another way"
            )
        done = await ctx.parts_sent()
        if done == 0:
            via = await self._first(origin, state, parts[0])
            await ctx.part_sent(1)
            self.log.info("wecom_aibot.answered", envelope=origin, via=via, parts=len(parts))
            done = 1
        if done < len(parts):
            if await state.final_by() is not FinalBy.STREAM:
                raise NoWayBack(
                    "part 2 of 2 of the answer was not delivered: the stream window had closed, "
                    "so response_url carried part 1",
                    text=parts[1],
                )
            await self._post(state, parts[1])
            await ctx.part_sent(2)
            self.log.info("wecom_aibot.answered", envelope=origin, via="response_url", part=2)
        return f"aibot:{origin}"

    async def _first(self, origin: str, state: StreamState, text: str) -> str:
        """Deliver the first (often only) part: the stream if WeCom fetches it in time, else
        response_url. Returns which one."""
        now = await state.read()
        owner = now.final_by if now is not None else None
        deadline = now.deadline if now is not None else 0.0
        if owner is None and deadline > time.time():
            await self.ctx.set_draft(origin, text, final=True, ttl=TTL)
            while owner is None and (left := deadline - time.time()) > 0:
                await asyncio.sleep(min(self.options.poll_interval, left))
                owner = await state.final_by()
        if owner is None:
            claimed = await state.claim_final(FinalBy.RESPONSE_URL)
            owner = FinalBy.RESPONSE_URL if claimed else await state.final_by()
        if owner is FinalBy.STREAM:
            return "stream"
        await self._post(state, text)
        return "response_url"

    async def _post(self, state: StreamState, text: str) -> None:
        """POST markdown to the message's response_url (usable once, for an hour)."""
        now = await state.read()
        if now is not None and now.response_url_used:
            return  # a previous attempt posted it and stopped before recording the part
        url = now.response_url if now is not None else ""
        if not url or now is None:
            raise NoWayBack("the stream window closed and the message carries no response_url")
        if time.time() > now.arrived_at + RESPONSE_URL_TTL - _RESPONSE_URL_MARGIN:
            raise NoWayBack(f"the message's response_url expired (valid {RESPONSE_URL_TTL // 60} min)")
        body = {"msgtype": "markdown", "markdown": {"content": text}}
        await self.ctx.egress.check(url)  # the URL came in the callback: WeCom's hosts only
        try:
            async with self.ctx.http().post(
                url,
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.options.timeout),
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"cannot reach response_url: {type(e).__name__}") from None
        if status == 429 or status >= 500:
            raise RetryableError(f"response_url answered HTTP {status}")
        if not 200 <= status < 300:
            raise PermanentError(f"response_url answered HTTP {status}")
        try:
            answer = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            answer = None
        errcode = answer.get("errcode", 0) if isinstance(answer, dict) else 0
        if errcode == -1:
            raise RetryableError("response_url: errcode -1 (busy)")
        if errcode != 0:
            errmsg = str(answer.get("errmsg", ""))[:200] if isinstance(answer, dict) else ""
            raise PermanentError(f"response_url refused the answer: errcode {errcode} {errmsg}".rstrip())
        await state.mark_response_url_used()
