"""A client for the OpenClaw gateway's WebSocket protocol (v4): one long-lived connection.

Frames are JSON text: requests ``{type:"req", id, method, params}``, responses ``{type:"res", id, ok,
payload|error}`` (the ``agent`` method answers twice on one id: ``accepted``, then the final), events
``{type:"event", event, payload}``. The server speaks first with ``connect.challenge``; the first
client frame must be ``connect`` (protocol exactly 4) carrying the shared token or password and the
device proof signed over the challenge (adapters/openclaw/device.py). ``hello-ok`` gives the
server's ``bootId`` (new on every gateway start) and ``policy.maxPayload``.

:class:`GatewayClient` keeps one connection up in a background task: reconnect with exponential
back-off (or the server's ``retryAfterMs``) after a drop, a slow retry and a stated :attr:`problem`
after a refusal that needs a person (bad token, pairing, protocol). A request in flight when the
connection drops ends with :class:`ConnectionLost`; the caller re-sends it (the sink does so under
the same idempotency key). ``agent``/``chat`` events are handed to subscribers by ``runId``.

The pure helpers at the bottom read the gateway's answers: :func:`final_answer` (a run's final
response), :func:`find_in_history` (an answer in ``chat.history`` after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from adapters.openclaw.device import DeviceIdentity
from bridge.config import Secret

__all__ = [
    "Answer",
    "Connection",
    "ConnectionLost",
    "FrameTooLarge",
    "GatewayClient",
    "GatewayError",
    "GatewayRefused",
    "HistoryMatch",
    "NotConnected",
    "RunEnded",
    "final_answer",
    "find_in_history",
    "message_text",
]

PROTOCOL = 4
CLIENT_ID = "gateway-client"  # from the gateway's fixed list of client ids
CLIENT_MODE = "backend"
ROLE = "operator"
SCOPES = ["operator.read", "operator.write"]
#: the gateway's own default; the real value comes with hello-ok
DEFAULT_MAX_PAYLOAD = 25 * 1024 * 1024
#: the gateway's restart recovery writes a user message with this provenance before re-running a turn
RECOVERY_TOOL = "main_session_restart_recovery"
#: codes of gateway answers that mean "this idempotency key can no longer start work" after a restart
KEY_REJECTED_MARKERS = (
    "SESSION_WORK_START_CHANGED",
    "changed while starting work",
    "Pending input ownership ended",
)

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def _code(code: int | None) -> int | None:
    return None if code is None else int(code)


def _platform() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


# -- errors ------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An ``ok: false`` answer."""

    def __init__(self, error: dict[str, Any], payload: dict[str, Any] | None = None) -> None:
        self.code = str(error.get("code") or "ERROR")
        self.message = str(error.get("message") or "(no message)")
        details = error.get("details")
        self.details: dict[str, Any] = details if isinstance(details, dict) else {}
        after = error.get("retryAfterMs")
        self.retry_after = after / 1000.0 if isinstance(after, int | float) and after >= 0 else None
        self.retryable = error.get("retryable") is True
        self.payload = payload or {}
        super().__init__(f"{self.code}: {self.message}")

    @property
    def detail_code(self) -> str:
        return str(self.details.get("code") or "")

    @property
    def key_rejected(self) -> bool:
        """The gateway will not start work for this idempotency key (after a restart): use a new one."""
        text = f"{self.message} {self.payload.get('summary') or ''} {self.detail_code}"
        return any(m in text for m in KEY_REJECTED_MARKERS)


class ConnectionLost(Exception):
    def __init__(self, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(
            f"the connection to the gateway closed (code {code}{': ' + reason if reason else ''})"
        )


class NotConnected(Exception):
    """No connection within the time a caller was ready to wait."""


class GatewayRefused(Exception):
    """The gateway refused the connection for a reason a person must fix (token, pairing, protocol)."""


class FrameTooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the request is {size} bytes, over the gateway's policy.maxPayload of {limit} bytes"
        )


