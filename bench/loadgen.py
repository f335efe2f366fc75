"""An open-loop HTTP load generator: a fixed request rate whatever the server does (its own process).

    python -m bench.loadgen --port P --requests FILE --rate R --seconds S [--connections C]

Request i is due at ``start + i / R``. It goes out on an idle keep-alive connection; when none is
idle, it waits for one, and that wait counts in its latency: latency = answer time − due time (no
coordinated omission, unlike a closed-loop generator). Prints one JSON line: sent, answered, non-200,
p50/p90/p99/max latency in ms, the rate achieved. uvloop when installed. FILE is bench/ingest.py's
(one "<path?query>\\t<body>" a line), read from line ``--offset`` on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from bench.common import percentile


async def run(port: int, requests: list[bytes], rate: float, seconds: float, conns: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    lat: list[float] = []
    bad = 0
    errors = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(req: bytes, due: float) -> None:
        nonlocal bad, errors
        r, w = await idle.get()
        try:
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await r.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", port)
        else:
            lat.append(loop.time() - due)
            if status != 200:
                bad += 1
        idle.put_nowait((r, w))

    total = int(rate * seconds)
    if total > len(requests):
        raise SystemExit(f"need {total} requests, the file has {len(requests)}")
    start = loop.time() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(requests[i], due))
        pending.add(t)
        t.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    elapsed = loop.time() - start
    lat.sort()
    return {
        "sent": total,
        "answered": len(lat),
        "non_200": bad,
        "errors": errors,
        "rate": round(total / elapsed, 1),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p90_ms": round(percentile(lat, 90) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0,
    }


def load_requests(path: str, offset: int, limit: int) -> list[bytes]:
    out: list[bytes] = []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(out) >= limit:
                break
            target, _, body = line.rstrip(b"\n").partition(b"\t")
            out.append(
                b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--connections", type=int, default=64)
    a = ap.parse_args()
    reqs = load_requests(a.requests, a.offset, int(a.rate * a.seconds))
    try:
        import uvloop

        res = uvloop.run(run(a.port, reqs, a.rate, a.seconds, a.connections))
    except ImportError:
        res = asyncio.run(run(a.port, reqs, a.rate, a.seconds, a.connections))
    print("LOADGEN_JSON " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
