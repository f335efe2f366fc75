"""The ``http`` sink's two clients side by side: CPU per POST and POSTs per second.

Both clients (bridge/transport.py) post the same delivery-sized body to the same local
receiver (bench/receiver.py, its own process), ``--concurrency`` requests in flight as the sink's
runner keeps them, in alternating rounds so a change in the machine's load hits both alike. CPU
is this process's (user + system) over the round: what one POST costs the daemon.

    python -m bench.http_clients --requests 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from bench.common import OUT, Procs, free_port, machine_info, save_json, wait_http
from bridge.http1 import Http1Pool
from bridge.transport import AiohttpPoster, Poster

BODY = json.dumps({"id": "d" * 26, "envelope": {"text": "hello " * 60, "received_at": 0.0}}).encode()
HEADERS = [("X-Bridge-Timestamp", "1700000000"), ("X-Bridge-Delivery", "d" * 26)]


async def round_(poster: Poster, requests: int, concurrency: int) -> dict[str, float]:
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            resp = await poster.post(HEADERS, BODY, 10)
            assert resp.status == 200

    await poster.post(HEADERS, BODY, 10)  # open a connection first: rounds measure reuse
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"cpu_us_per_post": cpu / requests * 1e6, "posts_per_s": requests / wall}


async def main_async(url: str, a: argparse.Namespace) -> dict[str, Any]:
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30, connect=10), connector=aiohttp.TCPConnector(limit=256)
    )  # as the daemon's (bridge/daemon.py)
    heads = [("Content-Type", "application/json")]
    clients: dict[str, Poster] = {
        "http1": Http1Pool(url, heads),
        "aiohttp": AiohttpPoster(url, heads, lambda: session),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in clients}
    for _ in range(a.rounds):
        for name, poster in clients.items():
            runs[name].append(await round_(poster, a.requests, a.concurrency))
    for poster in clients.values():
        await poster.close()
    await session.close()
    out: dict[str, Any] = {"runs": runs}
    for name, rs in runs.items():
        out[name] = {
            "cpu_us_per_post_median": sorted(r["cpu_us_per_post"] for r in rs)[len(rs) // 2],
            "posts_per_s_median": sorted(r["posts_per_s"] for r in rs)[len(rs) // 2],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    port = free_port()
    with Procs() as procs:
        p = procs.start(
            "http-clients-receiver", [sys.executable, "-m", "bench.receiver", "--port", str(port)]
        )
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=p)
        res = asyncio.run(main_async(f"http://127.0.0.1:{port}/in", a))
    res["machine"] = machine_info()
    res["args"] = vars(a)
    for name in ("http1", "aiohttp"):
        r = res[name]
        print(
            f"{name:8} {r['cpu_us_per_post_median']:7.1f} µs CPU/POST  {r['posts_per_s_median']:9,.0f} POST/s"
        )
    save_json(OUT / "http_clients.json", res)


if __name__ == "__main__":
    main()
