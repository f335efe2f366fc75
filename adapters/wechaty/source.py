"""``wechaty`` (inbound): personal-WeChat rooms and chats through any Wechaty puppet service.

A puppet service allows **one Event stream** (a second gets ALREADY_EXISTS). With several bridge
instances, exactly one holds it: the connection is a :class:`bridge.held.HeldConnection` named
``wechaty:<inbound name>`` (a fenced Redis lease); the instance holding the lease connects, the
others stand by and take over within ``lease_ttl`` plus a retry when it dies. Sends of the
``wechaty`` outbound, from any instance, run on the holder through the same object.

While holding, the source: calls ``Start`` (the puppet is off until a client starts it, and again
after every service restart), opens the Event stream and handles events in order:

* ``login`` → remembers the bot's contact id; ready. ``logout`` → not ready. ``scan`` → logs the QR
  link and the QR as terminal text (``wechaty.scan``), not ready. The service replays LOGIN (or the
  pending SCAN) whenever a stream opens.
* ``message`` → MessagePayload, then RoomPayload and ContactPayload (cached ``cache_ttl``), the file
  box of a media message (name, size, mime; no bytes) → an envelope (adapters/wechaty/mapping.py),
  published with the message id as dedupe key (``dedupe_ttl``): the login replay and messages a
  puppet sends again after a reconnect are published once. The bot's own messages (talker = the
  bot) are never published.
* ``room-join`` / ``room-leave`` / ``room-topic`` → envelopes of kind ``event``.

A stream that ends or fails is reopened with exponential back-off and full jitter between
``reconnect_min`` and ``reconnect_max`` seconds (reset after a stream that lived a minute). The
service does not queue: events emitted while no stream is open are lost (see the README).

Readiness follows the login state the holder records in Redis (every instance reports it):
not ready while scanning, logged out, refused (a wrong token: the token is masked) or unreachable.

Config::

    [[inbound]]
    name = "wx"
    type = "wechaty"
    endpoint = "127.0.0.1:8788"      # the puppet service, host:port
    token = "${WECHATY_TOKEN}"        # or token_file = "/run/secrets/wechaty"
    reply_via = "wx_out"              # a [[outbound]] of type wechaty with inbound = "wx"
    # tls = true                      # false for a plaintext service
    # server_name = ""                # TLS server name; default: the token's prefix (insecure_… → insecure)
    # ca_file = "/etc/…/ca.pem"       # the CA to trust; default: the Wechaty community CA
    # timeout = 15                    # seconds per call
    # keepalive = 30                  # seconds between HTTP/2 pings on an idle channel
    # reconnect_min = 1               # back-off bounds, seconds
    # reconnect_max = 60
    # lease_ttl = 10                  # seconds; a dead holder is replaced within about 1.3 x this
    # cache_ttl = 300                 # seconds room and contact payloads are cached
    # dedupe_ttl = 86400              # seconds a message id is remembered
    # fetch_files = true              # ask the service for a media message's file box (name, size)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
import weakref
from typing import Any

import msgspec

from adapters.wechaty.client import AuthError, NotLoggedIn, PuppetError, StreamBusy, Unreachable
from adapters.wechaty.mapping import MEDIA_KINDS, message_envelope, message_type, room_event_envelope
from adapters.wechaty.options import WechatyOptions, backoff
from adapters.wechaty.qr import terminal_qr
from bridge import logging as blog
from bridge.adapter import Context, Source
from bridge.bus import UNAVAILABLE
from bridge.envelope import Envelope
from bridge.errors import BusUnavailable, PermanentError, RetryableError
from bridge.held import HeldConnection

STATE_ADAPTER = "wechaty"
#: a stream that lived this long resets the back-off
STABLE_AFTER = 60.0
#: ScanStatus of wechaty-puppet
SCAN_STATUS = {0: "unknown", 1: "cancel", 2: "waiting", 3: "scanned", 4: "confirmed", 5: "timeout"}

#: the live sources of this process by (context, inbound name): a wechaty outbound finds its
#: inbound's connection here (sources are built before sinks)
_SOURCES: weakref.WeakValueDictionary[tuple[int, str], WechatySource] = weakref.WeakValueDictionary()


def source_for(ctx: Context, inbound: str) -> WechatySource | None:
    return _SOURCES.get((id(ctx), inbound))


class PuppetStatus(msgspec.Struct, omit_defaults=True):
    """What the holder knows about the puppet, shared through Redis for every instance's /readyz."""

    state: str  # connecting | scan | logged_in | logged_out | refused | unreachable | busy
    reason: str = ""
    self_id: str = ""
    self_name: str = ""
    qrcode: str = ""
    instance: str = ""
    at: float = 0.0


