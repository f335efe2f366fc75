"""Session commands, answered by the bridge itself and never passed to the agent.

Recognised in the text of any inbound's message (after the gate let it through): ``/new`` (aka
``/reset``), ``/status``, ``/stop`` and ``/help``; names and ``admins_only`` per command come from
``[commands]`` (:class:`bridge.config.CommandsSection`). A word starting with ``/`` that is no
command's name goes to the agent as text. In a group, a command counts only when the message
mentions the bot where a route of that inbound has ``mentions_only`` on (else it is routed as usual,
and ``mentions_only`` drops it). The answer goes back through the inbound's ``reply_via``.

``/new`` moves the conversation to a new session generation, a counter in Redis
(``P:{session}:<inbound>:<conversation>``). The router stamps the current generation on every
message it routes to a sink that keeps sessions (``Sink.keeps_sessions``; ``meta["session_gen"]``,
one MGET per batch, in order: a message routed before ``/new`` stays on the old session); the sink
(OpenClaw) makes it part of the session key, so the next turn starts afresh. ``/status`` and
``/stop`` ask the sinks the message would reach, through the optional :class:`SessionControl`
methods of :class:`bridge.adapter.Sink`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec

from bridge import logging as blog
from bridge.bus import RUNNER_GROUP, Bus
from bridge.config import CommandSpec, Config
from bridge.envelope import Delivery, Envelope

log = blog.get("commands")

#: envelope meta key: the conversation's session generation when the router routed it
SESSION_GEN = "session_gen"
#: seconds /stop waits for a sink to abort its turn
STOP_TIMEOUT = 10.0

_LEAD = re.compile(r"^\s*(?:@\S+\s+)*(/\S+)")

HELP = {
    "new": "start a new conversation (the agent forgets the earlier messages)",
    "status": "which agent and session this conversation is on, and the queue",
    "stop": "stop the agent's answer in progress",
    "help": "this list",
}


class SessionControl(Protocol):
    """What a sink may tell about, or do to, the agent session of a delivery (both optional)."""

    def session_of(self, delivery: Delivery) -> str | None: ...

    async def stop_turn(self, delivery: Delivery) -> str | None: ...


Answer = Callable[..., Delivery | None]
Planner = Callable[[Envelope], list[Delivery]]


def command_word(text: str) -> str | None:
    """The leading ``/word`` of a text (after any ``@name`` mentions), lowercased; None if none."""
    m = _LEAD.match(text)
    return m.group(1).lower() if m else None


class Commands:
    def __init__(
        self, config: Config, bus: Bus, sinks: Mapping[str, SessionControl], answer: Answer,
        plan: Planner,
    ) -> None:  # fmt: skip
        self.config = config
        self.plan = plan
        self.bus = bus
        self.sinks = sinks
        self.answer = answer
        c = config.commands
        self.by_name: dict[str, tuple[str, CommandSpec]] = {}
        if c.enabled:
            for key in ("new", "status", "stop", "help"):
                spec: CommandSpec = getattr(c, key)
                if spec.enabled:
                    self.by_name.update({n.lower(): (key, spec) for n in spec.names})
        #: sources routed to a sink that keeps agent sessions: their messages carry the generation
        self._stamped = {
            src
            for r in config.routes
            if any(getattr(sinks.get(t.sink), "keeps_sessions", False) for t in r.to)
            for src in r.sources
        } if c.enabled and c.new.enabled else set()  # fmt: skip
        self._needs_mention = {
            src for r in config.routes if r.match.mentions_only for src in r.sources
        }  # fmt: skip
        self._gens: dict[str, int] = {}
        #: commands answered so far (by this instance)
        self.answered = 0

    def gen_key(self, env: Envelope) -> str:
        return f"{self.bus.keys.prefix}:{{session}}:{env.source}:{env.conversation.id}"

    async def load(self, envs: Sequence[Envelope]) -> None:
        """Read the generations of a batch's conversations (one MGET), for :meth:`stamp`."""
        self._gens = {}
        keys = list(dict.fromkeys(self.gen_key(e) for e in envs if e.source in self._stamped))
        if not keys:
            return
        values = await self.bus.redis.mget(keys)
        self._gens = {k: int(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def stamp(self, env: Envelope) -> None:
        """Write the conversation's generation on a message about to be routed (in batch order, so a
        ``/new`` earlier in the batch counts)."""
        if env.source not in self._stamped:
            return
        gen = self._gens.get(self.gen_key(env), 0)
        if gen:
            env.meta = {**env.meta, SESSION_GEN: str(gen)}
        elif SESSION_GEN in env.meta:
            env.meta = {k: v for k, v in env.meta.items() if k != SESSION_GEN}

    def parse(self, env: Envelope) -> tuple[str, CommandSpec, str] | None:
        if not self.by_name:
            return None
        word = command_word(env.text)
        if word is None or word not in self.by_name:
            return None
        if env.conversation.kind == "group" and env.source in self._needs_mention and not env.mentions_me:
            return None
        key, spec = self.by_name[word]
        return key, spec, word

    async def handle(self, env: Envelope, *, admin: bool) -> list[Delivery] | None:
        """None: not a command, route it. Else the answers (the command itself is not routed)."""
        found = self.parse(env)
        if found is None:
            return None
        key, spec, word = found
        sender = env.sender.id if env.sender else None
        log.info("command.received", source=env.source, envelope=env.id, command=key, sender=sender,
                 conversation=env.conversation.id)  # fmt: skip
        if spec.admins_only and not admin:
            text = f"{word} is for admins only."
        else:
            text = await getattr(self, f"_{key}")(env)
        self.answered += 1
        d = self.answer(env, text, f"command:{key}")
        return [d] if d else []

    # -- the commands ---------------------------------------------------------------------------

    async def _new(self, env: Envelope) -> str:
        key = self.gen_key(env)
        gen = int(await self.bus.redis.incr(key))
        self._gens[key] = gen  # later messages of this batch go to the new session
        log.info("command.new_session", source=env.source, conversation=env.conversation.id, gen=gen)
        return "New conversation started: the agent will not see the earlier messages."

    def _targets(self, env: Envelope) -> list[tuple[Delivery, SessionControl]]:
        # the routes a plain message of this conversation takes (a text pattern may want the text)
        out = []
        probe, same = msgspec.structs.replace(env, text=""), msgspec.structs.replace(env)
        self.stamp(probe)  # on the session its next message would go to
        self.stamp(same)
        for d in self.plan(probe) or self.plan(same):
            sink = self.sinks.get(d.sink)
            if sink is not None:
                out.append((d, sink))
        return out

    async def _queue(self, sink: str) -> int:
        """Deliveries of ``sink`` read and not sent yet, or not read yet, over all its partitions."""
        total = 0
        for stream in self.bus.out_streams(sink):
            if not await self.bus.redis.exists(stream):  # nothing sent there yet
                continue
            for g in await self.bus.redis.xinfo_groups(stream):
                name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                if name == RUNNER_GROUP:
                    total += int(g.get("pending") or 0) + int(g.get("lag") or 0)
        return total

    async def _status(self, env: Envelope) -> str:
        gen = int(await self.bus.redis.get(self.gen_key(env)) or 0)
        lines = [f"Conversation {env.conversation.id} ({env.conversation.kind}), session #{gen}."]
        targets = self._targets(env)
        if not targets:
            lines.append("No route takes this conversation's messages anywhere.")
        for d, sink in targets:
            about = sink.session_of(d)
            queue = await self._queue(d.sink)
            lines.append(f"{d.sink}: {about or 'no agent session'}; {queue} waiting in its queue.")
        return "\n".join(lines)

    async def _stop(self, env: Envelope) -> str:
        said: list[str] = []
        for d, sink in self._targets(env):
            try:
                said_here = await asyncio.wait_for(sink.stop_turn(d), STOP_TIMEOUT)
            except TimeoutError:
                said_here = f"{d.sink}: no answer from the agent's gateway within {STOP_TIMEOUT:g} s"
            except Exception as e:
                log.warning("command.stop_failed", sink=d.sink, error=f"{type(e).__name__}: {e}")
                said_here = f"{d.sink}: could not stop ({type(e).__name__})"
            if said_here:
                said.append(said_here)
        return "\n".join(said) if said else "Nothing to stop: no agent answers this conversation."

    async def _help(self, env: Envelope) -> str:
        lines = ["Commands:"]
        for key, text in HELP.items():
            spec: CommandSpec = getattr(self.config.commands, key)
            if spec.enabled:
                extra = " (admins only)" if spec.admins_only else ""
                lines.append(f"{' / '.join(spec.names)}: {text}{extra}")
        return "\n".join(lines)
