"""Relay: envelopes through inbound stream → router → runner → ``http`` sink → a local receiver.

    .venv/bin/python -m bench.relay            # ~3 minutes; --help for the knobs

Side by side, in one run, against the same receiver process (bench/receiver.py) and the same Redis:

* **bridge**: the daemon (bench/daemon_proc.py: the real ``Daemon``) with a ``manual`` inbound ``in``,
  an ``http`` sink ``out`` (rate "none", ``concurrency`` sends at once) and one route; envelopes are
  published on the inbound stream with the bus's own publish-with-dedupe Lua (what an inbound does);
* **baseline**: the minimum durable relay (bench/baseline_relay.py): XREADGROUP a batch → POST each
  with the same HTTP client and concurrency → XACK; ``--aiohttp-baseline`` adds the same with aiohttp.

Phases: (1) **drain**: N envelopes prefilled, then the relay started; throughput = N over the time
from the first to the last arrival at the receiver (``--repeat`` alternates the sides). (2) **latency**:
an open-loop producer process publishes ``--latency-rate``/s; added latency = arrival at the receiver −
the envelope's ``received_at`` (stamped just before its publish). (3) **sustain**: the same at
``--sustain-rate``/s. Redis round trips are counted inside the daemon (each redis-py
``send_packed_command``; a pipeline is one); the inbound's publish is one more per message, counted
apart. CPU seconds of the relay process, Redis and the receiver are measured for each phase.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import profile
from bench.common import (
    DEFAULT_REDIS,
    OUT,
    PY,
    MachineLoad,
    Procs,
    cleanup_prefix,
    command_line,
    daemon_args,
    free_port,
    get_json,
    machine_info,
    new_prefix,
    post_json,
    print_machine,
    proc_cpu_seconds,
    redis_cpu_seconds,
    redis_pid,
    save_json,
    wait_counting_cpu,
    wait_http,
    wait_quiet,
    write_config,
)
from bench.producer import prefill
from bridge.bus import Keys

BRIDGE_BODY = """
[[inbound]]
name = "in"
type = "manual"

[[outbound]]
name = "out"
type = "http"
url = "http://127.0.0.1:{rport}/deliver"
rate = "none"
concurrency = {concurrency}

