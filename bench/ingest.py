"""Ingest: encrypted, signed WeCom app callbacks with unique MsgIds, from a load generator on loopback.

    .venv/bin/python -m bench.ingest            # ~3 minutes; --help for the knobs

Against, in the same run, each its own single process on the same event loop:

* **a** ``bare``: aiohttp answering "success" (bench/ingest_servers.py);
* **b** ``wechatpy``: aiohttp + wechatpy's WeCom crypto (verify, decrypt) + wechatpy's XML parse,
  no durability — what a user would otherwise write (bench/ingest_servers.py);
* **c** ``bridge``: the daemon (bench/daemon_proc.py) with the real ``wecom_app`` inbound: verify,
  decrypt, parse, dedupe and durable publish to Redis (one Lua call) before answering; the router
  consumes the inbound stream as in production (no routes: it reads and acks).

Requests are generated before each server's turn with adapters/wechat/crypto.py (fresh timestamps,
every MsgId unique), so the generator only replays bytes: **peak** with wrk (closed loop, ``-c``
connections, bench/ingest_wrk.lua), then **half of c's peak** with bench/loadgen.py (open loop, a
fixed rate; latency counted from each request's due time). Reports req/s, p50/p99, c/a and c/b, the
CPU each server used per request, and for c the Redis round trips per request and the stream length
(every accepted callback stored once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from adapters.wechat.crypto import WXBizMsgCrypt
from bench import profile
from bench.common import (
    DEFAULT_REDIS,
    OUT,
    PY,
    ROOT,
    MachineLoad,
    Procs,
    cleanup_prefix,
    command_line,
    free_port,
    machine_info,
    new_prefix,
    print_machine,
    proc_cpu_seconds,
    proc_cpu_split,
    redis_cpu_seconds,
    redis_pid,
    save_json,
    wait_counting_cpu,
    wait_http,
    wait_quiet,
    write_config,
)
from bench.relay import Bridge, resolve_loop
from bridge.bus import Keys

TOKEN = "benchToken0123456789"
AES_KEY = "YmVuY2htYXJrIGtleSBmb3Igd2VjaGF0LWJyaWRnZSE"  # 43 chars, 32 bytes decoded
CORP = "wwbench0123456789"
PATH = "/wecom/callback"

BRIDGE_BODY = f"""
[[inbound]]
name = "wecom"
type = "wecom_app"
path = "{PATH}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
corp_id = "{CORP}"
"""


def make_requests(path: Path, n: int) -> float:
    """``n`` signed, encrypted text-message callbacks, unique MsgIds; returns the seconds it took."""
    t0 = time.perf_counter()
    crypt = WXBizMsgCrypt(TOKEN, AES_KEY, CORP)
    ts = str(int(time.time()))
    run = random.randrange(10**6, 10**7)
    with path.open("w") as f:
        for i in range(n):
            user = f"user{i % 1000:05d}"
            inner = (
                f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{user}]]>"
                f"</FromUserName><CreateTime>{ts}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
                f"<Content><![CDATA[message {i}: the quick brown fox jumps over the lazy dog]]></Content>"
                f"<MsgId>{run}{i:012d}</MsgId><AgentID>1000002</AgentID></xml>"
            )
            enc = crypt.encrypt(inner.encode())
            nonce = f"{run}{i}"
            sig = crypt.signature(ts, nonce, enc)
            body = (
                f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt>"
                f"<AgentID><![CDATA[1000002]]></AgentID></xml>"
            )
            f.write(f"{PATH}?msg_signature={sig}&timestamp={ts}&nonce={nonce}\t{body}\n")
    return time.perf_counter() - t0


def run_wrk(port: int, reqfile: Path, seconds: float, conns: int, threads: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    args = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s",
            "-s", str(ROOT / "bench" / "ingest_wrk.lua"), f"http://127.0.0.1:{port}",
            "--", str(reqfile), str(threads)]  # fmt: skip
    with (OUT / "wrk.log").open("wb") as log:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
        assert p.stdout is not None
        out = p.stdout.read().decode()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    res: dict[str, Any] = json.loads(line[9:])
    res["rate"] = round(res["requests"] / (res["duration_us"] / 1e6), 1)
    res["generator_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    return res


def run_loadgen(
    procs: Procs,
    port: int,
    reqfile: Path,
    rate: float,
    seconds: float,
    conns: int,
    load: MachineLoad | None = None,
) -> dict[str, Any]:
    log = OUT / "loadgen.log"
    p = procs.start("loadgen", [PY, "-m", "bench.loadgen", "--port", str(port), "--requests", str(reqfile),
                                "--rate", f"{rate:.1f}", "--seconds", str(seconds),
                                "--connections", str(conns)], log=log)  # fmt: skip
    cpu = wait_counting_cpu(p, seconds + 120)  # the generator's own CPU
    if load is not None:
        load.extra += cpu
    line = next((x for x in log.read_text().splitlines() if x.startswith("LOADGEN_JSON ")), None)
    if line is None:
        raise RuntimeError(f"loadgen gave no summary; see {log}")
    res: dict[str, Any] = json.loads(line[13:])
    return res


class Server:
    def __init__(self, procs: Procs, kind: str, loop: str, redis_url: str) -> None:
        self.kind = kind
        self.procs = procs
        self.bridge: Bridge | None = None
        self.prefix: str | None = None
        self.port = free_port()
        if kind.startswith("bridge"):
            self.prefix = new_prefix("ingest")
            cfg = write_config(f"ingest-{kind}", prefix=self.prefix, listen_port=0, body=BRIDGE_BODY,
                               redis_url=redis_url)  # fmt: skip
            self.bridge = Bridge(procs, f"ingest-{kind}", cfg, loop=loop)
            self.proc = self.bridge.proc
            self.port = self.bridge.port
        else:
            args = [PY, "-m", "bench.ingest_servers", "--kind", kind, "--port", str(self.port),
                    "--token", TOKEN, "--aes-key", AES_KEY, "--corp-id", CORP]  # fmt: skip
            if loop == "uvloop":
                args.append("--uvloop")
            self.proc = procs.start(f"ingest-{kind}", args)
            wait_http(f"http://127.0.0.1:{self.port}/healthz", proc=self.proc)
        self.pid = self.proc.pid

    def stats(self) -> dict[str, Any] | None:
        return self.bridge.stats() if self.bridge else None

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        else:
            self.procs.stop(self.proc)


def measure(procs: Procs, kind: str, a: argparse.Namespace, half_rate: float | None) -> dict[str, Any]:
    reqfile = OUT / f"ingest-{kind}.tsv"
    gen_s = make_requests(reqfile, a.requests)
    halffile = OUT / f"ingest-{kind}-half.tsv"
    srv = Server(procs, kind, resolve_loop(a.loop), a.redis_url)
    res: dict[str, Any] = {"kind": kind, "generated": a.requests, "generate_s": round(gen_s, 1)}
    try:
        res["machine_busy_before"] = wait_quiet()
        c0, r0, s0 = proc_cpu_seconds(srv.pid), redis_cpu_seconds(a.redis_url), srv.stats()
        u0, k0 = proc_cpu_split(srv.pid)
        prof = profile.record(srv.pid, OUT / f"ingest-{kind}.raw") if a.profile and srv.bridge else None
        peak = run_wrk(srv.port, reqfile, a.seconds, a.connections, a.threads)
        if prof is not None:
            profile.stop(prof)
            res["profile"] = str(OUT / f"ingest-{kind}.raw")
        peak["server_cpu_us_per_req"] = round(
            (proc_cpu_seconds(srv.pid) - c0) / max(peak["requests"], 1) * 1e6, 1
        )
        u1, k1 = proc_cpu_split(srv.pid)
        n = max(peak["requests"], 1)
        peak["server_user_sys_us_per_req"] = [round((u1 - u0) / n * 1e6, 1), round((k1 - k0) / n * 1e6, 1)]
        peak["redis_cpu_us_per_req"] = round(
            (redis_cpu_seconds(a.redis_url) - r0) / max(peak["requests"], 1) * 1e6, 1
        )
        s1 = srv.stats()
        if s0 is not None and s1 is not None:
            peak["round_trips_per_req"] = round(
                (s1["round_trips"] - s0["round_trips"]) / max(peak["requests"], 1), 3
            )
        if srv.prefix is not None:
            import redis

            r = redis.Redis.from_url(a.redis_url)
            peak["stored"] = int(r.xlen(Keys(srv.prefix).inbound))
            r.close()
        res["peak"] = peak
        print(f"{kind} peak: {json.dumps(peak)}", flush=True)
        rate = half_rate if half_rate is not None else peak["rate"] / 2
        n_half = int(rate * a.half_seconds) + 1
        # fresh MsgIds for the fixed-rate run: the last lines of a new file
        make_requests(halffile, n_half)
        res["machine_busy_before_half"] = wait_quiet()
        c0, h0 = proc_cpu_seconds(srv.pid), srv.stats()
        rpid = redis_pid(a.redis_url)
        load = MachineLoad([srv.pid] + ([rpid] if rpid else []))
        half = run_loadgen(procs, srv.port, halffile, rate, a.half_seconds, a.connections, load)
        half["load"] = load.done()
        half["server_cpu_us_per_req"] = round(
            (proc_cpu_seconds(srv.pid) - c0) / max(half["sent"], 1) * 1e6, 1
        )
        h1 = srv.stats()
        if h0 is not None and h1 is not None:
            n_rt = h1["round_trips"] - h0["round_trips"]
            half["round_trips_per_req"] = round(n_rt / max(half["sent"], 1), 3)
            sites0 = h0.get("round_trip_sites", {})
            sites = {k: v - sites0.get(k, 0) for k, v in h1.get("round_trip_sites", {}).items()}
            if sites:
                half["round_trips_by_site"] = sites
        res["half"] = half
        print(f"{kind} at {rate:,.0f}/s: {json.dumps(half)}", flush=True)
    finally:
        srv.stop()
        if srv.prefix is not None:
            cleanup_prefix(srv.prefix, a.redis_url)
    return res


NAMES = {
    "bare": "a  aiohttp 'success'",
    "wechatpy": "b  aiohttp + wechatpy + parse",
    "bridge": "c  bridge wecom_app (durable)",
}


def _med(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over the runs of one server."""
    return {
        "rate": _med([r["peak"]["rate"] for r in runs]),
        "p50_ms": _med([r["peak"]["p50_us"] / 1000 for r in runs]),
        "p99_ms": _med([r["peak"]["p99_us"] / 1000 for r in runs]),
        "cpu_us": _med([r["peak"]["server_cpu_us_per_req"] for r in runs]),
        "half_rate": _med([r["half"]["rate"] for r in runs]),
        "half_p50_ms": _med([r["half"]["p50_ms"] for r in runs]),
        "half_p99_ms": _med([r["half"]["p99_ms"] for r in runs]),
        "half_others": _med([r["half"].get("load", {}).get("others", 0.0) for r in runs]),
    }


