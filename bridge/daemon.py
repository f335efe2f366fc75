"""One asyncio process: ordered start-up and shut-down, supervised tasks, signals, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from bridge import logging as blog
from bridge.adapter import Context, Registry, Sink, Source
from bridge.bus import UNAVAILABLE, Bus, Keys, connect
from bridge.config import Config
from bridge.embedded_redis import EmbeddedRedis
from bridge.router import Router
from bridge.runner import Runner
from bridge.web import build_app

log = blog.get("daemon")

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (``pip install 'wechat-bridge[uvloop]'``), else on
    asyncio's own loop. uvloop takes about a third less CPU per message on the relay and ingest paths
    (bench/RESULTS.md). ``WECHAT_BRIDGE_LOOP=asyncio`` forces asyncio's loop, ``=uvloop`` requires uvloop.
    """
    choice = os.environ.get("WECHAT_BRIDGE_LOOP", "auto").strip().lower() or "auto"
    if choice not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"WECHAT_BRIDGE_LOOP={choice!r}: expected auto, asyncio or uvloop")
    try:
        if choice != "asyncio":
            try:
                import uvloop
            except ImportError:
                if choice == "uvloop":
                    raise
            else:
                return uvloop.run(main)
        return asyncio.run(main)
    finally:
        blog.flush()  # log lines of the loop's last turn


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) our state; a no-op without NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify.failed", error=str(e))
        return False


