"""Memory: the daemon's RSS idle and while 1,000,000 messages are relayed (inbound → router → http sink).

    .venv/bin/python -m bench.memory            # ~3-5 minutes; stops by itself

The daemon (bench/daemon_proc.py) relays to the no-limit receiver (bench/receiver.py) as in the relay
benchmark, with ``stream_maxlen`` small (200,000) so Redis holds only a window of the streams. The
envelopes are published in chunks of ``--every`` (default 100,000) with the bus's publish Lua; after
each chunk is delivered the daemon's RSS is sampled. Reports the RSS idle, after every chunk, the
maximum, and the least-squares slope over the chunks after the first (MB per 100,000 messages) —
no growth trend means a slope near zero.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_REDIS,
    OUT,
    Procs,
    cleanup_prefix,
    command_line,
    machine_info,
    new_prefix,
    print_machine,
    proc_rss_mb,
    save_json,
    wait_quiet,
    write_config,
)
from bench.producer import prefill
from bench.relay import BRIDGE_BODY, Bridge, Receiver, resolve_loop


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--maxlen", type=int, default=200_000, help="[redis] stream_maxlen")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS)
    ap.add_argument("--json", type=Path, default=OUT / "memory.json")
    a = ap.parse_args()
    info = machine_info(a.redis_url)
    print(f"command: {command_line()}")
    print_machine(info)
    prefix = new_prefix("memory")
    res: dict[str, Any] = {"machine": info, "command": command_line(), "samples": []}
    import redis

    r = redis.Redis.from_url(a.redis_url)
    try:
        with Procs() as procs:
            receiver = Receiver(procs, track_ids=False)
            body = BRIDGE_BODY.format(rport=receiver.port, concurrency=a.concurrency)
            cfg = write_config("memory-bridge", prefix=prefix, listen_port=0, redis_url=a.redis_url,
                               stream_maxlen=a.maxlen, body=body)  # fmt: skip
            bridge = Bridge(procs, "memory-bridge", cfg, loop=resolve_loop(a.loop))
            pid = bridge.proc.pid
            res["machine_busy_before"] = wait_quiet()
            time.sleep(3)
            res["rss_idle_mb"] = round(proc_rss_mb(pid), 1)
            print(f"idle RSS {res['rss_idle_mb']} MB (after start-up, nothing relayed)", flush=True)
            receiver.reset()
            t0 = time.time()
            done = 0
            while done < a.n:
                chunk = min(a.every, a.n - done)
                prefill(a.redis_url, prefix, chunk, maxlen=a.maxlen, run=f"m{done}")
                done += chunk
                rcv = receiver.wait_count(done, timeout=900, idle_timeout=30)
                if rcv.get("incomplete"):
                    raise SystemExit(f"stalled at {rcv['count']} of {done}; see bench/out/memory-bridge.log")
                rss = proc_rss_mb(pid)
                mem = r.info("memory")
                sample = {"relayed": done, "rss_mb": round(rss, 1), "seconds": round(time.time() - t0, 1),
                          "redis_used_mb": round(int(mem["used_memory"]) / 2**20, 1)}  # fmt: skip
                res["samples"].append(sample)
                print(f"relayed {done:>9,}  RSS {rss:6.1f} MB  at {sample['seconds']:6.1f} s  "
                      f"(Redis used {sample['redis_used_mb']} MB)", flush=True)  # fmt: skip
            time.sleep(5)
            res["rss_after_idle_mb"] = round(proc_rss_mb(pid), 1)
            st = bridge.stats()
            res["max_rss_mb"] = round(st["max_rss_mb"], 1)
            res["loop"] = st["loop"]
            bridge.stop()
    finally:
        r.close()
        cleanup_prefix(prefix, a.redis_url)
    s = res["samples"]
    xs = [x["relayed"] / 100_000 for x in s[1:]]
    ys = [x["rss_mb"] for x in s[1:]]
    res["slope_mb_per_100k"] = round(slope(xs, ys), 3)
    res["rate"] = round(s[-1]["relayed"] / s[-1]["seconds"], 1) if s else 0.0
    res["load_avg_at_end"] = os.getloadavg()
    print("\n== memory summary")
    peak = max([res["max_rss_mb"], *(x["rss_mb"] for x in s)])
    print(f"RSS idle {res['rss_idle_mb']} MB; after {a.n:,} relayed {s[-1]['rss_mb']} MB; highest seen "
          f"{peak} MB (target <= 100); idle again {res['rss_after_idle_mb']} MB")  # fmt: skip
    print(f"slope over samples 2..{len(s)}: {res['slope_mb_per_100k']} MB per 100,000 messages "
          f"(no growth trend: ~0); {res['rate']:,.0f} msg/s wall-clock (with publishing)")  # fmt: skip
    copy = save_json(a.json, res)
    print(f"(figures also in {a.json} and {copy})")


if __name__ == "__main__":
    main()