[[routes]]
from = "in"
to = "out"
"""


def resolve_loop(loop: str) -> str:
    if loop != "auto":
        return loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _redis_set(url: str, key: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        r.set(key, 1)
    finally:
        r.close()


class Receiver:
    def __init__(self, procs: Procs, *, track_ids: bool = True) -> None:
        self.port = free_port()
        args = [PY, "-m", "bench.receiver", "--port", str(self.port)]
        if track_ids:
            args.append("--track-ids")
        self.proc = procs.start("receiver", args)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/healthz", proc=self.proc)

    def reset(self) -> None:
        post_json(self.url + "/reset")

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = get_json(self.url + "/stats")
        return s

    def wait_count(self, n: int, timeout: float, idle_timeout: float = 15.0) -> dict[str, Any]:
        """Poll until ``n`` arrived; give up after ``timeout`` or ``idle_timeout`` without progress."""
        end = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            p: dict[str, Any] = get_json(self.url + "/progress")
            if p["count"] >= n:
                return self.stats()
            if p["count"] != last:
                last, last_change = p["count"], time.monotonic()
            if time.monotonic() > end or time.monotonic() - last_change > idle_timeout:
                s = self.stats()
                s["incomplete"] = True
                return s
            time.sleep(0.1)


class Bridge:
    """One daemon process (bench/daemon_proc.py) on its own config and stats port."""

    def __init__(self, procs: Procs, name: str, config: Path, *, loop: str = "auto") -> None:
        self.procs = procs
        self.name = name
        for attempt in range(3):  # a free port can be taken between our check and the bind: try again
            self.stats_port = free_port()
            self.proc = procs.start(name, daemon_args(config, self.stats_port, loop=loop))
            self.url = f"http://127.0.0.1:{self.stats_port}/stats"
            if self._ready():
                break
            if attempt == 2:
                raise RuntimeError(f"daemon {name} did not start; see bench/out/{name}.log")
            procs.stop(self.proc)
        #: the daemon's HTTP port (configs here listen on port 0: the system picks a free one)
        self.port = int(self.stats()["port"])

    def _ready(self) -> bool:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if get_json(self.url)["ready"]:
                    return True
            except Exception:
                if self.proc.poll() is not None:
                    return False
            time.sleep(0.05)
        return False

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = get_json(self.url)
        return s

    def stop(self) -> None:
        self.procs.stop(self.proc)


def bridge_config(name: str, prefix: str, rport: int, concurrency: int, redis_url: str, **kw: Any) -> Path:
    return write_config(
        name,
        prefix=prefix,
        listen_port=0,
        body=BRIDGE_BODY.format(rport=rport, concurrency=concurrency),
        redis_url=redis_url,
        **kw,
    )


class Side:
    """A relay under test: the bridge or a baseline, started on one prefix."""

    def __init__(
        self, procs: Procs, kind: str, prefix: str, receiver: Receiver, a: argparse.Namespace, *, go: bool
    ) -> None:
        self.kind = kind
        self.procs = procs
        self.bridge: Bridge | None = None
        loop = resolve_loop(a.loop)
        if kind == "bridge":
            cfg = bridge_config(f"{kind}", prefix, receiver.port, a.concurrency, a.redis_url)
            self.bridge = Bridge(procs, kind, cfg, loop=loop)
            self.pid = self.bridge.proc.pid
            self.s0 = self.bridge.stats()
            self.cpu0 = float(self.s0["cpu_s"])  # start-up (imports) excluded
        else:
            client = "aiohttp" if kind == "baseline-aiohttp" else "http1"
            go_key = f"{prefix}:go"
            args = [PY, "-m", "bench.baseline_relay", "--redis-url", a.redis_url,
                    "--stream", Keys(prefix).inbound, "--url", receiver.url + "/deliver",
                    "--concurrency", str(a.concurrency), "--client", client]  # fmt: skip
            if go:
                args += ["--go-key", go_key]
            if loop == "uvloop":
                args.append("--uvloop")
            self.proc = procs.start(kind, args)
            self.pid = self.proc.pid
            time.sleep(1.5)  # imports done (and, with a go key, waiting for it)
            self.cpu0 = proc_cpu_seconds(self.pid)
            if go:
                _redis_set(a.redis_url, go_key)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid) - self.cpu0

    def round_trips(self) -> int | None:
        if self.bridge is None:
            return None
        s1 = self.bridge.stats()
        s0sites = self.s0.get("round_trip_sites", {})
        self.sites = {k: v - s0sites.get(k, 0) for k, v in s1.get("round_trip_sites", {}).items()}
        return int(s1["round_trips"] - self.s0["round_trips"])

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        else:
            self.procs.stop(self.proc)


def _result(rcv: dict[str, Any], n: int, cpu: dict[str, float], rts: int | None) -> dict[str, Any]:
    span = rcv["last"] - rcv["first"]
    done = max(rcv["count"], 1)
    out: dict[str, Any] = {
        "delivered": rcv["count"],
        "expected": n,
        "seconds": round(span, 3),
        "rate": round(rcv["count"] / span, 1) if span > 0 else 0.0,
        "lat_p50_ms": round(rcv["lat_p50_ms"], 2),
        "lat_p99_ms": round(rcv["lat_p99_ms"], 2),
        "lat_max_ms": round(rcv["lat_max_ms"], 2),
        "to_router_p50_ms": round(rcv["to_router_p50_ms"], 2),
        "to_router_p99_ms": round(rcv["to_router_p99_ms"], 2),
        "duplicates": rcv["duplicates"],
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_us_per_msg": {k: round(v / done * 1e6, 1) for k, v in cpu.items()},
    }
    if rts is not None:
        out["round_trips"] = rts
        out["rt_per_msg_daemon"] = round(rts / done, 3)
    if rcv.get("incomplete"):
        out["incomplete"] = True
    return out


def drain(procs: Procs, receiver: Receiver, kind: str, a: argparse.Namespace, prof: bool) -> dict[str, Any]:
    prefix = new_prefix(f"drain-{kind}")
    try:
        t_fill = prefill(a.redis_url, prefix, a.n)
        busy = wait_quiet()
        receiver.reset()
        rc0, rv0 = redis_cpu_seconds(a.redis_url), proc_cpu_seconds(receiver.proc.pid)
        side = Side(procs, kind, prefix, receiver, a, go=True)
        prof_path = OUT / f"drain-{kind}.raw"
        prof_proc = profile.record(side.pid, prof_path) if prof else None
        rcv = receiver.wait_count(a.n, timeout=600)
        cpu = {"relay": side.cpu(), "redis": redis_cpu_seconds(a.redis_url) - rc0,
               "receiver": proc_cpu_seconds(receiver.proc.pid) - rv0}  # fmt: skip
        if prof_proc is not None:
            profile.stop(prof_proc)
        res = _result(rcv, a.n, cpu, side.round_trips())
        res["prefill_s"] = round(t_fill, 2)
        res["machine_busy_before"] = busy
        if side.bridge is not None:
            res["rss_mb"] = round(side.bridge.stats()["rss_mb"], 1)
            res["loop"] = side.bridge.stats()["loop"]
        side.stop()
        if prof_proc is not None and prof_path.exists():
            res["profile"] = str(prof_path)
        return res
    finally:
        cleanup_prefix(prefix, a.redis_url)


def live(
    procs: Procs, receiver: Receiver, kind: str, rate: float, seconds: float, a: argparse.Namespace
) -> dict[str, Any]:
    prefix = new_prefix(f"live-{kind}")
    try:
        side = Side(procs, kind, prefix, receiver, a, go=False)
        busy = wait_quiet()
        receiver.reset()
        side.cpu0 = proc_cpu_seconds(side.pid)
        if side.bridge is not None:
            side.s0 = side.bridge.stats()
        rc0, rv0 = redis_cpu_seconds(a.redis_url), proc_cpu_seconds(receiver.proc.pid)
        rpid = redis_pid(a.redis_url)
        load = MachineLoad([side.pid, receiver.proc.pid] + ([rpid] if rpid else []))
        prof_path = OUT / f"{'latency' if rate < 2000 else 'sustain'}-{kind}.raw"
        prof_proc = profile.record(side.pid, prof_path) if a.profile and kind == "bridge" else None
        prod = procs.start(
            f"producer-{kind}",
            [PY, "-m", "bench.producer", "--redis-url", a.redis_url, "--prefix", prefix,
             "--rate", str(rate), "--seconds", str(seconds)],
        )  # fmt: skip
        load.extra += wait_counting_cpu(prod, seconds + 120)  # the producer's own CPU
        n = int(rate * seconds)
        rcv = receiver.wait_count(n, timeout=120, idle_timeout=10)
        cpu = {"relay": side.cpu(), "redis": redis_cpu_seconds(a.redis_url) - rc0,
               "receiver": proc_cpu_seconds(receiver.proc.pid) - rv0}  # fmt: skip
        if prof_proc is not None:
            profile.stop(prof_proc)
        res = _result(rcv, n, cpu, side.round_trips())
        if getattr(side, "sites", None):
            res["round_trips_by_site"] = side.sites
        res["offered_rate"] = rate
        res["machine_busy_before"] = busy
        res["load"] = load.done()
        if prof_proc is not None:
            res["profile"] = str(prof_path)
        lines = (OUT / f"producer-{kind}.log").read_text().strip().splitlines()
        res["producer"] = lines[-1] if lines else "?"
        side.stop()
        return res
    finally:
        cleanup_prefix(prefix, a.redis_url)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    vals = sorted(float(r[key]) for r in rows)
    return vals[len(vals) // 2] if vals else 0.0


def _rates(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['rate']:,.0f}" for r in rows)


def report(res: dict[str, Any]) -> None:
    print("\n== relay summary (bridge = the daemon; baseline = XREADGROUP → POST each → XACK, same client)")
    kinds = [k for k in ("baseline", "baseline-aiohttp") if f"drain_{k}" in res]
    if "drain_bridge" in res:
        b = res["drain_bridge"]
        br = _median(b, "rate")
        n = res["args"]["n"]
        print(f"drain {n:,} msgs: bridge {br:,.0f} msg/s (runs: {_rates(b)})   target >= 5,000")
        for k in kinds:
            bs = res[f"drain_{k}"]
            bsr = _median(bs, "rate")
            ratio = br / bsr if bsr else 0.0
            print(f"       {k} {bsr:,.0f} msg/s (runs: {_rates(bs)})   bridge/{k} = {ratio:.2f}")
        print(f"       round trips per message in the daemon: {_median(b, 'rt_per_msg_daemon'):.3f} "
              f"(+1: the inbound's publish)   target <= 3")  # fmt: skip
        for k in ["bridge", *kinds]:
            cpu = res[f"drain_{k}"][-1]["cpu_us_per_msg"]
            print(f"       CPU µs per message, {k}: relay {cpu['relay']}, redis {cpu['redis']}, "
                  f"receiver {cpu['receiver']}")  # fmt: skip
    for phase in ("latency", "sustain"):
        if f"{phase}_bridge" not in res:
            continue
        for k in ["bridge", *[k for k in ("baseline",) if f"{phase}_{k}" in res]]:
            r = res[f"{phase}_{k}"]
            rt = f", rt/msg {r['rt_per_msg_daemon']} (+1 publish)" if "rt_per_msg_daemon" in r else ""
            noise = r.get("load", {}).get("others", "?")
            print(f"{phase} @{r['offered_rate']:g}/s {k}: delivered {r['delivered']}/{r['expected']} at "
                  f"{r['rate']:,.0f}/s; added latency p50 {r['lat_p50_ms']} ms, p99 {r['lat_p99_ms']} ms, "
                  f"max {r['lat_max_ms']} ms; CPU µs/msg {r['cpu_us_per_msg']['relay']}{rt}; "
                  f"other processes' share of the machine {noise}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="envelopes per drain")
    ap.add_argument("--concurrency", type=int, default=16, help="sends in flight (sink and baselines)")
    ap.add_argument("--latency-rate", type=float, default=1000)
    ap.add_argument("--latency-seconds", type=float, default=20)
    ap.add_argument("--sustain-rate", type=float, default=5000)
    ap.add_argument("--sustain-seconds", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=2, help="drains per side, alternating")
    ap.add_argument("--skip", default="", help="phases to skip, comma-separated: drain,latency,sustain")
    ap.add_argument("--aiohttp-baseline", action="store_true", help="also drain a baseline on aiohttp")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop of the bridge and baselines (auto: uvloop if installed)")  # fmt: skip
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the bridge in each phase (bench/out/*.raw)"
    )
    ap.add_argument("--redis-url", default=DEFAULT_REDIS)
    ap.add_argument("--json", type=Path, default=OUT / "relay.json")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))

    info = machine_info(a.redis_url)
    print(f"command: {command_line()}")
    print_machine(info)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    res: dict[str, Any] = {"machine": info, "command": command_line(), "args": args}
    kinds = ["baseline", "bridge"] + (["baseline-aiohttp"] if a.aiohttp_baseline else [])
    with Procs() as procs:
        receiver = Receiver(procs)
        if "drain" not in skip:
            for i in range(a.repeat):
                for kind in kinds if i % 2 == 0 else reversed(kinds):
                    r = drain(procs, receiver, kind, a, a.profile and kind == "bridge")
                    res.setdefault(f"drain_{kind}", []).append(r)
                    print(f"drain {kind} #{i + 1}: {json.dumps(r)}", flush=True)
        for phase, rate, secs in (("latency", a.latency_rate, a.latency_seconds),
                                  ("sustain", a.sustain_rate, a.sustain_seconds)):  # fmt: skip
            if phase in skip:
                continue
            for kind in ("baseline", "bridge"):
                r = live(procs, receiver, kind, rate, secs, a)
                res[f"{phase}_{kind}"] = r
                print(f"{phase} {kind} @{rate:g}/s: {json.dumps(r)}", flush=True)
    res["load_avg_at_end"] = __import__("os").getloadavg()
    report(res)
    copy = save_json(a.json, res)
    print(f"(figures also in {a.json} and {copy})")
    if a.profile:
        rows = [("drain", r) for r in res.get("drain_bridge", [])]
        rows += [(p, res[f"{p}_bridge"]) for p in ("latency", "sustain") if f"{p}_bridge" in res]
        for phase, r in rows:
            if "profile" in r:
                print(f"\nprofile of the bridge, {phase} ({r['profile']}):")
                print(profile.summary(Path(r["profile"])))


if __name__ == "__main__":
    main()