class Supervisor:
    """Starts background tasks, keeps references, restarts a crashed one with backoff."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self._stop = asyncio.Event()
        self.crashes: dict[str, int] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        self.tasks[name] = asyncio.create_task(self._keep(name, factory, restart), name=name)

    async def _keep(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        delay = 0.5
        while True:
            try:
                await factory()
                if self.stopping or not restart:
                    return
                log.warning("task.exited", task=name)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as e:
                log.warning("task.redis_unavailable", task=name, error=str(e), retry_in=delay)
            except Exception:
                self.crashes[name] = self.crashes.get(name, 0) + 1
                log.exception("task.crashed", task=name, restart_in=delay)
            if self.stopping or not restart:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)  # a stop cuts the back-off short
            if self.stopping:
                return
            delay = min(delay * 2, 30.0)

    def cancel(self, name: str) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self._stop.set()
        tasks = list(self.tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Daemon:
    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.from_module()
        self.instance = config.bridge.instance
        self.embedded: EmbeddedRedis | None = None
        self.redis: Any = None
        self.bus: Bus | None = None
        self.sources: dict[str, Source] = {}
        self.sinks: dict[str, Sink] = {}
        self.runners: dict[str, Runner] = {}
        self.router: Router | None = None
        self.supervisor = Supervisor()
        self.http_session: aiohttp.ClientSession | None = None
        self.app_runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.port: int | None = None
        self._shutdown: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self._stop_requested = asyncio.Event()

    # -- start-up: each step registers its own undo, run in reverse at stop --------------------------

    async def start(self) -> None:
        cfg = self.config
        options = self.registry.validate(cfg)
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("daemon.starting", instance=self.instance, config=str(cfg.path), data_dir=str(data_dir))

        url = cfg.redis.url
        if url is None:
            self.embedded = EmbeddedRedis(data_dir)
            await self.embedded.start()
            self._shutdown.append(("embedded_redis", self.embedded.stop))
            url = self.embedded.url
        self.redis = connect(url, cfg.redis.socket_timeout)
        self._shutdown.append(("redis", self.redis.aclose))
        self.bus = Bus(
            self.redis,
            Keys(cfg.redis.prefix),
            maxlen=cfg.redis.stream_maxlen,
            dead_maxlen=cfg.redis.dead_maxlen,
            dedupe_ttl=cfg.redis.dedupe_ttl,
        )
        try:
            await self.redis.ping()
            await self._check_persistence()
        except UNAVAILABLE as e:  # start anyway: /readyz says so and tasks retry until it answers
            log.warning("daemon.redis_unavailable", error=str(e))

        ctx = Context(
            config=cfg,
            bus=self.bus,
            redis=self.redis,
            instance=self.instance,
            data_dir=data_dir,
            http=self._http,
        )
        for i in cfg.inbound:
            scls = self.registry.source(i.type, f"inbound.{i.name}", cfg.path)
            self.sources[i.name] = scls(i.name, options[i.name], ctx)
        for o in cfg.outbound:
            kcls = self.registry.sink(o.type, f"outbound.{o.name}", cfg.path)
            self.sinks[o.name] = kcls(o.name, options[o.name], ctx)
        for name, adapter in [*self.sinks.items(), *self.sources.items()]:
            await adapter.start()
            self._shutdown.append((f"adapter:{name}", adapter.close))
        self._shutdown.append(("http_client", self._close_http))

        self.router = Router(cfg, self.bus, self.instance)
        for o in cfg.outbound:
            self.runners[o.name] = Runner(
                self.sinks[o.name], o, self.bus, self.instance, shutdown_timeout=cfg.bridge.shutdown_timeout
            )
        self._shutdown.append(("workers", self._stop_workers))
        self.supervisor.spawn("router", self.router.run)
        for name, runner in self.runners.items():
            self.supervisor.spawn(f"runner:{name}", runner.run)
        for name, src in self.sources.items():
            if src.long_running:
                self.supervisor.spawn(f"source:{name}", src.run)

        app = build_app(self)
        self.app_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.app_runner.setup()
        self._shutdown.append(("http_server", self.app_runner.cleanup))
        host, port = cfg.listen
        self.site = web.TCPSite(self.app_runner, host, port, reuse_address=True)
        await self.site.start()
        server: Any = self.site._server
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
        self._shutdown.append(("stop_accepting", self.site.stop))
        wd = os.environ.get("WATCHDOG_USEC")
        if wd and wd.isdigit():
            self.supervisor.spawn("watchdog", lambda: self._watchdog(int(wd) / 2e6))
        # What start-up made (modules, config, clients) lives as long as the daemon: freeze it out of
        # the garbage collector's sight, so a full collection walks only what was made since — its
        # pause fell from ~20 ms to ~1 ms, the tail of the ingest latency (bench/RESULTS.md)
        gc.collect()
        gc.freeze()
        sd_notify("READY=1\nSTATUS=running")
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info("daemon.started", listen=f"{host}:{self.port}", sources=list(self.sources),
                 sinks=list(self.sinks), routes=len(cfg.routes), loop=loop)  # fmt: skip

    async def _check_persistence(self) -> None:
        """Warn when Redis keeps nothing on disk: then "stored" does not survive a Redis restart."""
        try:
            conf = await self.redis.config_get("appendonly")
            conf.update(await self.redis.config_get("save"))
        except Exception:  # managed Redis often forbids CONFIG: nothing to say then
            return
        aof = conf.get(b"appendonly", conf.get("appendonly"))
        save = conf.get(b"save", conf.get("save"))
        if aof in (b"no", "no") and save in (b"", ""):
            log.warning(
                "redis.no_persistence",
                hint="this Redis keeps nothing on disk: set appendonly yes, or accepted messages "
                "are lost when Redis restarts",
            )

    def _http(self) -> aiohttp.ClientSession:
        if self.http_session is None or self.http_session.closed:
            self.http_session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30, connect=10),
                connector=aiohttp.TCPConnector(limit=256),
            )
        return self.http_session

    async def _close_http(self) -> None:
        if self.http_session is not None:
            await self.http_session.close()

    async def _stop_workers(self) -> None:
        if self.router:
            self.router.stop()
        for r in self.runners.values():
            r.stop()
        for src in self.sources.values():  # pollers and streams return from run()
            src.stop()
        # runners bound their own drain by shutdown_timeout; give them a little more, then cancel
        await self.supervisor.stop(self.config.bridge.shutdown_timeout + 5)

    async def _watchdog(self, every: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(every)

    async def stop(self) -> None:
        self.supervisor.cancel("watchdog")
        sd_notify("STOPPING=1")
        log.info("daemon.stopping")
        while self._shutdown:
            name, action = self._shutdown.pop()
            try:
                await action()
            except Exception:
                log.exception("daemon.shutdown_step_failed", step=name)
        log.info("daemon.stopped")

    async def readiness(self) -> dict[str, str]:
        """What is not ready, by name (empty when all is)."""
        problems: dict[str, str] = {}
        try:
            assert self.redis is not None
            await asyncio.wait_for(self.redis.ping(), 2.0)
        except Exception as e:
            problems["redis"] = f"unreachable: {type(e).__name__}"
        for name, a in [*self.sources.items(), *self.sinks.items()]:
            try:
                why = await asyncio.wait_for(a.ready(), 2.0)
            except Exception as e:
                why = f"readiness check failed: {type(e).__name__}"
            if why:
                problems[name] = why
        return problems

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
