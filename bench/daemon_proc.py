"""The real daemon in its own process, plus what a benchmark needs to read from it.

``python -m bench.daemon_proc --config F --stats-port P [--loop auto|asyncio|uvloop]`` runs
:class:`bridge.daemon.Daemon` exactly as ``wechat-bridge run`` does (on the loop ``run_loop`` picks:
uvloop when installed unless ``--loop asyncio``), and adds two things that do not change its work:

* a count of Redis **round trips**: every ``send_packed_command`` of redis-py's asyncio connection is
  one request written to Redis and answered (a pipeline is one call, so one round trip);
* ``GET http://127.0.0.1:P/stats`` on a second port: round trips, routed/sent/dead counters, RSS, CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from pathlib import Path
from typing import Any

from aiohttp import web

ROUND_TRIPS = 0
#: garbage-collector pauses: count per generation, total and longest, in ms
GC: dict[str, Any] = {"collections": [0, 0, 0], "total_ms": 0.0, "max_ms": 0.0, "long": []}


def watch_gc() -> None:
    import gc

    started = [0.0]

    def cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1e3
        GC["collections"][info["generation"]] += 1
        GC["total_ms"] += ms
        GC["max_ms"] = max(GC["max_ms"], ms)
        if ms >= 5:  # the pauses that can show in a p99: generation, ms, when
            GC["long"] = [*GC["long"][-49:], [info["generation"], round(ms, 1), round(time.time(), 2)]]

    gc.callbacks.append(cb)


#: round trips by the core function that made them (WB_BENCH_RT_SITES=1; a stack walk each: slower)
SITES: dict[str, int] = {}


def _site() -> str:
    import sys

    f: Any = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/bridge/" in name or "/adapters/" in name:
            return f"{Path(name).stem}.{f.f_code.co_name}"
        f = f.f_back
    return "?"


def count_round_trips() -> None:
    from redis.asyncio import connection as rconn

    original = rconn.AbstractConnection.send_packed_command
    sites = bool(os.environ.get("WB_BENCH_RT_SITES"))

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        global ROUND_TRIPS
        ROUND_TRIPS += 1
        if sites:
            k = _site()
            SITES[k] = SITES.get(k, 0) + 1
        await original(self, command, check_health)

    rconn.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


async def main(config_path: str, stats_port: int) -> None:
    from bridge import logging as blog
    from bridge.adapter import Registry
    from bridge.config import load
    from bridge.daemon import Daemon

    cfg = load(Path(config_path), env=dict(os.environ))
    without = set(filter(None, os.environ.get("WB_BENCH_WITHOUT", "").split(",")))
    blog.setup("warning" if "log" in without else cfg.bridge.log_level, cfg.bridge.log_format)
    leave_out(without)
    daemon = Daemon(cfg, Registry.from_module())

    async def stats(_: web.Request) -> web.Response:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return web.json_response(
            {
                "round_trips": ROUND_TRIPS,
                "round_trip_sites": SITES,
                "gc": GC,
                "routed": daemon.router.routed if daemon.router else 0,
                "sent": {n: r.sent for n, r in daemon.runners.items()},
                "dead": {n: r.dead for n, r in daemon.runners.items()},
                "rss_mb": rss_mb(),
                "max_rss_mb": ru.ru_maxrss / 1024.0,
                "cpu_s": ru.ru_utime + ru.ru_stime,
                "ready": daemon.port is not None,
                "port": daemon.port,
                "pid": os.getpid(),
                "loop": type(asyncio.get_running_loop()).__module__,
                "time": time.time(),
            }
        )

    app = web.Application()
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", stats_port).start()
    try:
        await daemon.run_until_stopped()
    finally:
        await runner.cleanup()


def leave_out(parts: set[str]) -> None:
    """For bench/ingest_parts.py: run the daemon without some of its work, to see what each costs.

    ``log``: warnings only (no ``wechat.accepted`` line); ``router``: no router reading the inbound
    stream back; ``publish``: callbacks not stored (answered as if they were); ``handler``: the
    ``wecom_app`` POST handler reads the body and answers, nothing else (what is left is HTTP and the
    daemon's routing of the request). Never for figures of the bridge itself.
    """
    unknown = parts - {"log", "router", "publish", "handler"}
    if unknown:
        raise SystemExit(f"WB_BENCH_WITHOUT: unknown {sorted(unknown)}")
    if "router" in parts:
        from bridge.router import Router

        async def idle(self: Any) -> None:
            await asyncio.Event().wait()

        Router.run = idle  # type: ignore[method-assign]
    if "publish" in parts:
        from bridge.adapter import Context

        async def unstored(self: Any, env: Any, dedupe_key: Any = None, dedupe_ttl: Any = None) -> bool:
            return True

        Context.publish = unstored  # type: ignore[method-assign]
    if "handler" in parts:
        from adapters.wechat.callback import read_body
        from adapters.wecom.app_callback import WeComAppSource

        async def answer(self: Any, request: web.Request, query: Any) -> web.Response:
            await read_body(request, self.options.max_body)
            return web.Response(status=200, body=b"", content_type="text/plain")

        WeComAppSource.accept = answer  # type: ignore[method-assign]


def use_core(path: str) -> None:
    """Run an older core (``bridge/`` and the ``http`` sink copied from a git revision) for a
    before/after figure: ``WB_BENCH_CORE=bench/out/core-before`` (see bench/README.md)."""
    import importlib.util
    import sys

    sys.path.insert(0, path)
    for m in [m for m in sys.modules if m == "bridge" or m.startswith("bridge.")]:
        del sys.modules[m]
    sink = Path(path) / "adapters_generic" / "http_sink.py"
    if sink.exists():
        import adapters.generic

        spec = importlib.util.spec_from_file_location("adapters.generic.http_sink", sink)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["adapters.generic.http_sink"] = mod
        spec.loader.exec_module(mod)
        adapters.generic.http_sink = mod  # type: ignore[attr-defined]


def cli() -> None:
    if os.environ.get("WB_BENCH_CORE"):
        use_core(os.environ["WB_BENCH_CORE"])
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--stats-port", type=int, required=True)
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    a = ap.parse_args()
    count_round_trips()
    watch_gc()
    os.environ["WECHAT_BRIDGE_LOOP"] = a.loop
    import bridge.daemon

    run_loop = getattr(bridge.daemon, "run_loop", None)
    if run_loop is None:  # an older core: asyncio's loop unless uvloop is asked for
        if a.loop == "uvloop":
            import uvloop

            uvloop.run(main(a.config, a.stats_port))
        else:
            asyncio.run(main(a.config, a.stats_port))
    else:
        run_loop(main(a.config, a.stats_port))


if __name__ == "__main__":
    cli()