class RunEnded(Exception):
    """The agent run ended without an answer to deliver (error, abort, timeout)."""


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def connect_refusal(err: GatewayError, device_id: str) -> Exception:
    """What a failed ``connect`` means: :class:`GatewayRefused` (needs a person) or a retry."""
    code = err.detail_code
    if err.code == "UNAVAILABLE" or code == "AUTH_RATE_LIMITED":
        return _Retry(f"gateway busy: {err.message}", err.retry_after)
    if code == "PAIRING_REQUIRED":
        req = err.details.get("requestId")
        how = f"openclaw devices approve {req}" if req else "openclaw devices list, then approve"
        return GatewayRefused(
            f"the gateway wants this device paired (device id {device_id}): on the gateway host run {how}"
        )
    if code.startswith("AUTH_") or "unauthorized" in err.message.lower():
        return GatewayRefused(
            f"the gateway refused the credentials: {err.message} ({code or err.code}); "
            "check token (or password) of this outbound against gateway.auth on the gateway"
        )
    if code.startswith("DEVICE_"):
        return GatewayRefused(f"the gateway refused the device identity: {err.message} ({code})")
    if code in ("PROTOCOL_MISMATCH", "CLIENT_VERSION_MISMATCH"):
        return GatewayRefused(f"the gateway does not speak protocol {PROTOCOL}: {err.message} ({code})")
    return GatewayRefused(f"the gateway refused the connection: {err.message} ({code or err.code})")


# -- the connection ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Connection:
    ws: aiohttp.ClientWebSocketResponse
    hello: dict[str, Any]
    epoch: int
    pending: dict[str, asyncio.Queue[dict[str, Any] | ConnectionLost]] = field(default_factory=dict)
    closed: bool = False

    @property
    def boot_id(self) -> str:
        server = self.hello.get("server")
        return str(server.get("bootId") or "") if isinstance(server, dict) else ""

    @property
    def max_payload(self) -> int:
        policy = self.hello.get("policy")
        v = policy.get("maxPayload") if isinstance(policy, dict) else None
        return v if isinstance(v, int) and v > 0 else DEFAULT_MAX_PAYLOAD

    @property
    def server_version(self) -> str:
        server = self.hello.get("server")
        return str(server.get("version") or "?") if isinstance(server, dict) else "?"


