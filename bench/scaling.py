"""Scaling: 1, 2 and 3 daemon instances (distinct ``[bridge] instance``) on one Redis, relaying together.

    .venv/bin/python -m bench.scaling           # ~2 minutes

For each instance count k: N envelopes are prefilled on the inbound stream, then k daemons (the
relay benchmark's config, each its own process, instance names bench1..benchk) are started at once;
their routers share the ``router`` group and their runners the ``runner`` group. Throughput = N over
the time from the first to the last arrival at the receiver; duplicates are counted by delivery id.
All processes share this machine's cores: on 2 cores a second instance can only add what the first
left idle.
"""

from __future__ import annotations

import argparse
import json
import os
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
    proc_cpu_seconds,
    redis_cpu_seconds,
    save_json,
    wait_quiet,
    write_config,
)
from bench.producer import prefill
from bench.relay import BRIDGE_BODY, Bridge, Receiver, resolve_loop


def run(procs: Procs, receiver: Receiver, k: int, a: argparse.Namespace) -> dict[str, Any]:
    prefix = new_prefix(f"scale{k}")
    try:
        prefill(a.redis_url, prefix, a.n)
        busy = wait_quiet()
        receiver.reset()
        rc0 = redis_cpu_seconds(a.redis_url)
        body = BRIDGE_BODY.format(rport=receiver.port, concurrency=a.concurrency)
        cfgs = [write_config(f"scale-{i}", prefix=prefix, instance=f"bench{i}", listen_port=0,
                             redis_url=a.redis_url, body=body) for i in range(1, k + 1)]  # fmt: skip
        loop = resolve_loop(a.loop)
        bridges = [Bridge(procs, f"scale-{i}", cfg, loop=loop) for i, cfg in enumerate(cfgs, 1)]
        cpu0 = [float(b.stats()["cpu_s"]) for b in bridges]
        rcv = receiver.wait_count(a.n, timeout=600)
        cpu = [proc_cpu_seconds(b.proc.pid) - c for b, c in zip(bridges, cpu0, strict=True)]
        sent = [sum(b.stats()["sent"].values()) for b in bridges]
        for b in bridges:
            b.stop()
        span = rcv["last"] - rcv["first"]
        return {
            "instances": k,
            "delivered": rcv["count"],
            "rate": round(rcv["count"] / span, 1) if span > 0 else 0.0,
            "seconds": round(span, 2),
            "duplicates": rcv["duplicates"],
            "sent_per_instance": sent,
            "cpu_s_per_instance": [round(c, 2) for c in cpu],
            "redis_cpu_s": round(redis_cpu_seconds(a.redis_url) - rc0, 2),
            "incomplete": bool(rcv.get("incomplete")),
            "machine_busy_before": busy,
        }
    finally:
        cleanup_prefix(prefix, a.redis_url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="envelopes per instance count")
    ap.add_argument("--instances", default="1,2,3")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS)
    ap.add_argument("--json", type=Path, default=OUT / "scaling.json")
    a = ap.parse_args()
    info = machine_info(a.redis_url)
    print(f"command: {command_line()}")
    print_machine(info)
    res: dict[str, Any] = {"machine": info, "command": command_line(), "runs": []}
    counts = [int(x) for x in a.instances.split(",")]
    with Procs() as procs:
        receiver = Receiver(procs)
        for i in range(a.repeat):
            for k in counts if i % 2 == 0 else reversed(counts):
                r = run(procs, receiver, k, a)
                res["runs"].append(r)
                print(f"{k} instance(s): {json.dumps(r)}", flush=True)
    res["load_avg_at_end"] = os.getloadavg()
    print("\n== scaling summary (all on this machine's cores, one Redis)")
    base = None
    for k in counts:
        rates = sorted(r["rate"] for r in res["runs"] if r["instances"] == k)
        med = rates[len(rates) // 2]
        base = base or med
        dup = sum(r["duplicates"] for r in res["runs"] if r["instances"] == k)
        print(f"{k} instance(s): {med:>8,.0f} msg/s ({med / base:.2f}x of one)  runs {rates}  dups {dup}")
    copy = save_json(a.json, res)
    print(f"(figures also in {a.json} and {copy})")


if __name__ == "__main__":
    main()
