"""``openclaw``: each WeChat message becomes a turn of an OpenClaw agent; its answer goes home.

One session per WeChat conversation (``session_key``, a template; adapters/openclaw/prompt.py makes
it safe under the gateway's lowercasing), one agent per sink or per route (``agent``,
``route_agents``). The answer is published with ``ctx.reply`` as a ``reply`` envelope; a route with
``reply = true`` sends it to the origin conversation through the origin inbound's ``reply_via`` sink,
which splits it for its platform. While the agent writes, its text so far is recorded as the origin
message's draft when that message has a stream (a WeCom AI bot shows it).

**WebSocket mode** (default, adapters/openclaw/gateway.py): ``agent`` with ``idempotencyKey`` = the
delivery id (the gateway's ``runId`` is that key). Re-sending a key the gateway still remembers (5
minutes after the run) gives the cached answer or ``in_flight`` (then ``agent.wait``): a retried
delivery does not run the agent twice. Every re-send first looks for the answer in ``chat.history``,
so an answer the gateway finished while the connection was down is delivered without a new run.

A gateway **restart** mid-run: the gateway forgets its dedupe cache, refuses the old key
(``SESSION_WORK_START_CHANGED`` / "Pending input ownership ended") and re-runs an interrupted turn
itself, under a new run id, when the user message had reached the transcript. The sink then waits
for that re-run (found in ``chat.history`` by its restart-recovery provenance; ``agent.wait`` on its
run id) and delivers its answer: one reply, no third model call. When the message never reached the
transcript, or no re-run shows up within ``recovery_wait``, the turn is sent again under a derived
key (``<delivery id>-r<n>``). The key generation and the gateway's boot id at sending time are kept
in Redis (``P:{state}:<sink>:run:<delivery>``, 7 days), so this also holds across a restart of the
bridge; a failed run is marked there too, so replaying its dead letter runs the turn afresh.

Errors: a refused token/password, device or protocol → PermanentError and ``/readyz`` says why; the
gateway unreachable → RetryableError (the runner backs off); a run that fails, is aborted or times
out → PermanentError (dead letter with the gateway's reason); a request over the gateway's
``policy.maxPayload`` → PermanentError before sending.

**HTTP mode** (``mode = "http"``, adapters/openclaw/http.py): ``/v1/chat/completions`` with
``x-openclaw-session-key``, streamed. No idempotency key on that route: prefer WebSocket.

Config::

    [[outbound]]
    name = "claw"
    type = "openclaw"
    url = "ws://127.0.0.1:18789"
    token = "${OPENCLAW_GATEWAY_TOKEN}"      # or password = "..."
    agent = "wechat"                          # a restricted agent: see docs/openclaw.md
    concurrency = 4                           # turns at once (one conversation is always in order)
    # mode = "ws"                             # or "http"
    # route_agents = {ops = "ops-agent"}      # per-route agent ids
    # session_key = "wechat:{source}:{conversation}"
    # timeout = 600                           # seconds per run
    # connect_timeout = 30
    # recovery_wait = 120
    # group_template = "{sender} in {group}: {text}"
    # direct_template = "{sender}: {text}"
    # bot_names = ["小助手"]                   # the bot's @names, stripped from messages
    # reply_format = "markdown"
    # stream_drafts = true
    # draft_interval = 0.5
    # extra_system_prompt = "..."
    # device_key = "/var/lib/wechat-bridge/openclaw/device-ed25519.pem"
    # display_name = "wechat-bridge"
    # ready_requires_gateway = false
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec

from adapters.openclaw import prompt
from adapters.openclaw.device import DeviceIdentity
from adapters.openclaw.gateway import (
    KEY_REJECTED_MARKERS,
    Answer,
    Connection,
    ConnectionLost,
    FrameTooLarge,
    GatewayClient,
    GatewayError,
    GatewayRefused,
    NotConnected,
    RunEnded,
    final_answer,
    find_in_history,
    message_text,
    ok_payload,
)
from adapters.openclaw.http import AuthRejected, chat_completion, http_base
from bridge.adapter import Context, SendContext, Sink
from bridge.commands import SESSION_GEN
from bridge.config import Secret
from bridge.envelope import Delivery
from bridge.errors import ConfigError, PermanentError, RetryableError

__all__ = [
    "KeyRejected",
    "OpenClawOptions",
    "OpenClawSink",
    "RunFailedError",
    "run_failure",
    "turn_error",
]

_AGENT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
#: how long the state of a run is kept (as long as the runner's done marker)
STATE_TTL = 7 * 86_400
#: chat.history window searched for a turn's answer
HISTORY_LIMIT = 100
#: new keys one send may move to before it gives the turn back to the runner
MAX_NEW_KEYS = 3
#: seconds a /stop excuses the aborted run (it ends without an answer instead of as a dead letter)
STOPPED_TTL = 600


class OpenClawOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "ws://127.0.0.1:18789"
    token: Secret | None = None
    password: Secret | None = None
    mode: Literal["ws", "http"] = "ws"
    agent: str = "main"
    route_agents: dict[str, str] = {}
    session_key: str = "wechat:{source}:{conversation}"
    timeout: float = 600.0
    connect_timeout: float = 30.0
    recovery_wait: float = 120.0
    group_template: str = "{sender} in {group}: {text}"
    direct_template: str = "{sender}: {text}"
    bot_names: list[str] = []
    reply_format: Literal["markdown", "text"] = "markdown"
    stream_drafts: bool = True
    draft_interval: float = 0.5
    extra_system_prompt: str | None = None
    device_key: str | None = None
    display_name: str = "wechat-bridge"
    ready_requires_gateway: bool = False

    def check(self) -> None:
        if not self.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError("url: expected ws://, wss://, http:// or https://host:port")
        if self.token is None and self.password is None:
            raise ValueError("token: required (or password), as set in gateway.auth on the gateway")
        if self.token is not None and self.password is not None:
            raise ValueError("password: give either token or password, not both")
        secret = self.token if self.token is not None else self.password
        if secret is not None and not secret.reveal().strip():
            raise ValueError(f"{'token' if self.token is not None else 'password'}: must not be empty")
        for where, agent in [
            ("agent", self.agent),
            *((f"route_agents.{k}", v) for k, v in self.route_agents.items()),
        ]:
            if not _AGENT_ID.fullmatch(agent):
                raise ValueError(
                    f"{where}: {agent!r} is not an agent id (lowercase letters, digits, '_', '-')"
                )
        checks: list[tuple[str, Callable[[str], None], str]] = [
            ("session_key", prompt.check_session_template, self.session_key),
            ("group_template", prompt.check_template, self.group_template),
            ("direct_template", prompt.check_template, self.direct_template),
        ]
        for key, check, value in checks:
            try:
                check(value)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        for key in ("timeout", "connect_timeout", "recovery_wait", "draft_interval"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")

    @property
    def secret(self) -> str:
        s = self.token if self.token is not None else self.password
        return s.reveal() if s is not None else ""


class KeyRejected(Exception):
    """The gateway will not start work under this key any more (after its restart): use a new one."""


class OpenClawSink(Sink):
    Options = OpenClawOptions
    options: OpenClawOptions
    default_rate = None
    keeps_sessions = True

    def __init__(self, name: str, options: OpenClawOptions, ctx: Context) -> None:
        super().__init__(name, options, ctx)
        self.client: GatewayClient | None = None
        self._http_problem: str | None = None
        self._probe: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.ctx.config
        routes = {r.name for r in cfg.routes}
        for route in self.options.route_agents:
            if route not in routes:
                raise ConfigError(
                    f"{cfg.path}: outbound.{self.name}.route_agents.{route}: no route named {route!r} "
                    f"(routes: {', '.join(sorted(routes)) or 'none'})"
                )
        o = self.options
        if o.mode == "http":
            self._probe = asyncio.create_task(self._probe_http(), name=f"openclaw-probe:{self.name}")
            return
        path = Path(o.device_key) if o.device_key else self.ctx.data_dir / "openclaw" / "device-ed25519.pem"
        try:
            device = DeviceIdentity.load_or_create(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg.path}: outbound.{self.name}.device_key: {e}") from None
        url = o.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self.client = GatewayClient(
            url,
            token=o.token,
            password=o.password,
            device=device,
            log=self.log,
            http=self.ctx.http,
            display_name=o.display_name,
        )
        self.client.start()
        self.log.info("openclaw.device", device=device.id, path=str(path))

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    async def _probe_http(self) -> None:
        """HTTP mode: check the credentials once at start, so /readyz can tell a bad token early."""
        url = http_base(self.options.url) + "/v1/models"
        headers = {"Authorization": f"Bearer {self.options.secret}"}
        try:
            async with self.ctx.http().get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                if r.status in (401, 403):
                    self._http_problem = (
                        f"the gateway refused the credentials (HTTP {r.status} from {url}); "
                        "check token (or password) of this outbound against gateway.auth on the gateway"
                    )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.log.warning("openclaw.http_probe_failed", url=url, error=f"{type(e).__name__}: {e}")

    async def ready(self) -> str | None:
        if self.options.mode == "http":
            return self._http_problem
        assert self.client is not None
        if self.client.problem:
            return self.client.problem
        if self.options.ready_requires_gateway and (self.client.conn is None or self.client.conn.closed):
            return f"not connected to {self.client.url}: {self.client.last_error}"
        return None

    # -- what a delivery becomes ------------------------------------------------------------------------

    def agent_for(self, d: Delivery) -> str:
        return self.options.route_agents.get(d.route or "", self.options.agent)

    def session_for(self, d: Delivery, agent: str) -> str:
        env = d.envelope
        rest = prompt.session_key(
            self.options.session_key,
            source=env.source,
            conversation=d.conversation or env.conversation.id,
            kind=env.conversation.kind,
            sender=env.sender.id if env.sender else None,
        )
        gen = env.meta.get(SESSION_GEN, "")
        if gen.isdigit() and int(gen) > 0:  # /new moved the conversation to a fresh session
            rest += f":g{int(gen)}"
        return f"agent:{agent}:{rest}"

    # -- session commands (bridge/commands.py) ----------------------------------------------------------

    def session_of(self, delivery: Delivery) -> str | None:
        agent = self.agent_for(delivery)
        return f"agent {agent}, session {self.session_for(delivery, agent)}"

    async def stop_turn(self, delivery: Delivery) -> str | None:
        """``sessions.abort`` on the conversation's session (WebSocket mode only)."""
        session = self.session_for(delivery, self.agent_for(delivery))
        if self.options.mode == "http" or self.client is None:
            return f"{self.name}: cannot stop a turn in HTTP mode (the chat route has no abort)."
        try:
            conn = await self.client.connection(self.options.connect_timeout)
            payload = await self.client.rpc(conn, "sessions.abort", {"key": session}, timeout=10.0)
        except (GatewayRefused, NotConnected, ConnectionLost) as e:
            return f"{self.name}: the agent's gateway is not reachable ({type(e).__name__})."
        except GatewayError as e:
            self.log.warning("openclaw.abort_refused", session=session, code=e.code, error=e.message)
            return f"{self.name}: the gateway refused to stop the turn ({e.code})."
        run = payload.get("abortedRunId")
        if payload.get("status") != "aborted" or not isinstance(run, str) or not run:
            return f"{self.name}: no answer was in progress."
        # the turn's delivery ends quietly instead of as a dead letter (see _send_ws)
        await self.ctx.redis.set(self._stopped_key(run), 1, ex=STOPPED_TTL)
        self.log.info("openclaw.aborted", session=session, run=run)
        return f"{self.name}: stopped the answer in progress."

    def _stopped_key(self, run_id: str) -> str:
        return self.ctx.state_key(self.name, f"stopped:{run_id}")

    def message_for(self, d: Delivery) -> str:
        o = self.options
        try:
            return prompt.shape(
                d.envelope,
                group_template=o.group_template,
                direct_template=o.direct_template,
                bot_names=o.bot_names,
                conversation=d.conversation,
            )
        except ValueError as e:
            raise PermanentError(str(e)) from None

    @staticmethod
    def run_key(delivery_id: str, gen: int) -> str:
        return delivery_id if gen == 0 else f"{delivery_id}-r{gen}"

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        agent = self.agent_for(delivery)
        session = self.session_for(delivery, agent)
        message = self.message_for(delivery)
        if self.options.mode == "http":
            answer = await self._send_http(delivery, ctx, agent, session, message)
        else:
            answer = await self._send_ws(delivery, ctx, agent, session, message)
        await self._deliver(delivery, ctx, answer, session)
        return answer.run_id

    async def _deliver(self, d: Delivery, ctx: SendContext, answer: Answer, session: str) -> None:
        text = answer.text.strip()
        if text:
            await ctx.reply(text, format=self.options.reply_format)
        self.log.info(
            "openclaw.answered",
            delivery=d.id,
            run=answer.run_id,
            session=session,
            chars=len(text),
            silent=not text,
        )

    # -- drafts -----------------------------------------------------------------------------------------

    def _wants_drafts(self, d: Delivery) -> bool:
        return self.options.stream_drafts and bool(d.envelope.meta.get("stream_id"))

    def _drafter(self, ctx: SendContext) -> Callable[[str], Awaitable[None]]:
        loop = asyncio.get_running_loop()
        last = [-math.inf]

        async def draft(text: str) -> None:
            now = loop.time()
            if now - last[0] < self.options.draft_interval or not text.strip():
                return
            last[0] = now
            try:
                await ctx.draft(text)
            except Exception as e:  # a draft is a nicety: never fail the turn for it
                self.log.warning("openclaw.draft_failed", error=f"{type(e).__name__}: {e}")

        return draft

    @contextlib.asynccontextmanager
    async def _drafting(self, d: Delivery, ctx: SendContext, run_id: str) -> AsyncIterator[None]:
        """Write the run's text so far as the origin's draft while the context is open."""
        if not self._wants_drafts(d) or self.client is None:
            yield
            return
        draft = self._drafter(ctx)

        async def pump(q: asyncio.Queue[dict[str, Any]]) -> None:
            while True:
                frame = await q.get()
                p = frame.get("payload")
                if frame.get("event") == "chat" and isinstance(p, dict) and p.get("state") == "delta":
                    msg = p.get("message")
                    if isinstance(msg, dict):
                        await draft(message_text(msg))

        async with self.client.subscribe(run_id) as q:
            task = asyncio.create_task(pump(q), name=f"openclaw-drafts:{run_id}")
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- HTTP mode --------------------------------------------------------------------------------------

    async def _send_http(
        self, d: Delivery, ctx: SendContext, agent: str, session: str, message: str
    ) -> Answer:
        try:
            text = await chat_completion(
                self.ctx.http(),
                base=http_base(self.options.url),
                secret=self.options.secret,
                agent=agent,
                session_key=session,
                message=message,
                timeout=self.options.timeout,
                on_text=self._drafter(ctx) if self._wants_drafts(d) else None,
            )
        except AuthRejected as e:
            self._http_problem = str(e)
            raise
        except TimeoutError:
            raise RetryableError(f"no answer from the gateway within {self.options.timeout:g} s") from None
        self._http_problem = None
        return Answer(d.id, text)

    # -- WebSocket mode ---------------------------------------------------------------------------------

    async def _connection(self) -> Connection:
        assert self.client is not None
        try:
            return await self.client.connection(self.options.connect_timeout)
        except GatewayRefused as e:
            raise PermanentError(str(e)) from None
        except NotConnected as e:
            raise RetryableError(str(e)) from None

    def _params(self, key: str, agent: str, session: str, message: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "message": message,
            "idempotencyKey": key,
            "agentId": agent,
            "sessionKey": session,
            "timeout": max(1, math.ceil(self.options.timeout)),
            "deliver": False,
        }
        if self.options.extra_system_prompt:
            params["extraSystemPrompt"] = self.options.extra_system_prompt
        return params

    async def _send_ws(self, d: Delivery, ctx: SendContext, agent: str, session: str, message: str) -> Answer:
        state_key = self.ctx.state_key(self.name, f"run:{d.id}")
        try:
            return await self._turn(d, ctx, agent, session, message, state_key)
        except RunFailedError:
            gen = int(await self.ctx.redis.hget(state_key, "gen") or 0)
            keys = [self._stopped_key(self.run_key(d.id, g)) for g in range(gen + 1)]
            if any(await self.ctx.redis.mget(keys)):  # a person's /stop aborted it: done, no answer
                self.log.info("openclaw.stopped", delivery=d.id, session=session)
                return Answer(d.id, "")
            await self.ctx.redis.hset(state_key, "failed", 1)  # a replay of the dead letter runs afresh
            raise

    async def _turn(
        self, d: Delivery, ctx: SendContext, agent: str, session: str, message: str, state_key: str
    ) -> Answer:
        """One turn as two named steps until an answer: :attr:`TurnStep.LOOK` (an earlier attempt sent
        it: find its answer, or its recovery run, in the session's history) and :attr:`TurnStep.SEND`
        (send it under the current key and read the answer)."""
        loop = asyncio.get_running_loop()
        state = await self.ctx.redis.hgetall(state_key)
        gen = int(state.get(b"gen", 0)) if state else 0
        turn = _Turn(
            d, ctx, agent, session, message, state_key,
            deadline=loop.time() + self.options.timeout + 30,
            gen=gen,
            first_gen=gen,
            sent_boot=state.get(b"boot", b"").decode() if state else None,
            resend=bool(state),  # an earlier attempt sent this turn: look before sending again
            log=self.log.bind(delivery=d.id, session=session),
        )  # fmt: skip
        if state.get(b"failed"):  # the run failed and was dead-lettered; this is a replay: run again
            turn.gen, turn.first_gen, turn.sent_boot, turn.resend = gen + 1, gen + 1, None, False
        step = TurnStep.LOOK if turn.resend else TurnStep.SEND
        while True:
            if loop.time() > turn.deadline:
                raise RetryableError(f"no answer from the agent within {self.options.timeout:g} s")
            conn = await self._connection()
            outcome = await (self._look(turn, conn) if step is TurnStep.LOOK else self._send_turn(turn, conn))
            if isinstance(outcome, Answer):
                return outcome
            step = outcome

    async def _look(self, turn: _Turn, conn: Connection) -> Answer | TurnStep:
        """The answer of an earlier attempt, or what to do next: look again, or send."""
        loop = asyncio.get_running_loop()
        keys = [self.run_key(turn.d.id, g) for g in range(turn.gen + 1)]
        try:
            match = find_in_history(await self._history(conn, turn.session), keys)
        except ConnectionLost:
            return TurnStep.LOOK
        if match.failed:
            raise RunFailedError(match.failed)
        if match.answer is not None:
            turn.log.info("openclaw.found_in_history", run=match.answer.run_id)
            return match.answer
        restarted = turn.rejected or (turn.sent_boot is not None and turn.sent_boot != conn.boot_id)
        if match.recovery_run:
            # the gateway re-runs the turn its restart interrupted: wait for that run's answer
            turn.log.info("openclaw.awaiting_recovery_run", run=match.recovery_run)
            try:
                async with self._drafting(turn.d, turn.ctx, match.recovery_run):
                    answer = await self._wait(conn, match.recovery_run, turn.deadline, slice_s=30.0)
            except ConnectionLost:
                return TurnStep.LOOK
            return answer if answer is not None else TurnStep.LOOK
        if restarted and match.seen:
            turn.waiting_since = turn.waiting_since if turn.waiting_since is not None else loop.time()
            if loop.time() - turn.waiting_since < self.options.recovery_wait:
                await asyncio.sleep(2.0)
                return TurnStep.LOOK
            turn.log.warning("openclaw.no_recovery_run", waited=self.options.recovery_wait)
            turn.gen += 1
        elif turn.rejected:
            turn.gen += 1  # the turn never reached the transcript and the old key is dead
        if turn.gen - turn.first_gen > MAX_NEW_KEYS:
            raise RetryableError("the gateway keeps refusing new keys for this turn after its restart")
        turn.rejected = False
        turn.waiting_since = None
        return TurnStep.SEND

    async def _send_turn(self, turn: _Turn, conn: Connection) -> Answer | TurnStep:
        """Send the turn under the current key (recorded first) and read its answer."""
        key = self.run_key(turn.d.id, turn.gen)
        params = self._params(key, turn.agent, turn.session, turn.message)
        pipe: Any = self.ctx.redis.pipeline(transaction=True)
        pipe.hset(turn.state_key, mapping={"gen": turn.gen, "boot": conn.boot_id})
        pipe.hdel(turn.state_key, "failed")
        pipe.expire(turn.state_key, STATE_TTL)
        await pipe.execute()
        turn.sent_boot = conn.boot_id
        if turn.resend:
            turn.log.info("openclaw.resend", run=key)
        try:
            async with self._drafting(turn.d, turn.ctx, key):
                return await self._run(conn, key, params, turn.deadline)
        except ConnectionLost as e:
            if e.code == 1009:
                raise PermanentError(
                    f"the gateway closed the connection on this message as too big (1009): {e}"
                ) from None
            turn.log.warning("openclaw.connection_lost", run=key, code=e.code)
        except KeyRejected as e:
            turn.log.warning("openclaw.key_rejected", run=key, reason=str(e))
            turn.rejected = True
        turn.resend = True
        return TurnStep.LOOK

    async def _history(self, conn: Connection, session: str) -> list[Any]:
        assert self.client is not None
        try:
            payload = await self.client.rpc(
                conn, "chat.history", {"sessionKey": session, "limit": HISTORY_LIMIT}, timeout=30.0
            )
        except GatewayError as e:
            raise RetryableError(f"chat.history failed: {e}") from None
        except TimeoutError:
            raise RetryableError("chat.history: no answer within 30 s") from None
        messages = payload.get("messages")
        return messages if isinstance(messages, list) else []

    async def _run(self, conn: Connection, key: str, params: dict[str, Any], deadline: float) -> Answer:
        """Send ``agent`` and read its answers until the final one."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        try:
            call = await self.client.request(conn, "agent", params)
        except FrameTooLarge as e:
            raise PermanentError(f"the message is too large for the gateway: {e}") from None
        try:
            while True:
                try:
                    frame = await call.next(max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise RetryableError(
                        f"no answer from the agent within {self.options.timeout:g} s"
                    ) from None
                try:
                    payload = ok_payload(frame)
                except GatewayError as e:
                    raise turn_error(e) from None
                status = payload.get("status")
                if status == "accepted":
                    continue
                if status == "in_flight":  # a duplicate while the first run goes on: wait for that run
                    answer = await self._wait(conn, str(payload.get("runId") or key), deadline)
                    assert answer is not None
                    return answer
                if status == "error" and any(
                    m in str(payload.get("summary") or "") for m in KEY_REJECTED_MARKERS
                ):
                    raise KeyRejected(str(payload.get("summary")))
                try:
                    return final_answer(payload, str(payload.get("runId") or key))
                except RunEnded as e:
                    raise run_failure(payload, e) from None
        finally:
            call.close()

    async def _wait(
        self, conn: Connection, run_id: str, deadline: float, slice_s: float | None = None
    ) -> Answer | None:
        """``agent.wait`` until the run ends (None after one ``slice_s`` when given and it has not)."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise RetryableError(f"no answer from the agent within {self.options.timeout:g} s")
            step = min(left, slice_s or 60.0)
            try:
                p = await self.client.rpc(
                    conn, "agent.wait", {"runId": run_id, "timeoutMs": int(step * 1000)}, timeout=step + 30
                )
            except GatewayError as e:
                raise turn_error(e) from None
            except TimeoutError:
                raise RetryableError("agent.wait: no answer from the gateway") from None
            status = p.get("status")
            if status == "ok":
                reply = p.get("terminalReply")
                text = reply.get("text") if isinstance(reply, dict) else None
                return Answer(run_id, text if isinstance(text, str) else "")
            if status == "error" or (status == "timeout" and isinstance(p.get("endedAt"), int | float)):
                why = p.get("error") or p.get("stopReason") or status
                raise run_failure(p, RunEnded(f"the agent run failed ({status}): {why}"))
            if slice_s is not None:
                return None


