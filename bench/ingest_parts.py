"""Where the ingest daemon's time goes: its peak with one part of the work after another switched off.

    .venv/bin/python -m bench.ingest_parts            # ~5 minutes; --help for the knobs

Same requests and load as bench/ingest.py's peak (wrk, closed loop, signed and encrypted WeCom app
callbacks with unique MsgIds), against, in alternating order:

  a        bare aiohttp answering "success" (bench/ingest.py's a)
  http     the daemon, its ``wecom_app`` handler only reading the body and answering
  +crypto  + verify, decrypt, parse both XML documents, build the envelope (no publish, no log line)
  +store   + the durable publish with dedupe (Redis), still no log line and no router
  +router  + the router reading the stream back (as in production)
  c        + the ``wechat.accepted`` log line: the daemon as it ships (bench/ingest.py's c)

Each step's extra CPU per request is what that part costs; c/a is what they add up to. The parts are
switched off in bench/daemon_proc.py (``WB_BENCH_WITHOUT``), for this measurement only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_REDIS,
    OUT,
    Procs,
    cleanup_prefix,
    command_line,
    machine_info,
    print_machine,
    proc_cpu_seconds,
    save_json,
    wait_quiet,
)
from bench.ingest import Server, make_requests, run_wrk
from bench.relay import resolve_loop

STEPS: list[tuple[str, str, str]] = [
    ("a", "bare", ""),
    ("http", "bridge", "handler,router,log"),
    ("+crypto", "bridge", "publish,router,log"),
    ("+store", "bridge", "router,log"),
    ("+router", "bridge", "log"),
    ("c", "bridge", ""),
]


def measure(procs: Procs, kind: str, without: str, a: argparse.Namespace) -> dict[str, Any]:
    reqfile = OUT / "ingest-parts.tsv"
    make_requests(reqfile, a.requests)
    os.environ["WB_BENCH_WITHOUT"] = without
    try:
        srv = Server(procs, kind, resolve_loop(a.loop), a.redis_url)
    finally:
        os.environ.pop("WB_BENCH_WITHOUT", None)
    try:
        busy = wait_quiet()
        c0 = proc_cpu_seconds(srv.pid)
        peak = run_wrk(srv.port, reqfile, a.seconds, a.connections, 1)
        cpu = (proc_cpu_seconds(srv.pid) - c0) / max(peak["requests"], 1) * 1e6
    finally:
        srv.stop()
        if srv.prefix is not None:
            cleanup_prefix(srv.prefix, a.redis_url)
    return {"rate": peak["rate"], "cpu_us": round(cpu, 1), "non_200": peak["non_200"], "busy_before": busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="wrk run per step")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step, in alternating order")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=120_000)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument("--redis-url", default=os.environ.get("WB_BENCH_REDIS_URL", DEFAULT_REDIS))
    ap.add_argument("--json", type=Path, default=OUT / "ingest_parts.json")
    a = ap.parse_args()
    info = machine_info(a.redis_url)
    print(f"command: {command_line()}")
    print_machine(info)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in STEPS}
    with Procs() as procs:
        for i in range(a.repeat):
            for name, kind, without in STEPS:
                r = measure(procs, kind, without, a)
                runs[name].append(r)
                print(f"run {i + 1} {name:8s} {json.dumps(r)}", flush=True)
    print("\n== where the time goes (medians; CPU µs per request of the server process, at its peak)")
    print(f"{'step':10s} {'req/s':>8s} {'CPU µs/req':>11s} {'this step':>10s} {'x/a by CPU':>11s}")
    prev = None
    med: dict[str, dict[str, float]] = {}
    for name, _, _ in STEPS:
        rate = statistics.median(r["rate"] for r in runs[name])
        cpu = statistics.median(r["cpu_us"] for r in runs[name])
        med[name] = {"rate": rate, "cpu_us": cpu}
        step = "" if prev is None else f"{cpu - prev:+.1f}"
        print(f"{name:10s} {rate:8,.0f} {cpu:11.1f} {step:>10s} {med['a']['cpu_us'] / cpu:11.2f}")
        prev = cpu
    print(f"c/a by throughput: {med['c']['rate'] / med['a']['rate']:.2f}")
    res = {"machine": info, "command": command_line(), "runs": runs, "medians": med}
    copy = save_json(a.json, res)
    print(f"(figures also in {a.json} and {copy})")


if __name__ == "__main__":
    main()