class WechatySource(Source):
    Options = WechatyOptions
    options: WechatyOptions
    long_running = True

    def __init__(self, name: str, options: WechatyOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.client = options.client()
        self.status = PuppetStatus("standby", "another instance holds the Event stream")
        self.self_id = ""
        self._connected = False
        self.held = HeldConnection(
            ctx.redis, ctx.bus.keys, f"wechaty:{name}", f"{ctx.instance}:{uuid.uuid4().hex[:8]}",
            ttl=options.lease_ttl, handler=self.handle,
        )  # fmt: skip
        self.status_key = ctx.state_key(STATE_ADAPTER, f"{name}:status")
        self._stop = asyncio.Event()
        _SOURCES[(id(ctx), name)] = self

    # -- readiness -----------------------------------------------------------------------------------

    async def ready(self) -> str | None:
        status = self.status if self.held.held else await self._shared_status()
        if status is None:
            return "no instance holds the Wechaty event stream yet"
        if status.state == "logged_in":
            return None
        return f"wechaty {status.state}: {status.reason}" if status.reason else f"wechaty {status.state}"

    async def _shared_status(self) -> PuppetStatus | None:
        try:
            raw = await self.ctx.redis.get(self.status_key)
        except UNAVAILABLE:
            return None
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=PuppetStatus)
        except msgspec.DecodeError:
            return None

    async def _set_status(self, state: str, reason: str = "", **fields: Any) -> None:
        keep = {"self_id": self.self_id, "self_name": self.status.self_name}
        keep.update(fields)
        self.status = PuppetStatus(state, reason, instance=self.ctx.instance, at=time.time(), **keep)
        await self._write_status()

    async def _write_status(self) -> None:
        """Record the status for every instance, under our lease; it expires unless refreshed."""
        with contextlib.suppress(*UNAVAILABLE):
            await self.held.lease.guarded_set(
                self.status_key, msgspec.json.encode(self.status), ttl=max(int(self.options.lease_ttl * 3), 3)
            )

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(max(self.options.lease_ttl, 1.0))
            await self._write_status()

    # -- the held connection -------------------------------------------------------------------------

    def stop(self) -> None:
        """The daemon is stopping: close the stream and hand the lease over now."""
        self._stop.set()

    async def run(self) -> None:
        stop = asyncio.Event()
        keeper = asyncio.create_task(self.held.run(stop))
        stopping = asyncio.ensure_future(self._stop.wait())
        children: list[asyncio.Future[Any]] = []
        try:
            while not keeper.done() and not self._stop.is_set():
                held = asyncio.ensure_future(self.held.wait_held())
                children = [held]
                await _first(keeper, held, stopping)
                if keeper.done() or self._stop.is_set():
                    break
                self.log.info("wechaty.holding", endpoint=self.options.endpoint)
                session = asyncio.create_task(self._connect_loop())
                lost = asyncio.ensure_future(self.held.wait_lost())
                children = [session, asyncio.create_task(self._refresh_status()), lost]
                await _first(keeper, session, lost, stopping)
                await _cancel(children)
                self._disconnect()
                if not keeper.done() and not self._stop.is_set():
                    self.log.info("wechaty.standby", why="lease lost")
                    self.status = PuppetStatus("standby", "another instance holds the Event stream")
            if keeper.done():
                keeper.result()  # raise what ended it
        finally:
            # also on cancellation: the stream must close before the lease goes, or the next holder
            # finds it still open (ALREADY_EXISTS)
            await _cancel([*children, stopping])
            self._disconnect()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(keeper, return_exceptions=True)

    def _disconnect(self) -> None:
        self._connected = False
        self.client.close()

    async def close(self) -> None:
        self._disconnect()
        _SOURCES.pop((id(self.ctx), self.name), None)

    async def _connect_loop(self) -> None:
        """While held: Start, stream, handle; reconnect with back-off and jitter."""
        attempt = 0
        while self.held.held:
            t0 = time.monotonic()
            delay_floor = 0.0
            try:
                await self._session()
            except AuthError as e:
                self.log.error("wechaty.refused", error=str(e), hint="check the inbound's token")
                await self._set_status("refused", f"the puppet service refused the token ({e})")
                delay_floor = self.options.reconnect_max  # a wrong token does not fix itself quickly
            except StreamBusy as e:
                self.log.warning("wechaty.stream_busy", error=str(e))
                await self._set_status("busy", "another client holds the service's Event stream")
            except PuppetError as e:
                self.log.warning("wechaty.disconnected", error=str(e))
                await self._set_status("unreachable", str(e))
            finally:
                self._disconnect()
            if time.monotonic() - t0 >= STABLE_AFTER:
                attempt = 0
            delay = max(delay_floor, backoff(attempt, self.options.reconnect_min, self.options.reconnect_max))
            attempt += 1
            self.log.info("wechaty.reconnecting", in_s=round(delay, 2), attempt=attempt)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        await self._set_status("connecting", f"starting the puppet at {self.options.endpoint}")
        await self.client.start()
        self._connected = True
        self.client.rooms.clear()
        self.client.contacts.clear()
        self.log.info("wechaty.started", endpoint=self.options.endpoint)
        async for event, payload in self.client.events():
            await self._on_event(event, payload)
        raise Unreachable("Event: the stream ended")

    async def _on_event(self, event: str, payload: dict[str, Any]) -> None:
        if event == "login":
            self.self_id = str(payload.get("contactId") or "")
            name = ""
            with contextlib.suppress(PuppetError):
                name = (await self.client.contact(self.self_id)).name
            self.log.info("wechaty.login", contact=self.self_id, name=name)
            await self._set_status("logged_in", self_id=self.self_id, self_name=name)
        elif event == "logout":
            self.log.warning("wechaty.logout", contact=payload.get("contactId"), data=payload.get("data"))
            await self._set_status("logged_out", "the account logged out: scan the QR code again")
        elif event == "scan":
            await self._on_scan(payload)
        elif event in ("message", "room_join", "room_leave", "room_topic"):
            try:
                if event == "message":
                    await self._on_message(str(payload.get("messageId") or ""))
                else:
                    await self._on_room_event(event, payload)
            except Unreachable:
                raise  # the connection is gone: reconnect
            except PuppetError as e:  # one payload the service cannot give: skip it, keep the stream
                self.log.error("wechaty.event_failed", event=event, error=str(e), payload=str(payload)[:300])
        elif event == "error":
            self.log.warning("wechaty.puppet_error", data=str(payload.get("data", payload))[:500])
        elif event in ("heartbeat", "dong", "ready", "dirty"):
            if event == "dirty" and payload.get("payloadId"):
                self.client.rooms.drop(str(payload["payloadId"]))
                self.client.contacts.drop(str(payload["payloadId"]))
        else:
            self.log.debug("wechaty.event_ignored", event=event)

    async def _on_scan(self, payload: dict[str, Any]) -> None:
        status = SCAN_STATUS.get(int(payload.get("status") or 0), str(payload.get("status")))
        qrcode = str(payload.get("qrcode") or "")
        if qrcode and status in ("waiting", "unknown"):
            qr = terminal_qr(qrcode)
            # a log line escapes newlines: the QR rides in the `qr` field (jq -r .qr prints it
            # scannable), and on a terminal it is also written out as it is
            self.log.warning(
                "wechaty.scan", status=status, qrcode=qrcode, qr=qr,
                hint="scan it with the bot account's WeChat app (or: wechat-bridge wechaty login)",
            )  # fmt: skip
            if sys.stderr.isatty():
                blog.flush()
                print(qr, file=sys.stderr, flush=True)
        else:
            self.log.info("wechaty.scan", status=status)
        await self._set_status("scan", f"waiting for the QR code to be scanned ({status})", qrcode=qrcode)

    async def _publish(self, env: Envelope, key: str) -> None:
        """Publish, retrying while Redis is down (the service will not send the event again)."""
        delay = 0.2
        while True:
            try:
                if await self.ctx.publish(env, dedupe_key=key, dedupe_ttl=self.options.dedupe_ttl):
                    self.log.info(
                        "wechaty.published", envelope=env.id, kind=env.kind, conversation=env.conversation.id
                    )
                else:
                    self.log.info("wechaty.duplicate", envelope=env.id, key=key)
                return
            except (BusUnavailable, *UNAVAILABLE) as e:
                self.log.warning("wechaty.publish_retry", envelope=env.id, error=str(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_message(self, message_id: str) -> None:
        if not message_id:
            return
        m = await self.client.message(message_id)
        talker_id = m.talker_id
        if self.self_id and talker_id == self.self_id:
            self.log.debug("wechaty.own_message", message=message_id)
            return
        type_name = message_type(int(m.type))
        room: dict[str, Any] | None = None
        talker: dict[str, Any] | None = None
        alias = ""
        if m.room_id:
            with contextlib.suppress(PuppetError):
                room = {"topic": (await self.client.room(m.room_id)).topic}
        if talker_id:
            with contextlib.suppress(PuppetError):
                talker = {"name": (await self.client.contact(talker_id)).name}
        box = None
        if self.options.fetch_files and type_name in MEDIA_KINDS:
            try:
                box = await self.client.message_file(message_id, image=type_name == "image")
            except PuppetError as e:
                self.log.warning("wechaty.file_box_failed", message=message_id, error=str(e))
        ts = m.timestamp_deprecated or (int(m.receive_time.timestamp() * 1000) if m.receive_time else 0)
        env = message_envelope(
            self.name,
            message={
                "id": m.id or message_id, "type": int(m.type), "talker_id": talker_id,
                "room_id": m.room_id, "listener_id": m.listener_id, "text": m.text,
                "mention_ids": list(m.mention_ids), "timestamp": ts,
            },
            self_id=self.self_id, room=room, talker=talker, talker_alias=alias, file_box=box,
        )  # fmt: skip
        await self._publish(env, f"msg:{message_id}")

    async def _on_room_event(self, event: str, payload: dict[str, Any]) -> None:
        room_id = str(payload.get("roomId") or "")
        topic = None
        if room_id:
            self.client.rooms.drop(room_id)  # members or topic changed
            if event != "room_topic":
                with contextlib.suppress(PuppetError):
                    topic = (await self.client.room(room_id)).topic
        env = room_event_envelope(self.name, event, payload, topic=topic)
        if env is not None:
            await self._publish(env, env.id)

    # -- sends, run on the holder (the outbound calls held.call) -------------------------------------

    async def handle(self, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        if not self._connected:
            raise RetryableError(
                f"wechaty {self.name}: not connected to the puppet service ({self.status.state})"
            )
        if self.status.state != "logged_in":
            raise RetryableError(f"wechaty {self.name}: the bot is not logged in ({self.status.state})", 30.0)
        conv = str(payload.get("conversation") or "")
        try:
            if op == "send_text":
                mentions = [str(m) for m in payload.get("mentions") or []]
                text = await self._with_mentions(str(payload.get("text") or ""), mentions)
                return {"id": await self.client.send_text(conv, text, mentions)}
            if op == "send_file":
                return {
                    "id": await self.client.send_url_file(conv, str(payload["url"]), str(payload["name"]))
                }
        except NotLoggedIn as e:
            raise RetryableError(str(e), 30.0) from None
        except Unreachable as e:
            raise RetryableError(str(e)) from None
        except AuthError as e:
            raise RetryableError(str(e), 60.0) from None
        except PuppetError as e:
            raise RetryableError(str(e)) from None
        raise PermanentError(f"wechaty: unknown operation {op!r}")

    async def _with_mentions(self, text: str, mentions: list[str]) -> str:
        """``@Name`` in front of the text for each mentioned contact it does not name yet (WeChat
        shows a mention only when the text carries it)."""
        prefix = []
        for cid in mentions:
            name = cid
            with contextlib.suppress(PuppetError):
                name = (await self.client.contact(cid)).name or cid
            if f"@{name}" not in text:
                prefix.append(f"@{name}")
        return " ".join([*prefix, text]) if prefix else text


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


async def _cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
