"""DM pairing: a one-time code for an unknown sender, approved by an operator from the CLI.

Under ``dm_policy = "pairing"`` a direct message from a sender who is neither allowed nor paired is
not routed; the sender gets a code (``pairing_reply``, rate-limited like a refusal). The operator runs
``wechat-bridge pairing approve CODE``; from the next message on that sender passes. Everything lives
in Redis, so every instance sees the same codes and approvals and a restart loses none:

==========================================  ===================================================
``P:{access}:pending:<inbound>``            hash: sender → ``<code>|<expires ms>`` (codes waiting)
``P:{access}:code:<CODE>``                  ``<inbound>\\x1f<sender>``, expiring with the code
``P:{access}:paired:<inbound>``             set: approved senders
``P:{access}:approve``                      GCRA of ``approve`` attempts (guessing is slow)
``P:{access}:refusal:<inbound>:<sender>``   GCRA of refusal and pairing answers to one sender
==========================================  ===================================================

A code is 8 characters from a 32-letter alphabet (2**40 codes); at most ``max_pending`` are valid per
inbound at once and ``approve`` takes :data:`APPROVE_RATE`, so guessing one takes years.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from bridge.config import Rate
from bridge.lua import source
from bridge.ratelimit import Limit, Limiter

PAIRING_ISSUE = source("pairing_issue")
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LEN = 8
#: approve attempts, from every CLI at once: 10 a minute, up to 10 at a time
APPROVE_RATE = Rate(10, 60.0)
APPROVE_BURST = 10


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LEN))


def normal_code(code: str) -> str:
    return code.strip().upper().replace("-", "").replace(" ", "")


class AccessKeys:
    """Key names of the access gate (one hash slot: ``{access}``)."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}:{{access}}"

    def pending(self, inbound: str) -> str:
        return f"{self.base}:pending:{inbound}"

    def code(self, code: str) -> str:
        return f"{self.base}:code:{code}"

    def paired(self, inbound: str) -> str:
        return f"{self.base}:paired:{inbound}"

    @property
    def approve(self) -> str:
        return f"{self.base}:approve"

    def refusal(self, inbound: str, sender: str) -> str:
        return f"{self.base}:refusal:{inbound}:{sender}"


@dataclass(frozen=True, slots=True)
class Issued:
    """What :meth:`Pairing.issue` found: ``status`` is new, existing, paired or full."""

    status: str
    code: str = ""
    expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class Pending:
    inbound: str
    sender: str
    code: str
    expires_ms: int


class PairingError(Exception):
    """An operator's pairing command that cannot be done (the message says why)."""


class Pairing:
    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.keys = AccessKeys(prefix)
        self._issue = redis.register_script(PAIRING_ISSUE)
        self._limiter = Limiter(redis)

    async def is_paired(self, inbound: str, sender: str) -> bool:
        return bool(await self.redis.sismember(self.keys.paired(inbound), sender))

    async def issue(self, inbound: str, sender: str, *, ttl: int, max_pending: int) -> Issued:
        """The sender's code (``pairing_issue.lua``): the same one until it expires."""
        for _ in range(8):
            code = new_code()
            res = await self._issue(
                keys=[self.keys.pending(inbound), self.keys.code(code), self.keys.paired(inbound)],
                args=[sender, code, ttl * 1000, max_pending, f"{inbound}\x1f{sender}"],
            )
            status, got, expires = (x.decode() if isinstance(x, bytes) else str(x) for x in res)
            if status != "taken":
                return Issued(status, got, int(expires))
        raise RuntimeError("pairing: no free code after 8 draws")

    async def pending(self) -> list[Pending]:
        """Codes waiting for approval, every inbound (expired ones left out)."""
        out: list[Pending] = []
        now_s, now_us = await self.redis.time()
        now = int(now_s) * 1000 + int(now_us) // 1000
        async for key in self.redis.scan_iter(match=self.keys.pending("*"), count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            inbound = name[len(self.keys.pending("")) :]
            for sender, value in (await self.redis.hgetall(key)).items():
                code, _, exp = value.decode().partition("|")
                if int(exp) > now:
                    out.append(Pending(inbound, sender.decode(), code, int(exp)))
        return sorted(out, key=lambda p: (p.inbound, p.expires_ms))

    async def paired(self) -> dict[str, list[str]]:
        """Approved senders by inbound."""
        out: dict[str, list[str]] = {}
        async for key in self.redis.scan_iter(match=self.keys.paired("*"), count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            members = await self.redis.smembers(key)
            out[name[len(self.keys.paired("")) :]] = sorted(m.decode() for m in members)
        return out

    async def approve(self, code: str) -> tuple[str, str]:
        """Pair the sender who got ``code``: (inbound, sender). Every attempt is rate-limited."""
        wait = await self._limiter.acquire([Limit(self.keys.approve, APPROVE_RATE, APPROVE_BURST)])
        if wait > 0:
            raise PairingError(f"too many approve attempts; try again in {wait:.0f} s")
        code = normal_code(code)
        if len(code) != CODE_LEN or any(c not in ALPHABET for c in code):
            raise PairingError(f"not a pairing code: {CODE_LEN} letters and digits, as the sender got it")
        value = await self.redis.get(self.keys.code(code))
        if value is None:
            raise PairingError("no such code (wrong, expired or already used)")
        inbound, _, sender = value.decode().partition("\x1f")
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.code(code))
        pipe.sadd(self.keys.paired(inbound), sender)
        pipe.hdel(self.keys.pending(inbound), sender)
        await pipe.execute()
        return inbound, sender

    async def revoke(self, sender: str, inbound: str | None = None) -> list[str]:
        """Unpair ``sender`` (on one inbound, or all); the inbounds it was paired on."""
        found: list[str] = []
        names = (
            [inbound]
            if inbound is not None
            else sorted({*await self.paired(), *await self._pending_inbounds()})
        )
        for name in names:
            if await self.redis.srem(self.keys.paired(name), sender):
                found.append(name)
            value = await self.redis.hget(self.keys.pending(name), sender)
            if value is not None:  # its waiting code goes too: approving it later pairs nobody
                await self.redis.delete(self.keys.code(value.decode().partition("|")[0]))
                await self.redis.hdel(self.keys.pending(name), sender)
                found.append(name)
        return sorted(set(found))

    async def _pending_inbounds(self) -> set[str]:
        head = len(self.keys.pending(""))
        return {
            (k.decode() if isinstance(k, bytes) else k)[head:]
            async for k in self.redis.scan_iter(match=self.keys.pending("*"), count=1000)
        }
