"""``wecom_aibot_ws``: a WeCom AI bot (智能机器人) over its long connection — no public URL needed.

The bot opens a WebSocket to WeCom (``wss://openws.work.weixin.qq.com``), subscribes with its Bot ID
and Secret, and receives message and event callbacks on it (facts: ../shared/notes/wecom-aibot-ws.md).
Callbacks become envelopes exactly as in the HTTP mode (:func:`adapters.wecom.aibot.aibot_envelope`,
same shape, same dedupe on ``msgid``); answers go out on the socket through the ``wecom_aibot_ws``
outbound (adapters/wecom/aibot_ws_sink.py).

**One socket per bot across all instances.** WeCom allows one live connection per bot and kicks
the older one. Every instance runs this source, but only the holder of the lease
``held:wecom_aibot_ws:<bot_id>`` (:class:`bridge.held.HeldConnection`) connects; the others stand
by and relay their sends to it. A dead holder's lease is taken over within ``lease_ttl +
lease_retry`` seconds (default 13 s) and the new holder connects. A holder that loses its lease
closes its socket at once. When WeCom sends ``disconnected_event`` (another client subscribed this
bot) while we still hold the lease, the holder records that in Redis (``…:kicked``), closes the
socket and releases the lease, and **no instance connects again** until a daemon restarts (start-up
clears the mark) — readiness says so on every instance. That makes the kick loop impossible: every
reconnection after a kick needs a person. A ``disconnected_event`` that reaches a holder which has
already lost its lease (the next holder subscribed) is expected and only closes that socket.
When the holder cannot connect or subscribe (853000: wrong Bot ID or Secret), every instance's
readiness says why (``…:failure`` in Redis, cleared by the next subscription).

**Dead-but-open sockets.** A ping every ``heartbeat_interval`` s; ``missed_acks`` unanswered pings
in a row, no frame at all for ``silence_timeout`` s, or an ``846609 not subscribed`` answer close
the socket, and the holder reconnects with exponential back-off and jitter (``reconnect_base`` …
``reconnect_max``). Frames are matched to requests by ``req_id``; frames of one ``req_id`` go one
at a time, each waiting for its ack (``ack_timeout``), as the SDK does.

**Replies.** On a message the holder sends a placeholder stream frame (``placeholder``, default
``<think></think>``, WeCom's "thinking" animation; empty = off), then follows the message's draft
(what a streaming sink such as ``openclaw`` writes as the answer grows) every ``draft_poll`` s with
cumulative frames, and the final answer finishes the stream. An answer longer than one stream
(20480 UTF-8 bytes) continues in further finished streams on the same ``req_id``, never cut. A
reply whose ``req_id`` died with an older socket (a reconnect, a new holder), or whose stream
expired (``stream_window``, ``846605``/``846608``), goes as a proactive ``aibot_send_msg`` markdown
message to the same chat instead of being lost.

Per callback the holder keeps ``state_key("wecom_aibot_ws", <envelope id>)``: the callback's
``req_id``, the socket it came on, when, the chat, the event. Written before the publish.

**Welcome.** ``welcome = "text"`` answers ``enter_chat`` at once with that text. Without it the event
is published like any other (kind ``event``, ``event = "enter_chat"``) and a route with ``kinds =
["event"]`` can send it to an agent; its reply is sent as the welcome when it comes within
``welcome_window`` s (WeCom allows 5), else as a proactive message.

**Template cards.** A reply or delivery whose envelope carries ``meta.template_card`` (the card's
JSON) sends the card; a click comes back as an event envelope with ``event =
"template_card_event"``, the button's key as text and ``meta.event_key``/``task_id``; a reply
carrying a card to that event updates the card (``aibot_respond_update_msg``) within the window.

Config::

    [[inbound]]
    name = "aibot_ws"
    type = "wecom_aibot_ws"
    bot_id = "${AIBOT_BOT_ID}"
    secret = "${AIBOT_SECRET}"           # or secret_file = "/run/secrets/aibot"
    reply_via = "aibot_ws_out"           # an outbound of type wecom_aibot_ws naming this inbound
    # url = "wss://openws.work.weixin.qq.com"   # private deployments: the console's URL
    # placeholder = "<think></think>"    # first frame while the agent works; "" = none
    # welcome = ""                       # static answer to enter_chat
    # welcome_window = 4.5               # a routed welcome later than this goes as a message
    # stream_window = 330                # seconds after the message a stream may still be updated
    # draft_poll = 0.3                   # seconds between looks at the answer being written
    # heartbeat_interval = 30
    # missed_acks = 2                    # unanswered pings in a row before the socket is dropped
    # silence_timeout = 0                # seconds without any frame (0 = 2.5 x heartbeat_interval)
    # ack_timeout = 5
    # connect_timeout = 10
    # reconnect_base = 1                 # back-off doubles from here, with jitter ...
    # reconnect_max = 30                 # ... up to here
    # lease_ttl = 10                     # a dead holder is replaced within lease_ttl + lease_retry
    # lease_retry = 3
    # dedupe_ttl = 86400
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from adapters.wechat.parsing import CallbackRefused
from adapters.wecom.aibot import CONTENT_MAX_BYTES, aibot_envelope, fit
from bridge.adapter import Context, Source
from bridge.bus import UNAVAILABLE
from bridge.config import Secret
from bridge.errors import PermanentError, RetryableError
from bridge.held import HeldConnection

DEFAULT_URL = "wss://openws.work.weixin.qq.com"
STATE_ADAPTER = "wecom_aibot_ws"
STATE_TTL = 7200
#: WeCom answers a welcome or a card update only within this many seconds of the event
EVENT_WINDOW = 5.0
#: WeCom stops accepting stream updates this long after the user's message (846608)
STREAM_MAX_WINDOW = 360

ERR_AUTH = 853000
ERR_REQ_ID = 846605
ERR_EXPIRED = 846608
ERR_NOT_SUBSCRIBED = 846609
ERR_CONFLICT = 6000
ERR_CHATID = 93006
#: answered "try again" by other clients (HERMES); meaning unknown
_TRANSIENT = {846601, 846602}

_CTRL = re.compile("[\x00-\x08\x0b-\x0d\x0e-\x1f]")
CALLBACKS = ("aibot_msg_callback", "aibot_event_callback")

#: the sources of this process by (context, inbound name): the outbound finds its inbound's socket
_LIVE: dict[tuple[int, str], WeComAIBotWSSource] = {}


def live_source(ctx: Context, inbound: str) -> WeComAIBotWSSource | None:
    return _LIVE.get((id(ctx), inbound))


class WeComAIBotWSOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bot_id: str
    secret: Secret
    url: str = DEFAULT_URL
    placeholder: str = "<think></think>"
    welcome: str = ""
    welcome_window: float = 4.5
    stream_window: float = 330.0
    draft_poll: float = 0.3
    heartbeat_interval: float = 30.0
    missed_acks: int = 2
    silence_timeout: float = 0.0
    ack_timeout: float = 5.0
    connect_timeout: float = 10.0
    reconnect_base: float = 1.0
    reconnect_max: float = 30.0
    lease_ttl: float = 10.0
    lease_retry: float = 3.0
    dedupe_ttl: int = 86_400

    def check(self) -> None:
        if not self.bot_id.strip():
            raise ValueError("bot_id: must not be empty")
        if not self.secret.reveal():
            raise ValueError("secret: must not be empty (or give secret_file)")
        if not self.url.startswith(("wss://", "ws://")):
            raise ValueError("url: must start with wss:// (or ws:// for a local test server)")
        if len(self.placeholder.encode()) > CONTENT_MAX_BYTES:
            raise ValueError(f"placeholder: at most {CONTENT_MAX_BYTES} UTF-8 bytes")
        if len(self.welcome.encode()) > CONTENT_MAX_BYTES:
            raise ValueError(f"welcome: at most {CONTENT_MAX_BYTES} UTF-8 bytes")
        if not 0 < self.welcome_window <= EVENT_WINDOW:
            raise ValueError(f"welcome_window: must be more than 0 and at most {EVENT_WINDOW:g} seconds")
        if not 0 < self.stream_window <= STREAM_MAX_WINDOW:
            raise ValueError(f"stream_window: must be more than 0 and at most {STREAM_MAX_WINDOW} seconds")
        for key in ("draft_poll", "heartbeat_interval", "ack_timeout", "connect_timeout", "reconnect_base"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")
        if self.missed_acks < 1:
            raise ValueError("missed_acks: must be at least 1")
        if self.silence_timeout < 0:
            raise ValueError("silence_timeout: must be 0 (2.5 x heartbeat_interval) or positive")
        if self.reconnect_max < self.reconnect_base:
            raise ValueError("reconnect_max: must be at least reconnect_base")
        if self.lease_ttl <= 0.3:
            raise ValueError("lease_ttl: must be more than 0.3 seconds")
        if not 0 < self.lease_retry <= self.lease_ttl:
            raise ValueError("lease_retry: must be positive and at most lease_ttl")
        if self.dedupe_ttl < 1:
            raise ValueError("dedupe_ttl: must be at least 1 second")

    @property
    def silence(self) -> float:
        return self.silence_timeout or 2.5 * self.heartbeat_interval


class WsError(Exception):
    """A non-zero errcode in an ack."""

    def __init__(self, cmd: str, errcode: int, errmsg: str) -> None:
        super().__init__(f"{cmd}: errcode {errcode} {errmsg}".rstrip())
        self.errcode = errcode
        self.errmsg = errmsg


class SocketGone(Exception):
    """The socket closed (or was dropped) before the ack came."""


def new_req_id(prefix: str) -> str:
    """``<prefix>_<ms>_<8 hex>``, the SDK's form (it routes acks by prefix)."""
    return f"{prefix}_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