class TurnStep(enum.Enum):
    """Where a turn stands (:meth:`OpenClawSink._turn`)."""

    #: an earlier attempt sent the turn: look for its answer in the session's history first
    LOOK = "look"
    #: send the turn under the current key and read the answer
    SEND = "send"


@dataclass
class _Turn:
    """One delivery's turn, as its steps see and change it."""

    d: Delivery
    ctx: SendContext
    agent: str
    session: str
    message: str
    state_key: str
    #: loop time by which the answer must be in
    deadline: float
    #: the generation of the run key (a new key after a restart lost the turn)
    gen: int
    first_gen: int
    #: the gateway boot the turn was last sent to (None: not sent yet)
    sent_boot: str | None
    #: an earlier attempt sent the turn
    resend: bool
    log: Any
    #: the gateway refused the current key (after its restart)
    rejected: bool = False
    #: loop time the wait for a recovery run began
    waiting_since: float | None = None


class RunFailedError(PermanentError):
    """The agent run failed, was aborted or timed out: a dead letter with the gateway's reason."""


def run_failure(payload: dict[str, Any], e: RunEnded) -> Exception:
    """A run that ended without an answer: dead letter, unless the gateway aborted it to restart."""
    if payload.get("stopReason") == "restart":
        return RetryableError(f"{e} (the gateway is restarting)", retry_after=5.0)
    return RunFailedError(str(e))


def turn_error(e: GatewayError) -> Exception:
    """What an ``ok: false`` answer to ``agent`` / ``agent.wait`` means for the delivery."""
    if e.key_rejected:
        return KeyRejected(str(e))
    if e.payload.get("status") in ("error", "timeout"):  # the run itself failed (an ok:false final)
        return run_failure(
            e.payload, RunEnded(f"the agent run failed: {e.payload.get('summary') or e.message}")
        )
    if e.code == "UNAVAILABLE" or e.retryable:
        return RetryableError(f"the gateway is unavailable: {e.message}", retry_after=e.retry_after or 5.0)
    return PermanentError(f"the gateway refused the turn: {e}")
