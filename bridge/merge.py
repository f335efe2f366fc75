"""Bursts: rapid messages of one sender in one conversation become one agent turn.

With ``merge_window`` (seconds, per inbound; 0 = off, the default) the router holds a message that
passed the access gate instead of routing it, and keeps adding the same sender's next messages in
that conversation while each comes within ``merge_window`` of the one before (by the envelopes'
``received_at``). The burst is routed as one envelope (texts joined by newlines, attachments in
order, id stable in the parts' ids) when the window passes, when someone else writes in that
conversation, or when a ``/word`` comes — so the conversation's order holds.

Nothing is lost: the held entries stay pending in the router's consumer group, unacknowledged, and
are acknowledged only with the merged delivery's write (the router's next cycle). A router that dies
mid-window reads them again in its next life and merges them again into the same envelope id, whose
deliveries the runner's idempotency markers keep from being sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from bridge.commands import command_word
from bridge.envelope import Envelope, stable_id

#: meta key: how many messages a merged envelope carries
MERGED = "merged"


@dataclass
class _Burst:
    sender: str | None
    entries: list[str] = field(default_factory=list)
    envs: list[Envelope] = field(default_factory=list)

    @property
    def last(self) -> float:
        return self.envs[-1].received_at


Ready = tuple[list[str], Envelope]


def merged(envs: list[Envelope]) -> Envelope:
    """One envelope for a burst (a burst of one is that envelope)."""
    if len(envs) == 1:
        return envs[0]
    first, last = envs[0], envs[-1]
    return msgspec.structs.replace(
        first,
        id=stable_id("merged", *(e.id for e in envs)),
        text="\n".join(e.text for e in envs if e.text),
        attachments=[a for e in envs for a in e.attachments],
        mentions=list(dict.fromkeys(m for e in envs for m in e.mentions)),
        mentions_me=any(e.mentions_me for e in envs),
        received_at=last.received_at,
        meta={**first.meta, **last.meta, MERGED: str(len(envs))},
        raw=None,
    )


class Merger:
    def __init__(self, windows: dict[str, float]) -> None:
        self.windows = {k: v for k, v in windows.items() if v > 0}
        self._held: dict[tuple[str, str], _Burst] = {}

    def merges(self, env: Envelope) -> bool:
        return env.kind == "message" and env.source in self.windows

    def before(self, env: Envelope) -> list[Ready]:
        """Bursts to route before ``env`` is judged: its conversation's, unless ``env`` joins it."""
        key = (env.source, env.conversation.id)
        burst = self._held.get(key)
        if burst is None or self._joins(burst, env):
            return []
        del self._held[key]
        return [(burst.entries, merged(burst.envs))]

    def _joins(self, burst: _Burst, env: Envelope) -> bool:
        sender = env.sender.id if env.sender else None
        return (
            env.kind == "message"
            and sender == burst.sender
            and env.received_at - burst.last < self.windows[env.source]
            and command_word(env.text) is None
        )

    def hold(self, entry: str, env: Envelope) -> None:
        """Hold a message that passed the gate (after :meth:`before`)."""
        key = (env.source, env.conversation.id)
        burst = self._held.get(key)
        if burst is None:
            burst = self._held[key] = _Burst(env.sender.id if env.sender else None)
        burst.entries.append(entry)
        burst.envs.append(env)

    def due(self, now: float) -> list[Ready]:
        """Bursts whose window has passed, oldest first."""
        out = []
        for key, b in sorted(self._held.items(), key=lambda kv: kv[1].last):
            if now - b.last >= self.windows[key[0]]:
                out.append((b.entries, merged(b.envs)))
                del self._held[key]
        return out

    def next_due(self, now: float) -> float | None:
        """Seconds until the next burst is due (None: nothing held)."""
        if not self._held:
            return None
        return max(0.0, min(b.last + self.windows[k[0]] - now for k, b in self._held.items()))