def report(res: dict[str, Any]) -> None:
    kinds = [k for k in NAMES if k in res["runs"]]
    med = {k: summarize(res["runs"][k]) for k in kinds}
    res["medians"] = med
    n = len(res["runs"]["bridge"])
    print(
        f"\n== ingest summary: medians of {n} run(s) each; one process per server; wrk closed loop at peak,"
    )
    print("   open loop at half of c's peak")
    print(f"{'server':<34} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}   {'@half req/s':>11} {'p50 ms':>7} "
          f"{'p99 ms':>7}  CPU µs/req  (peak req/s of each run)")  # fmt: skip
    for k in kinds:
        m = med[k]
        runs = ", ".join(f"{r['peak']['rate']:,.0f}" for r in res["runs"][k])
        print(f"{NAMES[k]:<34} {m['rate']:>8,.0f} {m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f}   "
              f"{m['half_rate']:>11,.0f} {m['half_p50_ms']:>7.2f} {m['half_p99_ms']:>7.2f}  "
              f"{m['cpu_us']:>10.1f}  ({runs})")  # fmt: skip
    a, b, c = med["bare"], med["wechatpy"], med["bridge"]
    ca, cb = c["rate"] / a["rate"], c["rate"] / b["rate"]
    print(f"c/a = {ca:.2f} (target >= 0.5)   c/b = {cb:.2f} (target >= 1.0)   "
          f"c p99 at half its peak = {c['half_p99_ms']:.2f} ms (target <= 20)")  # fmt: skip
    cpu_a, cpu_b = a["cpu_us"] / c["cpu_us"], b["cpu_us"] / c["cpu_us"]
    print(f"by CPU per request: a/c = {cpu_a:.2f}   b/c = {cpu_b:.2f}")
    print("fixed-rate runs, p99 ms (others: share of the machine not ours, steal: of it the host's):")
    for k in kinds:
        rows = [
            f"{r['half']['p99_ms']} (others {r['half'].get('load', {}).get('others', '?')}, "
            f"steal {r['half'].get('load', {}).get('steal', '?')})"
            for r in res["runs"][k]
        ]
        print(f"   {NAMES[k]:<32} {', '.join(rows)}")
    for k in ("bridge",):
        for r in res["runs"].get(k, []):
            p = r["peak"]
            print(f"{k}: Redis round trips per request {p.get('round_trips_per_req')}, stored "
                  f"{p.get('stored')} of {p['requests']} answered "
                  f"(non-200: {p['non_200']}, wraps: {p['wraps']})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="peak run per server (wrk)")
    ap.add_argument("--half-seconds", type=float, default=10, help="fixed-rate run per server")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server, in alternating order")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--requests", type=int, default=150_000, help="unique requests generated per run")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop of all the servers (auto: uvloop if installed)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="py-spy the bridge's peak runs")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS)
    ap.add_argument("--json", type=Path, default=OUT / "ingest.json")
    a = ap.parse_args()
    info = machine_info(a.redis_url)
    print(f"command: {command_line()}")
    print_machine(info)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    res: dict[str, Any] = {"machine": info, "command": command_line(), "args": args, "runs": {}}
    kinds = ["bridge", "bare", "wechatpy"]
    half: float | None = None
    with Procs() as procs:
        for i in range(a.repeat):  # c first: its first peak sets the fixed rate for every server
            for kind in kinds if i % 2 == 0 else list(reversed(kinds)):
                r = measure(procs, kind, a, half)
                res["runs"].setdefault(kind, []).append(r)
                if half is None:
                    half = r["peak"]["rate"] / 2
    res["half_rate"] = half
    res["load_avg_at_end"] = os.getloadavg()
    report(res)
    copy = save_json(a.json, res)
    print(f"(figures also in {a.json} and {copy})")
    if a.profile:
        for r in res["runs"]["bridge"][:1]:
            if "profile" in r:
                print(f"\nprofile of {r['kind']}'s peak run ({r['profile']}):")
                print(profile.summary(Path(r["profile"])))


if __name__ == "__main__":
    main()