class Call:
    """One request's answers, in order (``agent`` answers twice)."""

    def __init__(
        self, conn: Connection, rid: str, queue: asyncio.Queue[dict[str, Any] | ConnectionLost]
    ) -> None:
        self.conn = conn
        self.id = rid
        self._queue = queue

    async def next(self, timeout: float | None) -> dict[str, Any]:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, ConnectionLost):
            raise item
        return item

    def close(self) -> None:
        self.conn.pending.pop(self.id, None)


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        token: Secret | None,
        password: Secret | None,
        device: DeviceIdentity | None,
        log: Any,
        http: Callable[[], aiohttp.ClientSession],
        display_name: str = "wechat-bridge",
        version: str = "0.1.0",
        handshake_timeout: float = 15.0,
        heartbeat: float = 30.0,
        refused_retry: float = 60.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.url = url
        self._token = token
        self._password = password
        self.device = device
        self.log = log
        #: the daemon's one HTTP client (``Context.http``): the WebSocket is opened through it
        self._http = http
        self.display_name = display_name
        self.version = version
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self.refused_retry = refused_retry
        self.backoff_max = backoff_max
        self.conn: Connection | None = None
        #: set when the gateway refused us for a reason a person must fix; cleared on success
        self.problem: str | None = None
        #: the last reason a connection failed or dropped (for errors and readiness)
        self.last_error: str | None = "not connected yet"
        self.connects = 0
        self._epoch = 0
        self._changed = asyncio.Condition()
        self._runs: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"openclaw:{self.url}")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def connection(self, timeout: float) -> Connection:
        """The live connection, waiting up to ``timeout`` s.

        Raises :class:`GatewayRefused` or :class:`NotConnected`.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        async with self._changed:
            while True:
                if self.conn is not None and not self.conn.closed:
                    return self.conn
                if self.problem is not None:
                    raise GatewayRefused(self.problem)
                left = end - loop.time()
                if left <= 0:
                    raise NotConnected(f"no connection to {self.url} within {timeout:g} s: {self.last_error}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    async def _run(self) -> None:
        delay = 0.5
        while not self._closing:
            started = asyncio.get_running_loop().time()
            retry_after: float | None = None
            try:
                await self._connect_and_read()
            except asyncio.CancelledError:
                raise
            except GatewayRefused as e:
                self.problem = str(e)
                self.last_error = str(e)
                self.log.error("openclaw.refused", url=self.url, reason=str(e), retry_in=self.refused_retry)
                retry_after = self.refused_retry
            except _Retry as e:
                self.last_error = str(e)
                retry_after = e.retry_after
                self.log.warning("openclaw.connect_retry", url=self.url, reason=str(e))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                self.log.warning("openclaw.connect_failed", url=self.url, error=self.last_error)
            await self._notify()
            if self._closing:
                return
            if asyncio.get_running_loop().time() - started > 30:
                delay = 0.5  # it was up a while: reconnect quickly
            wait = retry_after if retry_after is not None else delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, self.backoff_max)
            await asyncio.sleep(wait)

    def _connect_params(self, nonce: str, ts: int) -> dict[str, Any]:
        platform = _platform()
        token = self._token.reveal() if self._token else None
        auth: dict[str, str] = {}
        if token:
            auth["token"] = token
        if self._password:
            auth["password"] = self._password.reveal()
        params: dict[str, Any] = {
            "minProtocol": PROTOCOL,
            "maxProtocol": PROTOCOL,
            "client": {
                "id": CLIENT_ID,
                "displayName": self.display_name,
                "version": self.version,
                "platform": platform,
                "mode": CLIENT_MODE,
            },
            "role": ROLE,
            "scopes": list(SCOPES),
            "caps": [],
            "auth": auth,
            "userAgent": f"wechat-bridge/{self.version}",
        }
        if self.device is not None:
            params["device"] = self.device.connect_block(
                client_id=CLIENT_ID,
                client_mode=CLIENT_MODE,
                role=ROLE,
                scopes=list(SCOPES),
                token=token,
                nonce=nonce,
                signed_at_ms=ts,
                platform=platform,
            )
        return params

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        msg = await asyncio.wait_for(ws.receive(), self.handshake_timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            code = _code(ws.close_code)
            raise _Retry(
                f"the gateway closed the connection during the handshake (code {code}: {msg.extra or ''})"
            )
        frame = _dec.decode(msg.data)
        if not isinstance(frame, dict):
            raise ValueError("a frame that is not a JSON object")
        return frame

    async def _connect_and_read(self) -> None:
        ws = await self._http().ws_connect(
            self.url,
            heartbeat=self.heartbeat,
            autoping=True,
            max_msg_size=64 * 1024 * 1024,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
        conn: Connection | None = None
        try:
            challenge = await self._receive(ws)
            payload = challenge.get("payload") if isinstance(challenge.get("payload"), dict) else {}
            assert isinstance(payload, dict)
            nonce, ts = payload.get("nonce"), payload.get("ts")
            if (
                challenge.get("event") != "connect.challenge"
                or not isinstance(nonce, str)
                or not isinstance(ts, int)
            ):
                raise _Retry("the gateway did not start with a valid connect.challenge")
            rid = str(uuid.uuid4())
            req = {"type": "req", "id": rid, "method": "connect", "params": self._connect_params(nonce, ts)}
            await ws.send_str(_enc.encode(req).decode())
            while True:
                frame = await self._receive(ws)
                if frame.get("type") == "res" and frame.get("id") == rid:
                    break
            if not frame.get("ok"):
                err = frame.get("error")
                raise connect_refusal(
                    GatewayError(err if isinstance(err, dict) else {}), self.device.id if self.device else "-"
                )
            hello = frame.get("payload")
            if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL:
                got = hello.get("protocol") if isinstance(hello, dict) else None
                raise GatewayRefused(f"the gateway answered protocol {got}; this bridge speaks {PROTOCOL}")
            self._epoch += 1
            conn = Connection(ws, hello, self._epoch)
            previous_boot = self.conn.boot_id if self.conn is not None else None
            self.conn = conn
            self.problem = None
            self.last_error = None
            self.connects += 1
            self.log.info(
                "openclaw.connected",
                url=self.url,
                server=conn.server_version,
                boot=conn.boot_id,
                max_payload=conn.max_payload,
                restarted=previous_boot is not None and previous_boot != conn.boot_id,
            )
            await self._notify()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        frame = _dec.decode(msg.data)
                    except msgspec.DecodeError:
                        self.log.warning("openclaw.bad_frame", size=len(msg.data))
                        continue
                    if isinstance(frame, dict):
                        self._dispatch(conn, frame)
                elif msg.type != aiohttp.WSMsgType.BINARY:
                    break
            self.last_error = f"connection closed (code {_code(ws.close_code)})"
            self.log.warning("openclaw.disconnected", url=self.url, code=_code(ws.close_code))
        finally:
            if conn is not None:
                conn.closed = True
                lost = ConnectionLost(_code(ws.close_code), str(ws.exception() or ""))
                for q in conn.pending.values():
                    q.put_nowait(lost)
                conn.pending.clear()
            await ws.close()

    def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "res":
            q = conn.pending.get(str(frame.get("id")))
            if q is not None:
                q.put_nowait(frame)
        elif kind == "event" and frame.get("event") in ("chat", "agent"):
            payload = frame.get("payload")
            run_id = payload.get("runId") if isinstance(payload, dict) else None
            for sub in self._runs.get(str(run_id), ()):
                sub.put_nowait(frame)

    # -- requests --------------------------------------------------------------------------------------

    async def request(self, conn: Connection, method: str, params: dict[str, Any]) -> Call:
        """Send a request on ``conn``; read its answers from the returned :class:`Call` (then close it)."""
        if conn.closed:
            raise ConnectionLost(_code(conn.ws.close_code), "closed before sending")
        rid = str(uuid.uuid4())
        data = _enc.encode({"type": "req", "id": rid, "method": method, "params": params})
        if len(data) > conn.max_payload:
            raise FrameTooLarge(len(data), conn.max_payload)
        queue: asyncio.Queue[dict[str, Any] | ConnectionLost] = asyncio.Queue()
        conn.pending[rid] = queue
        try:
            async with self._send_lock:
                await conn.ws.send_str(data.decode())
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
            conn.pending.pop(rid, None)
            raise ConnectionLost(_code(conn.ws.close_code), f"{type(e).__name__}: {e}") from None
        return Call(conn, rid, queue)

    async def rpc(
        self, conn: Connection, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """A request with one answer: its payload, or :class:`GatewayError`."""
        call = await self.request(conn, method, params)
        try:
            frame = await call.next(timeout)
        finally:
            call.close()
        return ok_payload(frame)

    @contextlib.asynccontextmanager
    async def subscribe(self, run_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """``chat``/``agent`` events of one run, while the context is open."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._runs.setdefault(run_id, set()).add(q)
        try:
            yield q
        finally:
            subs = self._runs.get(run_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    del self._runs[run_id]


def ok_payload(frame: dict[str, Any]) -> dict[str, Any]:
    payload = frame.get("payload")
    payload = payload if isinstance(payload, dict) else {}
    if not frame.get("ok"):
        err = frame.get("error")
        raise GatewayError(err if isinstance(err, dict) else {}, payload)
    return payload


# -- reading answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a finished run said: the text to send home (may be empty: the agent chose silence)."""

    run_id: str
    text: str


def final_answer(payload: dict[str, Any], run_id: str) -> Answer:
    """The answer in an ``agent`` final response payload (``status: ok``); RunEnded otherwise."""
    status = payload.get("status")
    if status != "ok":
        why = payload.get("summary") or payload.get("error") or payload.get("stopReason") or "no reason given"
        if status == "timeout":
            raise RunEnded(f"the agent run was aborted ({payload.get('stopReason') or 'timeout'}): {why}")
        raise RunEnded(f"the agent run failed ({status}): {why}")
    result = payload.get("result")
    payloads = result.get("payloads") if isinstance(result, dict) else None
    texts: list[str] = []
    errors: list[str] = []
    for p in payloads if isinstance(payloads, list) else []:
        if not isinstance(p, dict):
            continue
        text = p.get("text") if isinstance(p.get("text"), str) else ""
        media = p.get("mediaUrl")
        if isinstance(media, str) and media:
            text = "\n".join(x for x in (text, f"[media: {media}]") if x)
        urls = p.get("mediaUrls")
        for u in urls if isinstance(urls, list) else []:
            if isinstance(u, str) and u and u != media:
                text = "\n".join(x for x in (text, f"[media: {u}]") if x)
        if not text:
            continue
        (errors if p.get("isError") else texts).append(text)
    if errors and not texts:
        raise RunEnded(f"the agent run failed: {' / '.join(errors)}")
    return Answer(run_id, "\n\n".join(texts))


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    return ""


@dataclass(frozen=True)
class HistoryMatch:
    """What ``chat.history`` says about our turn.

    ``answer``: the final assistant message of our run (or of the gateway's re-run of it);
    ``seen``: our user message is in the transcript (the gateway owns the turn);
    ``recovery_run``: the run id of the gateway's own re-run after a restart, if one started.
    """

    answer: Answer | None = None
    seen: bool = False
    recovery_run: str | None = None
    failed: str | None = None


def _meta(m: dict[str, Any]) -> dict[str, Any]:
    meta = m.get("__openclaw")
    return meta if isinstance(meta, dict) else {}


def _user_key(m: dict[str, Any]) -> str:
    return str(m.get("idempotencyKey") or _meta(m).get("idempotencyKey") or "")


def _is_recovery(m: dict[str, Any]) -> bool:
    prov = m.get("provenance")
    return isinstance(prov, dict) and prov.get("sourceTool") == RECOVERY_TOOL


_NOT_FINAL = ("toolUse", "tool_use", "tool_calls")
_FAILED = ("error", "aborted")


def find_in_history(messages: list[Any], keys: list[str]) -> HistoryMatch:
    """Our turn in a transcript: the user message keyed ``<key>:user`` for one of ``keys`` (all the
    idempotency keys this delivery used), the assistant messages of those runs or of the gateway's
    restart re-run that follows it, up to the next ordinary user message."""
    msgs = [m for m in messages if isinstance(m, dict)]
    users = {f"{k}:user" for k in keys}
    runs = set(keys)
    start = None
    for i, m in enumerate(msgs):
        if m.get("role") == "user" and _user_key(m) in users:
            start = i
    candidates: list[tuple[str, dict[str, Any]]] = []
    recovery: str | None = None
    if start is not None:
        for m in msgs[start + 1 :]:
            role = m.get("role")
            if role == "user":
                if _is_recovery(m):
                    recovery = _user_key(m).removesuffix(":user") or None
                    if recovery:
                        runs.add(recovery)
                    continue
                if _user_key(m) in users:
                    continue
                break  # the next turn
            if role == "assistant" and str(_meta(m).get("runId") or "") in runs:
                candidates.append((str(_meta(m).get("runId")), m))
    else:  # our user message is out of the window: an assistant message of our run still counts
        candidates = [
            (str(_meta(m).get("runId")), m)
            for m in msgs
            if m.get("role") == "assistant" and str(_meta(m).get("runId") or "") in runs
        ]
    for run_id, m in reversed(candidates):
        if m.get("stopReason") in _NOT_FINAL:
            continue
        text = message_text(m).strip()
        if m.get("stopReason") in _FAILED or m.get("errorMessage"):
            return HistoryMatch(
                None,
                True,
                recovery,
                f"the agent run failed: {m.get('errorMessage') or text or m.get('stopReason')}",
            )
        return HistoryMatch(Answer(run_id, text), True, recovery)
    return HistoryMatch(None, start is not None, recovery)
