"""Envelopes for the relay benchmarks, published exactly as an inbound does (the bus's publish Lua).

* :func:`prefill` (in the harness): N envelopes put on the inbound stream before the relay starts,
  pipelined, each its own publish-with-dedupe Lua call — the backlog a drain is timed on.
* ``python -m bench.producer --rate R --seconds S`` (its own process): an open-loop producer,
  R envelopes a second whatever the bridge does, each stamped ``received_at`` just before its publish;
  the receiver's arrival minus that stamp is the added latency.

The envelopes look like a WeCom app text message after ``wecom_app`` parsed it (sender, direct
conversation, meta and the raw decrypted fields), spread over ``conversations`` conversations.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bridge.bus import Keys
from bridge.envelope import Conversation, Envelope, Sender, encode, stable_id
from bridge.scripts import PUBLISH_MANY


def envelope(source: str, n: int, conversations: int, run: str) -> Envelope:
    user = f"user{n % conversations:05d}"
    msg_id = f"{run}{n:09d}"
    text = f"message {n}: the quick brown fox jumps over the lazy dog"
    now = time.time()
    raw = {
        "ToUserName": "ww0123456789abcdef",
        "FromUserName": user,
        "CreateTime": str(int(now)),
        "MsgType": "text",
        "Content": text,
        "MsgId": msg_id,
        "AgentID": "1000002",
    }
    return Envelope(
        id=stable_id(source, "msg", msg_id),
        source=source,
        conversation=Conversation(user, "direct"),
        sender=Sender(user),
        text=text,
        meta={"to": "ww0123456789abcdef", "agent_id": "1000002", "msg_type": "text", "msg_id": msg_id},
        raw=raw,
        created_at=float(int(now)),
        received_at=now,
    )


def publish_args(keys: Keys, env: Envelope, maxlen: int, ttl: int = 86_400) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of publish_many.lua for one envelope (the bus batches several in one call)."""
    return [keys.inbound, keys.seen(env.source, env.id)], [maxlen, encode(env), ttl]


def prefill(
    redis_url: str,
    prefix: str,
    n: int,
    *,
    source: str = "in",
    conversations: int = 1000,
    maxlen: int = 1_000_000,
    stream: str | None = None,
    run: str = "p",
) -> float:
    """Publish ``n`` envelopes (pipelined Lua calls, 1,000 a round trip); returns the seconds it took."""
    import redis

    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_url)
    script = r.register_script(PUBLISH_MANY)
    t0 = time.perf_counter()
    try:
        for start in range(0, n, 1000):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + 1000)):
                env = envelope(source, i, conversations, run)
                k, a = publish_args(keys, env, maxlen)
                if stream is not None:
                    k[0] = stream
                script(keys=k, args=a, client=pipe)
            pipe.execute()
    finally:
        r.close()
    return time.perf_counter() - t0


async def open_loop(
    redis_url: str, prefix: str, rate: float, seconds: float, conversations: int, source: str, run: str
) -> dict[str, Any]:
    """Publish at ``rate``/s for ``seconds``; every 1 ms tick sends what is due (one pipeline)."""
    import redis.asyncio as aioredis

    keys = Keys(prefix)
    r = aioredis.Redis.from_url(redis_url)
    sha = await r.script_load(PUBLISH_MANY)  # then EVALSHA in pipelines: one round trip a tick
    n = 0
    total = int(rate * seconds)
    t0 = time.perf_counter()
    late = 0.0
    try:
        while n < total:
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            if due > n:
                pipe = r.pipeline(transaction=False)
                for i in range(n, due):
                    env = envelope(source, i, conversations, run)
                    k, a = publish_args(keys, env, 1_000_000)
                    pipe.evalsha(sha, len(k), *k, *a)
                await pipe.execute()
                n = due
            expected = n / rate
            now = time.perf_counter() - t0
            late = max(late, now - expected)
            if expected > now:
                await asyncio.sleep(min(0.001, expected - now))
            else:
                await asyncio.sleep(0)
    finally:
        await r.aclose()
    elapsed = time.perf_counter() - t0
    return {"published": n, "seconds": elapsed, "rate": n / elapsed, "max_behind_s": late}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--source", default="in")
    ap.add_argument("--run", default="r")
    a = ap.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    res = runner(open_loop(a.redis_url, a.prefix, a.rate, a.seconds, a.conversations, a.source, a.run))
    print(res, flush=True)


if __name__ == "__main__":
    main()
