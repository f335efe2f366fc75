"""A local stand-in for WeCom's AI-bot long-connection server, following
../shared/notes/wecom-aibot-ws.md (§11 is its checklist) to the letter.

* ``aibot_subscribe``: errcode 0 for the right secret, ``853000 invalid bot_id or secret`` otherwise
  (the socket stays open, as measured). A second subscription of the same bot sends the older
  connection an ``aibot_event_callback`` with ``disconnected_event`` and closes it after
  ``kick_close_delay`` seconds.
* ``ping`` is acked, unless the connection was told to stop answering (:meth:`mute`).
* Callbacks are pushed with fresh ``req_id``\\ s (:meth:`push_message`, :meth:`push_event`).
* Every reply frame is acked with the reply's ``req_id`` byte for byte; ``846605 invalid req_id`` for
  ``aibot_respond_msg`` on an event's ``req_id`` or one from another (older) connection, and for a
  welcome/update on anything but the right event's ``req_id``; ``846608 stream message update
  expired`` for stream frames after ``stream_expiry`` seconds; welcome and update after
  ``event_window`` (5 s) are refused with 846608 too (the note gives no code for that: assumed);
  ``846609 aibot websocket not subscribed`` for anything on a connection whose subscription was
  lost (:meth:`lose_subscription`) or that never subscribed.
* :meth:`close_after` closes a connection after it acked n more reply frames (a server that closes
  mid-stream).

What the user sees is derived from the frames: :meth:`bubbles` gives, per chat, the final content of
each stream and each proactive message, in order.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

ERRMSG = {
    0: "ok",
    853000: "invalid bot_id or secret",
    846605: "invalid req_id",
    846608: "stream message update expired",
    846609: "aibot websocket not subscribed",
}


@dataclass
class Conn:
    ws: web.WebSocketResponse
    n: int
    bot_id: str = ""
    subscribed: bool = False
    muted: bool = False
    close_after: int | None = None
    closed: bool = False
    kicked: bool = False
    #: req_id → (kind "message"/"event", eventtype, chat, time pushed)
    inbound: dict[str, tuple[str, str, str, float]] = field(default_factory=dict)


@dataclass
class Frame:
    conn: int
    cmd: str
    req_id: str
    body: dict[str, Any]
    errcode: int
    at: float


class FakeAIBotServer:
    def __init__(self, bots: dict[str, str] | None = None) -> None:
        self.bots = dict(bots or {"bot1": "secret-1"})
        self.conns: list[Conn] = []
        self.frames: list[Frame] = []
        self.stream_expiry = 360.0
        self.event_window = 5.0
        self.kick_close_delay = 0.05
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._changed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/", self._ws)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        for c in self.conns:
            if not c.closed:
                await c.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- views and controls for tests ---------------------------------------------------------------

    def live(self, bot_id: str = "bot1") -> Conn | None:
        """The connection currently subscribed for a bot."""
        for c in reversed(self.conns):
            if c.bot_id == bot_id and c.subscribed and not c.closed and not c.kicked:
                return c
        return None

    def subscriptions(self, bot_id: str = "bot1") -> int:
        """How many connections ever subscribed this bot successfully."""
        return sum(1 for c in self.conns if c.bot_id == bot_id)

    def mute(self, conn: Conn) -> None:
        conn.muted = True

    def lose_subscription(self, conn: Conn) -> None:
        conn.subscribed = False

    def close_after(self, conn: Conn, frames: int) -> None:
        conn.close_after = frames

    async def drop(self, conn: Conn) -> None:
        conn.closed = True
        await conn.ws.close()

    def replies(self, cmd: str | None = None, ok: bool = True) -> list[Frame]:
        return [
            f for f in self.frames if f.cmd not in ("ping", "aibot_subscribe") and (cmd is None or f.cmd == cmd)
            and (f.errcode == 0 or not ok)
        ]  # fmt: skip

    def stream_frames(self, req_id: str) -> list[dict[str, Any]]:
        """The accepted stream bodies sent for one message callback, in order."""
        return [
            f.body["stream"]
            for f in self.frames
            if f.cmd == "aibot_respond_msg" and f.req_id == req_id and f.errcode == 0 and "stream" in f.body
        ]

    def sent(self, chat: str | None = None) -> list[dict[str, Any]]:
        """Accepted proactive messages (aibot_send_msg bodies)."""
        return [
            f.body
            for f in self.frames
            if f.cmd == "aibot_send_msg" and f.errcode == 0 and (chat is None or f.body.get("chatid") == chat)
        ]

    def answers(self, req_id: str, chat: str) -> list[str]:
        """What the user sees as the answer(s) to one message: finished streams on its req_id and
        proactive markdown messages to its chat."""
        out = [s.get("content", "") for s in self.stream_frames(req_id) if s.get("finish")]
        out += [
            b.get("markdown", {}).get("content", "")
            for b in self.sent(chat)
            if b.get("msgtype") == "markdown"
        ]
        return out

    async def push_message(
        self, text: str, *, user: str = "alice", chat: str | None = None, msgid: str | None = None,
        bot_id: str = "bot1", conn: Conn | None = None, **extra: Any,
    ) -> str:  # fmt: skip
        """Send a text message callback to the bot's live connection; returns its req_id."""
        body: dict[str, Any] = {
            "msgid": msgid or secrets.token_hex(12),
            "aibotid": bot_id,
            "chattype": "group" if chat else "single",
            "from": {"userid": user},
            "create_time": int(time.time()),
            "msgtype": "text",
            "text": {"content": text},
            **extra,
        }
        if chat:
            body["chatid"] = chat
        return await self._push("aibot_msg_callback", body, "message", "", chat or user, bot_id, conn)

    async def push_event(
        self, eventtype: str, *, user: str = "alice", payload: dict[str, Any] | None = None,
        msgid: str | None = None, bot_id: str = "bot1", conn: Conn | None = None,
    ) -> str:  # fmt: skip
        event: dict[str, Any] = {"eventtype": eventtype}
        if payload is not None:
            event[eventtype] = payload
        body = {
            "msgid": msgid or secrets.token_hex(12),
            "create_time": int(time.time()),
            "aibotid": bot_id,
            "chattype": "single",
            "from": {"userid": user},
            "msgtype": "event",
            "event": event,
        }
        return await self._push("aibot_event_callback", body, "event", eventtype, user, bot_id, conn)

    async def _push(
        self,
        cmd: str,
        body: dict[str, Any],
        kind: str,
        eventtype: str,
        chat: str,
        bot_id: str,
        conn: Conn | None,
    ) -> str:
        c = conn or self.live(bot_id)
        assert c is not None, "no live connection for the bot"
        req_id = secrets.token_hex(16)
        c.inbound[req_id] = (kind, eventtype, chat, time.time())
        await c.ws.send_str(json.dumps({"cmd": cmd, "headers": {"req_id": req_id}, "body": body}))
        return req_id

    # -- the server ---------------------------------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Conn(ws, len(self.conns) + 1)
        self.conns.append(conn)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(frame, dict):
                    await self._on_frame(conn, frame)
        finally:
            conn.closed = True
        return ws

    async def _ack(self, conn: Conn, cmd: str, req_id: str, body: dict[str, Any], errcode: int) -> None:
        self.frames.append(Frame(conn.n, cmd, req_id, body, errcode, time.time()))
        if conn.closed:
            return
        await conn.ws.send_str(
            json.dumps(
                {"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": ERRMSG.get(errcode, "error")}
            )
        )

    async def _on_frame(self, conn: Conn, frame: dict[str, Any]) -> None:
        cmd = str(frame.get("cmd", ""))
        headers = frame.get("headers") or {}
        req_id = str(headers.get("req_id", ""))
        body = frame.get("body") or {}
        if cmd == "aibot_subscribe":
            bot_id = str(body.get("bot_id", ""))
            if self.bots.get(bot_id) != body.get("secret"):
                await self._ack(conn, cmd, req_id, {"bot_id": bot_id}, 853000)
                return
            for old in self.conns:
                if (
                    old is not conn
                    and old.bot_id == bot_id
                    and old.subscribed
                    and not old.closed
                    and not old.kicked
                ):
                    old.kicked = True
                    asyncio.get_running_loop().create_task(self._kick(old, bot_id))
            conn.bot_id = bot_id
            conn.subscribed = True
            await self._ack(conn, cmd, req_id, {"bot_id": bot_id}, 0)
            return
        if cmd == "ping":
            if not conn.muted:
                await self._ack(conn, cmd, req_id, {}, 0)
            return
        await self._ack(conn, cmd, req_id, body, self._check(conn, cmd, req_id, body))
        if conn.close_after is not None:
            conn.close_after -= 1
            if conn.close_after <= 0:
                conn.closed = True
                await conn.ws.close()

    def _check(self, conn: Conn, cmd: str, req_id: str, body: dict[str, Any]) -> int:
        if not conn.subscribed or conn.kicked:
            return 846609
        if cmd == "aibot_send_msg":
            return 0
        known = conn.inbound.get(req_id)
        if cmd == "aibot_respond_msg":
            if known is None or known[0] != "message":
                return 846605
            if time.time() - known[3] > self.stream_expiry:
                return 846608
            return 0
        if cmd in ("aibot_respond_welcome_msg", "aibot_respond_update_msg"):
            want = "enter_chat" if cmd == "aibot_respond_welcome_msg" else "template_card_event"
            if known is None or known[1] != want:
                return 846605
            if time.time() - known[3] > self.event_window:
                return 846608
            return 0
        return 846605

    async def _kick(self, old: Conn, bot_id: str) -> None:
        event = {
            "cmd": "aibot_event_callback",
            "headers": {"req_id": secrets.token_hex(16)},
            "body": {
                "msgid": secrets.token_hex(12),
                "create_time": int(time.time()),
                "aibotid": bot_id,
                "msgtype": "event",
                "event": {"eventtype": "disconnected_event"},
            },
        }
        try:
            await old.ws.send_str(json.dumps(event))
            await asyncio.sleep(self.kick_close_delay)
        finally:
            old.closed = True
            await old.ws.close()
