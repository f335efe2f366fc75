"""pairing_issue.lua called directly (through bridge.pairing.Pairing), against real Redis."""

from __future__ import annotations

from typing import Any

from bridge.pairing import CODE_LEN, Pairing, PairingError


async def test_issue_reuses_the_code_until_it_expires_and_caps_pending(redis: Any, prefix: str) -> None:
    p = Pairing(redis, prefix)
    a = await p.issue("i", "alice", ttl=60, max_pending=2)
    assert a.status == "new" and len(a.code) == CODE_LEN
    again = await p.issue("i", "alice", ttl=60, max_pending=2)
    assert (again.status, again.code, again.expires_ms) == ("existing", a.code, a.expires_ms)
    b = await p.issue("i", "bob", ttl=60, max_pending=2)
    assert b.status == "new" and b.code != a.code
    assert (await p.issue("i", "carol", ttl=60, max_pending=2)).status == "full"
    assert (await p.issue("other", "carol", ttl=60, max_pending=2)).status == "new"  # per inbound
    # an expired code makes room, and its sender gets a new one
    await redis.hset(p.keys.pending("i"), "alice", f"{a.code}|1")
    assert (await p.issue("i", "carol", ttl=60, max_pending=2)).status == "new"
    assert [x.sender for x in await p.pending() if x.inbound == "i"] == ["bob", "carol"]
    inbound, sender = await p.approve(b.code)
    assert (inbound, sender) == ("i", "bob")
    assert (await p.issue("i", "bob", ttl=60, max_pending=2)).status == "paired"
    assert await p.is_paired("i", "bob") and not await p.is_paired("other", "bob")


async def test_a_taken_candidate_is_drawn_again(redis: Any, prefix: str) -> None:
    p = Pairing(redis, prefix)
    res = await p._issue(
        keys=[p.keys.pending("i"), p.keys.code("AAAAAAAA"), p.keys.paired("i")],
        args=["x", "AAAAAAAA", 60_000, 10, "i\x1fx"],
    )
    assert res[0] == b"new"
    res = await p._issue(
        keys=[p.keys.pending("i"), p.keys.code("AAAAAAAA"), p.keys.paired("i")],
        args=["y", "AAAAAAAA", 60_000, 10, "i\x1fy"],
    )
    assert res[0] == b"taken"
    assert await redis.hget(p.keys.pending("i"), "y") is None


async def test_approve_is_rate_limited_and_checks_the_code(redis: Any, prefix: str) -> None:
    p = Pairing(redis, prefix)
    for bad in ("short", "AAAA-AAA1", "ILOVEYOU"):  # 1, I and O are not in the alphabet
        try:
            await p.approve(bad)
        except PairingError as e:
            assert "not a pairing code" in str(e)
        else:
            raise AssertionError(bad)
    errors = []
    for _ in range(12):
        try:
            await p.approve("AAAAAAAA")
        except PairingError as e:
            errors.append(str(e))
    assert errors[0] == "no such code (wrong, expired or already used)"
    assert any(e.startswith("too many approve attempts") for e in errors)


async def test_revoke_removes_the_pairing_and_a_waiting_code(redis: Any, prefix: str) -> None:
    p = Pairing(redis, prefix)
    a = await p.issue("i", "alice", ttl=60, max_pending=5)
    assert await p.revoke("alice") == ["i"]
    assert await redis.get(p.keys.code(a.code)) is None
    b = await p.issue("i", "bob", ttl=60, max_pending=5)
    await p.approve(b.code)
    assert await p.paired() == {"i": ["bob"]}
    assert await p.revoke("bob", "i") == ["i"] and not await p.is_paired("i", "bob")
    assert await p.revoke("nobody") == []
