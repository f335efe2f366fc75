"""The access-token cache's scripts (``adapters/wechat/lua/``), each called directly against real Redis."""

from __future__ import annotations

from typing import Any

from adapters.wechat.tokens import LUA
from bridge.lua import source


async def run(redis: Any, name: str, keys: list[str], args: list[Any]) -> Any:
    return await redis.eval(source(name, LUA), len(keys), *keys, *args)


async def test_token_store_caches_and_frees_our_lock(redis: Any, prefix: str) -> None:
    tok, lock = f"{prefix}:tok", f"{prefix}:tok:lock"
    await redis.set(lock, "me", px=20_000)
    assert await run(redis, "token_store", [tok, lock], ["100 abc", 5_000, "me"]) == 1
    assert await redis.get(tok) == b"100 abc"
    assert 0 < await redis.pttl(tok) <= 5_000
    assert await redis.get(lock) is None


async def test_token_store_leaves_a_lock_another_fetcher_took(redis: Any, prefix: str) -> None:
    tok, lock = f"{prefix}:tok", f"{prefix}:tok:lock"
    await redis.set(lock, "other", px=20_000)  # ours expired; another fetcher holds it now
    assert await run(redis, "token_store", [tok, lock], ["100 abc", 5_000, "me"]) == 1
    assert await redis.get(tok) == b"100 abc"
    assert await redis.get(lock) == b"other"


async def test_lock_release_frees_only_our_lock(redis: Any, prefix: str) -> None:
    lock = f"{prefix}:lock"
    await redis.set(lock, "other")
    assert await run(redis, "lock_release", [lock], ["me"]) == 0
    assert await redis.get(lock) == b"other"
    await redis.set(lock, "me")
    assert await run(redis, "lock_release", [lock], ["me"]) == 1
    assert await redis.get(lock) is None
    assert await run(redis, "lock_release", [lock], ["me"]) == 0  # gone: nothing to free


async def test_token_drop_forgets_only_the_rejected_token(redis: Any, prefix: str) -> None:
    tok = f"{prefix}:tok"
    assert await run(redis, "token_drop", [tok], ["abc"]) == 0  # nothing cached
    await redis.set(tok, "100 fresh")  # another process stored a new token meanwhile
    assert await run(redis, "token_drop", [tok], ["abc"]) == 0
    assert await redis.get(tok) == b"100 fresh"
    await redis.set(tok, "100 abc")
    assert await run(redis, "token_drop", [tok], ["ab"]) == 0  # a prefix is not the token
    assert await run(redis, "token_drop", [tok], ["abc"]) == 1
    assert await redis.get(tok) is None
    await redis.set(tok, "malformed")  # no separator: never dropped by mistake
    assert await run(redis, "token_drop", [tok], ["malformed"]) == 0