def parse_frame(data: str) -> dict[str, Any] | None:
    """A JSON text frame (control characters stripped first, as the SDK does), or None."""
    try:
        frame = json.loads(_CTRL.sub("", data), strict=False)  # a raw tab or newline in a string is kept
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


def _req_id(frame: dict[str, Any]) -> str:
    headers = frame.get("headers")
    v = headers.get("req_id") if isinstance(headers, dict) else None
    return v if isinstance(v, str) else ""


def stream_body(stream_id: str, content: str, finish: bool) -> dict[str, Any]:
    return {"msgtype": "stream", "stream": {"id": stream_id, "finish": finish, "content": fit(content)}}


class Socket:
    """One subscribed WebSocket: requests matched to acks by ``req_id``, callbacks handed on."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        on_callback: Callable[[Socket, dict[str, Any]], None],
        ack_timeout: float,
        log: Any,
    ) -> None:
        self.ws = ws
        self.id = uuid.uuid4().hex[:12]
        self.on_callback = on_callback
        self.ack_timeout = ack_timeout
        self.log = log
        self.last_rx = time.monotonic()
        self.dead = asyncio.Event()
        self.why = ""
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def drop(self, why: str) -> None:
        """Stop using this socket (the reader closes it)."""
        if not self.dead.is_set():
            self.why = why
            self.dead.set()
            self.log.info("wecom_aibot_ws.socket_dropped", socket=self.id, why=why)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SocketGone(why))
        self._pending.clear()

    async def read(self) -> None:
        """Read frames until the socket closes or is dropped."""
        closer = asyncio.create_task(self.dead.wait())
        try:
            while not self.dead.is_set():
                recv = asyncio.create_task(self.ws.receive())
                await asyncio.wait([recv, closer], return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():
                    recv.cancel()
                    break
                msg = recv.result()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._frame(msg.data)
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    self.drop("closed by the server")
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self.drop(f"socket error: {type(self.ws.exception()).__name__}")
                else:  # binary frames are not part of the protocol
                    self.last_rx = time.monotonic()
        finally:
            closer.cancel()
            self.drop(self.why or "reader stopped")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2.0)

    def _frame(self, data: str) -> None:
        self.last_rx = time.monotonic()
        frame = parse_frame(data)
        if frame is None:
            self.log.warning("wecom_aibot_ws.bad_frame", size=len(data))
            return
        cmd = frame.get("cmd")
        if cmd in CALLBACKS:
            self.on_callback(self, frame)
            return
        fut = self._pending.pop(_req_id(frame), None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        elif cmd:
            self.log.info("wecom_aibot_ws.unknown_cmd", cmd=str(cmd)[:64])
        if frame.get("errcode") == ERR_NOT_SUBSCRIBED:
            self.drop("846609 websocket not subscribed")

    async def request(
        self,
        cmd: str,
        body: dict[str, Any] | None,
        req_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a frame and wait for its ack; frames of one ``req_id`` go one at a time.

        Raises WsError (non-zero errcode), SocketGone, TimeoutError (no ack)."""
        req_id = req_id or new_req_id(cmd)
        lock, users = self._locks.setdefault(req_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                if self.dead.is_set():
                    raise SocketGone(self.why)
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._pending[req_id] = fut
                frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
                if body is not None:
                    frame["body"] = body
                try:
                    await self.ws.send_str(json.dumps(frame, ensure_ascii=False))
                except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
                    self.drop(f"send failed: {type(e).__name__}")
                    raise SocketGone(self.why) from None
                try:
                    ack = await asyncio.wait_for(fut, timeout or self.ack_timeout)
                finally:
                    if self._pending.get(req_id) is fut:
                        del self._pending[req_id]
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._locks.pop(req_id, None)
        errcode = ack.get("errcode", 0)
        if isinstance(errcode, int) and errcode != 0:
            raise WsError(cmd, errcode, str(ack.get("errmsg", ""))[:200])
        return ack


class _Stream:
    """The holder's live stream for one message: placeholder, then the draft as it grows."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Stop following the draft; the frame on the wire finishes first."""
        self.stop.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


class WeComAIBotWSSource(Source):
    Options = WeComAIBotWSOptions
    options: WeComAIBotWSOptions
    long_running = True

    def __init__(self, name: str, options: WeComAIBotWSOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.held = HeldConnection(
            ctx.redis,
            ctx.bus.keys,
            f"wecom_aibot_ws:{options.bot_id}",
            f"{ctx.instance}:{uuid.uuid4().hex[:8]}",
            ttl=options.lease_ttl,
            retry=options.lease_retry,
            handler=self.handle,
            poll=min(1.0, options.lease_ttl / 3),
        )
        self.kicked_key = ctx.state_key(STATE_ADAPTER, f"{options.bot_id}:kicked")
        #: why the holder cannot serve the bot (a failed connect or subscribe), for every instance
        self.failure_key = ctx.state_key(STATE_ADAPTER, f"{options.bot_id}:failure")
        self.socket: Socket | None = None
        #: why this instance is not serving the bot (None: ready, or standing by)
        self.status: str | None = "starting"
        self.connects = 0
        self._stop = asyncio.Event()
        self._streams: dict[str, _Stream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        _LIVE[(id(ctx), name)] = self

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        # a daemon start is the person's "try again" after a kick (see the module docstring)
        with contextlib.suppress(*UNAVAILABLE):
            if await self.ctx.redis.delete(self.kicked_key):
                self.log.info("wecom_aibot_ws.kick_cleared")

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        _LIVE.pop((id(self.ctx), self.name), None)

    async def ready(self) -> str | None:
        """Why the bot cannot be served: a kick, or the holder's failure to connect or subscribe,
        show on every instance; a standby is otherwise ready."""
        if why := await self._kicked():
            return why
        if self.held.held or self.status:
            return self.status
        try:
            failure = await self.ctx.redis.get(self.failure_key)
        except UNAVAILABLE:
            return None
        return f"the holder: {failure.decode(errors='replace')}" if failure else None

    async def _fail(self, why: str) -> None:
        """Record why the holder cannot serve the bot, here and (for the standbys) in Redis."""
        self.status = why
        ttl = int(self.options.reconnect_max + 3 * self.options.lease_ttl) + 1
        with contextlib.suppress(*UNAVAILABLE):
            await self.held.lease.guarded_set(self.failure_key, f"{why} (on {self.ctx.instance})", ttl=ttl)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("wecom_aibot_ws.task_failed", error=repr(task.exception()))

    async def run(self) -> None:
        stop = self._stop
        keeper = asyncio.create_task(self.held.run(stop, drained=self._close_socket))
        delay = self.options.reconnect_base
        try:
            while not stop.is_set():
                self.status = None  # standing by is ready: another instance holds the socket
                if not await self._until(self.held.wait_held()):
                    break
                why = await self._kicked()
                if why:
                    self.status = why
                    await self._until(asyncio.sleep(self.held.poll))
                    continue
                began = time.monotonic()
                await self._session()
                if stop.is_set():
                    break
                if time.monotonic() - began > max(60.0, 2 * self.options.heartbeat_interval):
                    delay = self.options.reconnect_base  # it had been stable: start the back-off again
                if not self.held.held:
                    continue  # lost the lease: stand by at once
                wait = delay * random.uniform(0.5, 1.0)
                self.log.info("wecom_aibot_ws.reconnect_in", seconds=round(wait, 2))
                await self._until(asyncio.sleep(wait))
                delay = min(delay * 2, self.options.reconnect_max)
        finally:
            stop.set()
            await asyncio.gather(keeper, return_exceptions=True)
            await self._close_socket()

    async def _until(self, aw: Awaitable[Any]) -> bool:
        """Wait for ``aw`` unless stopped first; True when ``aw`` finished."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stopper):
                if not t.done():
                    t.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)
        return task.done() and not task.cancelled() and not self._stop.is_set()

    async def _kicked(self) -> str | None:
        try:
            raw = await self.ctx.redis.get(self.kicked_key)
        except UNAVAILABLE:
            return None
        if raw is None:
            return None
        return (
            f"kicked: {raw.decode(errors='replace')}; not reconnecting so two clients never fight over the "
            "bot — stop the other client, then restart an instance"
        )

    async def _close_socket(self) -> None:
        sock, self.socket = self.socket, None
        if sock is not None:
            sock.drop("closing")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sock.ws.close(), 2.0)

    async def _session(self) -> None:
        """Connect, subscribe and serve until the socket dies, the lease is lost or we stop."""
        opts = self.options
        self.status = "connecting"
        try:
            ws = await asyncio.wait_for(
                self.ctx.http().ws_connect(
                    opts.url,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                    autoping=True,
                    heartbeat=None,
                    max_msg_size=16 * 1024 * 1024,
                ),
                opts.connect_timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            await self._fail(f"cannot connect to {opts.url}: {type(e).__name__}")
            self.log.warning("wecom_aibot_ws.connect_failed", url=opts.url, error=type(e).__name__)
            return
        sock = Socket(ws, self._on_callback, opts.ack_timeout, self.log)
        reader = asyncio.create_task(sock.read())
        self._tasks.add(reader)
        reader.add_done_callback(self._tasks.discard)
        try:
            try:
                await sock.request(
                    "aibot_subscribe",
                    {"bot_id": opts.bot_id, "secret": opts.secret.reveal()},
                    new_req_id("aibot_subscribe"),
                    timeout=opts.connect_timeout,
                )
            except WsError as e:
                await self._fail(
                    f"subscribe refused: {e.errcode} invalid bot_id or secret"
                    if e.errcode == ERR_AUTH
                    else f"subscribe refused: errcode {e.errcode} {e.errmsg}".rstrip()
                )
                self.log.error("wecom_aibot_ws.subscribe_refused", errcode=e.errcode)
                return
            except (SocketGone, TimeoutError) as e:
                await self._fail(f"subscribe got no answer: {type(e).__name__}")
                self.log.warning("wecom_aibot_ws.subscribe_failed", error=type(e).__name__)
                return
            if not self.held.held:  # lost the lease while subscribing: do not keep the socket
                return
            self.socket = sock
            self.status = None
            with contextlib.suppress(*UNAVAILABLE):
                await self.ctx.redis.delete(self.failure_key)
            self.connects += 1
            self.log.info("wecom_aibot_ws.subscribed", socket=sock.id, fence=self.held.lease.fence)
            beat = asyncio.create_task(self._heartbeat(sock))
            lost = asyncio.create_task(self.held.wait_lost())
            stopped = asyncio.create_task(self._stop.wait())
            dead = asyncio.create_task(sock.dead.wait())
            try:
                await asyncio.wait([lost, stopped, dead], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (beat, lost, stopped, dead):
                    t.cancel()
                await asyncio.gather(beat, lost, stopped, dead, return_exceptions=True)
            if self._stop.is_set():
                return  # the socket stays open until relayed requests finished (held.run's drained)
            if not self.held.held:
                self.log.warning("wecom_aibot_ws.lease_lost_closing", socket=sock.id)
            self.status = f"reconnecting: {sock.why or 'lease lost'}"
        finally:
            # at a stop the subscribed socket stays open for the requests being served; held.run
            # closes it (``drained``) before it releases the lease
            if not (self._stop.is_set() and self.socket is sock):
                if self.socket is sock:
                    self.socket = None
                sock.drop(sock.why or "session ended")
                await asyncio.gather(reader, return_exceptions=True)

    async def _heartbeat(self, sock: Socket) -> None:
        opts = self.options
        missed = 0
        while not sock.dead.is_set():
            await asyncio.sleep(opts.heartbeat_interval)
            if time.monotonic() - sock.last_rx > opts.silence:
                sock.drop(f"silent for more than {opts.silence:g} s")
                return
            try:
                await sock.request("ping", None, new_req_id("ping"), timeout=opts.heartbeat_interval)
                missed = 0
            except TimeoutError:
                missed += 1
                self.log.info("wecom_aibot_ws.ping_unanswered", socket=sock.id, missed=missed)
                if missed >= opts.missed_acks:
                    sock.drop(f"{missed} pings unanswered")
                    return
            except WsError as e:
                if e.errcode == ERR_NOT_SUBSCRIBED:
                    return  # the socket dropped itself
                self.log.warning("wecom_aibot_ws.ping_refused", errcode=e.errcode)
            except SocketGone:
                return

    # -- callbacks (holder) -------------------------------------------------------------------------

    def _on_callback(self, sock: Socket, frame: dict[str, Any]) -> None:
        self._spawn(self._callback(sock, frame))

    async def _callback(self, sock: Socket, frame: dict[str, Any]) -> None:
        body = frame.get("body")
        req_id = _req_id(frame)
        if not isinstance(body, dict) or not req_id:
            self.log.warning("wecom_aibot_ws.bad_callback", cmd=frame.get("cmd"))
            return
        if frame.get("cmd") == "aibot_event_callback":
            event = body.get("event")
            if isinstance(event, dict) and event.get("eventtype") == "disconnected_event":
                await self._on_kicked(sock)
                return
        try:
            env, key = aibot_envelope(self.name, body, stream=True)
        except CallbackRefused as e:
            self.log.warning("wecom_aibot_ws.bad_callback", reason=e.reason)
            return
        now = time.time()
        state = {
            "req_id": req_id,
            "socket": sock.id,
            "kind": env.kind,
            "event": env.event or "",
            "chat": env.conversation.id,
        }
        welcome = env.event == "enter_chat" and bool(self.options.welcome)
        if welcome:
            state["welcomed"] = "1"
        for attempt in range(8):  # the platform does not redeliver: hold on through a Redis blip
            try:
                pipe: Any = self.ctx.redis.pipeline(transaction=True)
                skey = self.ctx.state_key(STATE_ADAPTER, env.id)
                pipe.hsetnx(skey, "t", f"{now:.3f}")  # a redelivery keeps the first arrival
                pipe.hset(skey, mapping=state)  # ... but its req_id and socket are the live ones
                pipe.expire(skey, STATE_TTL)
                await pipe.execute()
                stored = await self.ctx.publish(env, dedupe_key=key, dedupe_ttl=self.options.dedupe_ttl)
                break
            except UNAVAILABLE as e:
                self.log.warning("wecom_aibot_ws.publish_retry", envelope=env.id, error=type(e).__name__)
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        else:
            self.log.error("wecom_aibot_ws.publish_failed", envelope=env.id, msg_id=env.meta.get("msg_id"))
            return
        self.log.info(
            "wecom_aibot_ws.accepted",
            envelope=env.id,
            kind=env.kind,
            event_type=env.event,
            duplicate=not stored,
        )
        if welcome:
            await self._welcome(sock, req_id, self.options.welcome)
        if stored and env.kind == "message":
            self._start_stream(sock, env.id, req_id, now)

    async def _welcome(self, sock: Socket, req_id: str, text: str) -> None:
        try:
            await sock.request(
                "aibot_respond_welcome_msg", {"msgtype": "text", "text": {"content": fit(text)}}, req_id
            )
            self.log.info("wecom_aibot_ws.welcomed", socket=sock.id)
        except (WsError, SocketGone, TimeoutError) as e:
            self.log.warning("wecom_aibot_ws.welcome_failed", error=str(e)[:200])

    async def _on_kicked(self, sock: Socket) -> None:
        """Another client subscribed this bot. Give the socket and the lease up; stay down."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        why = f"disconnected_event at {at} on {self.ctx.instance}"
        # only while the lease is still ours (fenced): then the other client is not one of us
        try:
            ours = await self.held.lease.guarded_set(self.kicked_key, why, ttl=0)
        except UNAVAILABLE:
            ours = False
        if ours:
            self.log.error("wecom_aibot_ws.kicked", socket=sock.id, hint="another client subscribed this bot")
            self.status = f"kicked: {why}"
        else:
            self.log.info("wecom_aibot_ws.handed_over", socket=sock.id)
        sock.drop("disconnected_event")
        if ours:
            await self.held.lease.release()

    # -- streams (holder) ---------------------------------------------------------------------------

    def _start_stream(self, sock: Socket, envelope: str, req_id: str, t: float) -> None:
        old = self._streams.pop(envelope, None)
        if old is not None:
            old.stop.set()
        s = _Stream()
        self._streams[envelope] = s
        s.task = asyncio.create_task(self._follow(sock, s, envelope, req_id, t))

    async def _follow(self, sock: Socket, s: _Stream, envelope: str, req_id: str, t: float) -> None:
        """The placeholder, then the draft as it grows, until the final answer takes over."""
        opts = self.options
        shown = ""
        try:
            if opts.placeholder:
                await sock.request(
                    "aibot_respond_msg", stream_body(envelope, opts.placeholder, False), req_id
                )
                shown = opts.placeholder
            while not s.stop.is_set() and time.time() < t + opts.stream_window:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(s.stop.wait(), opts.draft_poll)
                if s.stop.is_set():
                    break
                draft = await self.ctx.get_draft(envelope)
                text = fit(draft[0]) if draft else ""
                if text.strip() and text != shown:
                    await sock.request("aibot_respond_msg", stream_body(envelope, text, False), req_id)
                    shown = text
        except (WsError, SocketGone, TimeoutError) as e:
            self.log.info(
                "wecom_aibot_ws.stream_stopped", envelope=envelope, why=str(e)[:200] or type(e).__name__
            )
        except UNAVAILABLE as e:
            self.log.warning("wecom_aibot_ws.draft_unavailable", envelope=envelope, error=type(e).__name__)
        finally:
            if self._streams.get(envelope) is s:
                del self._streams[envelope]

    # -- requests from the outbound, run in the holder ----------------------------------------------

    async def handle(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        sock = self.socket
        if sock is None or sock.dead.is_set():
            raise RetryableError(self.status or "the bot's socket is not connected yet", retry_after=1.0)
        if op == "reply":
            return await self._reply(sock, payload)
        if op == "send":
            return await self._send(sock, str(payload["chat"]), _message_body(payload))
        raise PermanentError(f"unknown operation {op!r}")

    async def _reply(self, sock: Socket, p: dict[str, Any]) -> dict[str, Any]:
        origin = str(p["origin"])
        part = int(p.get("part", 0))
        state = {
            k.decode(): v.decode() for k, v in (await self.ctx.redis.hgetall(self._state(origin))).items()
        }
        if not state:
            raise PermanentError(
                f"no AI-bot state for the message this answers: older than {STATE_TTL // 3600} h, "
                "or not from a wecom_aibot_ws inbound"
            )
        stream = self._streams.get(origin)
        if stream is not None:
            await stream.close()
        age = time.time() - float(state.get("t", "0"))
        same = state.get("socket") == sock.id
        card = p.get("template_card")
        if state.get("kind") == "message" and same and age < self.options.stream_window:
            sid = origin if part == 0 else f"{origin}_{part + 1}"
            body: dict[str, Any] = stream_body(sid, str(p.get("text", "")), True)
            if isinstance(card, dict):
                body = {
                    "msgtype": "stream_with_template_card",
                    "stream": body["stream"],
                    "template_card": card,
                }
            try:
                await self._request(sock, "aibot_respond_msg", body, state["req_id"])
                return {"via": "stream", "id": sid}
            except WsError as e:
                if e.errcode not in (ERR_REQ_ID, ERR_EXPIRED):
                    raise _as_send_error(e) from None
                self.log.info("wecom_aibot_ws.stream_fallback", envelope=origin, errcode=e.errcode)
        elif state.get("kind") == "event" and same and part == 0:
            event = state.get("event")
            window = self.options.welcome_window if event == "enter_chat" else EVENT_WINDOW - 0.5
            if age < window:
                if event == "enter_chat" and state.get("welcomed") != "1":
                    body = (
                        {"msgtype": "template_card", "template_card": card}
                        if isinstance(card, dict)
                        else {"msgtype": "text", "text": {"content": fit(str(p.get("text", "")))}}
                    )
                    with contextlib.suppress(WsError):
                        await self._request(sock, "aibot_respond_welcome_msg", body, state["req_id"])
                        return {"via": "welcome"}
                elif event == "template_card_event" and isinstance(card, dict):
                    body = {"response_type": "update_template_card", "template_card": card}
                    with contextlib.suppress(WsError):
                        await self._request(sock, "aibot_respond_update_msg", body, state["req_id"])
                        return {"via": "card_update"}
        # the req_id is dead (older socket), expired, or an event's: a proactive message instead
        result = await self._send(sock, state["chat"], _message_body(p))
        self.log.info("wecom_aibot_ws.reply_by_send", envelope=origin, same_socket=same, age=round(age, 1))
        return result

    async def _send(self, sock: Socket, chat: str, body: dict[str, Any]) -> dict[str, Any]:
        req_id = new_req_id("aibot_send_msg")
        try:
            await self._request(sock, "aibot_send_msg", {"chatid": chat, **body}, req_id)
        except WsError as e:
            raise _as_send_error(e) from None
        return {"via": "send_msg", "id": req_id}

    async def _request(self, sock: Socket, cmd: str, body: dict[str, Any], req_id: str) -> dict[str, Any]:
        """One request, retried on 6000 (command conflict) as other clients do."""
        delay = 0.2
        for attempt in range(3):
            try:
                return await sock.request(cmd, body, req_id)
            except WsError as e:
                if e.errcode != ERR_CONFLICT or attempt == 2:
                    raise
            except SocketGone as e:
                raise RetryableError(f"the socket closed before WeCom acknowledged {cmd}: {e}") from None
            except TimeoutError:
                raise RetryableError(f"WeCom did not acknowledge {cmd} in time") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _state(self, envelope: str) -> str:
        return self.ctx.state_key(STATE_ADAPTER, envelope)


def _message_body(p: dict[str, Any]) -> dict[str, Any]:
    card = p.get("template_card")
    if isinstance(card, dict):
        return {"msgtype": "template_card", "template_card": card}
    return {"msgtype": "markdown", "markdown": {"content": fit(str(p.get("text", "")))}}


def _as_send_error(e: WsError) -> PermanentError | RetryableError:
    if e.errcode == ERR_NOT_SUBSCRIBED or e.errcode in _TRANSIENT or e.errcode == ERR_CONFLICT:
        return RetryableError(f"WeCom: {e}", retry_after=1.0)
    if e.errcode == ERR_CHATID:
        return PermanentError(f"WeCom: {e} (chat ids are case-sensitive)")
    return PermanentError(f"WeCom refused it: {e}")
