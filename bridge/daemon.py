"""One asyncio process: ordered start-up and shut-down, supervised tasks, signals, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from bridge import logging as blog
from bridge.access import Gate
from bridge.adapter import Context, Registry, Sink, Source
from bridge.bus import UNAVAILABLE, Bus, Keys, connect
from bridge.config import Config, load
from bridge.egress import Egress
from bridge.embedded_redis import EmbeddedRedis
from bridge.errors import ConfigError
from bridge.files import private_dir
from bridge.lease import LIVE as LIVE_LEASES
from bridge.lease import Lease
from bridge.listener import Listener, install_accept_guard
from bridge.metrics import Metrics
from bridge.partitions import Members, Partitions, SinkRunners, Worker
from bridge.poller import FeedCollector
from bridge.router import Router, plan
from bridge.status import Heartbeat, gauge, snapshot
from bridge.web import Counters, build_admin_app, build_app

log = blog.get("daemon")

T = TypeVar("T")

#: a supervised task's first restart delay; it doubles per failure up to BACKOFF_MAX, and starts
#: over when the task had run BACKOFF_RESET seconds before failing
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
BACKOFF_RESET = 10.0
Undo = Callable[[], Awaitable[object]]


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (``pip install 'wechat-bridge[uvloop]'``), else on
    asyncio's own loop: uvloop spends less CPU per message on the relay and ingest paths (figures in
    bench/RESULTS.md). ``WECHAT_BRIDGE_LOOP=asyncio`` forces asyncio's loop (the reference: every test
    runs on it), ``=uvloop`` requires uvloop.
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


async def _unfreeze_gc() -> None:
    gc.unfreeze()


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def persistence_risk(conf: dict[str, str]) -> tuple[str, str] | None:
    """What a Redis with these settings (``appendonly``, ``appendfsync``, ``save``) can lose of the
    writes it acknowledged — the callbacks the bridge answered 200 — as (log event, hint); None when
    every acknowledged write is on disk (``appendfsync always``)."""
    aof = conf.get("appendonly", "no")
    save = conf.get("save", "").strip()
    if aof != "yes":
        if not save:
            return ("redis.no_persistence",
                    "appendonly no and no save rules: this Redis keeps nothing on disk; every accepted "
                    "message not yet delivered is lost when Redis restarts. Set appendonly yes "
                    "(appendfsync always to lose nothing acknowledged)")  # fmt: skip
        return ("redis.snapshot_only",
                f"appendonly no, RDB snapshots only (save {save!r}): a Redis crash or restart loses "
                "every message accepted since the last snapshot (up to the save interval). Set "
                "appendonly yes")  # fmt: skip
    fsync = conf.get("appendfsync", "everysec")
    if fsync == "always":
        return None
    if fsync == "everysec":
        return ("redis.fsync_everysec",
                "appendonly yes, appendfsync everysec: a crash of the machine Redis runs on (power "
                "loss, kernel panic) loses up to ~1 s (at worst 2 s) of accepted messages; a crash of "
                "the Redis process alone loses nothing. appendfsync always closes the window")  # fmt: skip
    return ("redis.fsync_os",
            f"appendonly yes, appendfsync {fsync}: the OS flushes the AOF when it likes (about every "
            "30 s on Linux): a machine crash loses up to that much of the accepted messages. Use "
            "appendfsync everysec or always")  # fmt: skip


class Supervisor:
    """The one way the daemon starts a background task: it keeps a reference (a task nobody holds
    may be collected mid-flight), logs a crash with the task's name and count, restarts it with
    back-off, and stops them all."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self._stop = asyncio.Event()
        self.crashes: dict[str, int] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        self.tasks[name] = asyncio.create_task(self._keep(name, factory, restart), name=name)

    async def _keep(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        delay = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            redis_down = False
            try:
                await factory()
                if self.stopping or not restart:
                    return
                log.warning("task.exited", task=name)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as e:
                redis_down = True
                delay = self._fresh(delay, started)
                log.warning("task.redis_unavailable", task=name, error=str(e), retry_in=min(delay, 1.0))
            except Exception:
                delay = self._fresh(delay, started)
                self.crashes[name] = self.crashes.get(name, 0) + 1
                log.exception("task.crashed", task=name, crashes=self.crashes[name], restart_in=delay)
            if self.stopping or not restart:
                return
            # Redis being down is retried at least every second, so work resumes within a second
            # of its return; a crash (a bug) backs off up to BACKOFF_MAX
            wait = min(delay, 1.0) if redis_down else delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)  # a stop cuts the back-off short
            if self.stopping:
                return
            delay = min(delay * 2, BACKOFF_MAX)

    @staticmethod
    def _fresh(delay: float, started: float) -> float:
        """The back-off starts over when the task ran BACKOFF_RESET before failing (a new failure)."""
        return BACKOFF_FIRST if time.monotonic() - started >= BACKOFF_RESET else delay

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


@dataclass(frozen=True)
class Step:
    """One named piece of start-up. ``run`` does it and registers, with :meth:`Lifecycle.on_stop`,
    how to undo what it made, as soon as it made it."""

    name: str
    run: Callable[[], Awaitable[None]]


class Lifecycle:
    """Runs start-up steps in order and their undos in reverse (mautrix's startup and shutdown
    actions, as one list): when step k fails, what steps 1..k registered is undone, last first, and
    the error goes on; :meth:`stop` undoes everything. An undo that fails is logged and the others
    still run: a stop always finishes."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, str, Undo]] = []  # (step, what, action)
        self._step = ""

    def on_stop(self, what: str, action: Undo) -> None:
        """Register ``action`` to run at stop (or when a later step fails), before those already
        registered."""
        self._undo.append((self._step, what, action))

    @property
    def pending(self) -> list[str]:
        """What a stop would undo, in the order it would (for status and tests)."""
        return [what for _, what, _ in reversed(self._undo)]

    async def start(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self._step = step.name
            try:
                await step.run()
            except BaseException as e:
                if isinstance(e, ConfigError):  # the message says it all; no traceback
                    log.error("daemon.step_failed", step=step.name, error=str(e))
                else:
                    log.error("daemon.step_failed", step=step.name, error=type(e).__name__, exc_info=True)
                await self.stop()
                raise
            log.debug("daemon.step_done", step=step.name)
        self._step = ""

    async def stop(self) -> None:
        while self._undo:
            step, what, action = self._undo.pop()
            log.debug("daemon.undo", what=what, step=step)
            try:
                await action()
            except Exception:
                log.exception("daemon.shutdown_step_failed", step=what, started_by=step)


class Daemon:
    """The bridge in one process. Start-up is :meth:`steps`, run in order by a :class:`Lifecycle`;
    a new long-running piece is one more step (start it with ``self.supervisor.spawn``, which also
    stops it) or a source with ``long_running = True``."""

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.from_module()
        self.instance = config.bridge.instance
        self.embedded: EmbeddedRedis | None = None
        self.redis: Any = None
        self.bus: Bus | None = None
        self.sources: dict[str, Source] = {}
        self.sinks: dict[str, Sink] = {}
        self.runners: dict[str, SinkRunners] = {}
        #: the router while this instance holds the ``router`` lease (None when another does)
        self.router: Router | None = None
        self.gate: Gate | None = None
        self._routed_before = 0
        self.members: Members | None = None
        self.router_lease: Partitions | None = None
        self._workers_stop = asyncio.Event()
        self.supervisor = Supervisor()
        self.lifecycle = Lifecycle()
        self.http_session: aiohttp.ClientSession | None = None
        self.app_runner: web.AppRunner | None = None
        self.listeners: dict[str, Listener] = {}
        #: bound ports by listener name (``public``, ``admin``)
        self.ports: dict[str, int] = {}
        self.port: int | None = None
        self._options: dict[str, Any] = {}
        self._stop_requested = asyncio.Event()
        self.metrics = Metrics()
        self.metrics.registry.register(FeedCollector(lambda: self.sources.items()))
        self.heartbeat: Heartbeat | None = None
        self._crashes_counted: dict[str, int] = {}

    # -- start-up: small named steps, each registering its own undo ----------------------------------

    def steps(self) -> list[Step]:
        return [
            Step("validate_config", self._validate_config),
            Step("data_dir", self._make_data_dir),
            Step("redis", self._connect_redis),
            Step("adapters", self._start_adapters),
            Step("http_client", self._own_http_client),
            Step("workers", self._start_workers),
            Step("heartbeat", self._start_heartbeat),
            Step("web", self._serve_http),
            Step("watchdog", self._start_watchdog),
            Step("freeze_gc", self._freeze_gc),
            Step("ready", self._announce_ready),
        ]

    async def start(self) -> None:
        await self.lifecycle.start(self.steps())

    async def _validate_config(self) -> None:
        self._options = self.registry.validate(self.config)

    async def _make_data_dir(self) -> None:
        cfg = self.config
        private_dir(cfg.data_dir)  # 0700, its files 0600 (bridge/files.py)
        log.info("daemon.starting", instance=self.instance, config=str(cfg.path), data_dir=str(cfg.data_dir))

    async def _connect_redis(self) -> None:
        """The embedded Redis when no url is set, the client, the bus. An unreachable Redis does not
        stop the start: /readyz says so and the tasks retry until it answers."""
        cfg = self.config
        url = cfg.redis.url
        if url is None:
            self.embedded = EmbeddedRedis(cfg.data_dir)
            await self.embedded.start()
            self.lifecycle.on_stop("embedded_redis", self.embedded.stop)
            url = self.embedded.url
        self.redis = connect(url, cfg.redis.socket_timeout)
        self.lifecycle.on_stop("redis", self.redis.aclose)
        self.bus = Bus(
            self.redis,
            Keys(cfg.redis.prefix),
            maxlen=cfg.redis.stream_maxlen,
            dead_maxlen=cfg.redis.dead_maxlen,
            dedupe_ttl=cfg.redis.dedupe_ttl,
        )
        self.bus.metrics = self.metrics
        if cfg.redis.wait_replicas:
            self.bus.wait = (cfg.redis.wait_replicas, cfg.redis.wait_timeout_ms)
        try:
            await self.redis.ping()
            await self._check_persistence()
        except UNAVAILABLE as e:
            log.warning("daemon.redis_unavailable", error=str(e))

    async def _start_adapters(self) -> None:
        cfg = self.config
        assert self.bus is not None
        ctx = Context(
            config=cfg,
            bus=self.bus,
            redis=self.redis,
            instance=self.instance,
            data_dir=cfg.data_dir,
            http=self._http,
            egress=Egress(cfg.http.fetch_hosts, cfg.http.fetch_private),
        )
        for i in cfg.inbound:
            scls = self.registry.source(i.type, f"inbound.{i.name}", cfg.path)
            self.sources[i.name] = scls(i.name, self._options[i.name], ctx)
        for o in cfg.outbound:
            kcls = self.registry.sink(o.type, f"outbound.{o.name}", cfg.path)
            self.sinks[o.name] = kcls(o.name, self._options[o.name], ctx)
        for name, adapter in [*self.sinks.items(), *self.sources.items()]:
            await adapter.start()
            self.lifecycle.on_stop(f"adapter:{name}", adapter.close)

    async def _own_http_client(self) -> None:
        """The adapters' shared HTTP client is made on first use; closed at stop, before them."""
        self.lifecycle.on_stop("http_client", self._close_http)

    async def _start_workers(self) -> None:
        """The router (one instance at a time, under the ``router`` lease) and each sink's runners
        (one per partition this instance holds: bridge/partitions.py), as supervised tasks; the
        instance's heartbeat; and the long-running sources."""
        cfg = self.config
        bus = self.bus
        assert bus is not None
        #: access policies and session commands: one gate for every life of the router here
        self.gate = Gate(cfg, bus, functools.partial(plan, cfg), self.sinks)
        ttl = cfg.bridge.lease_ttl
        bus.partitions = {o.name: o.partitions for o in cfg.outbound}
        self.members = members = Members(self.redis, bus.keys, self.instance, ttl=ttl)
        self.router_lease = router_lease = Partitions(
            self.redis, bus.keys, self.members, "router", 1, self.instance, self._make_router, ttl=ttl,
            on_done=self._router_done,
        )  # fmt: skip
        for o in cfg.outbound:
            self.runners[o.name] = SinkRunners(
                self.sinks[o.name], o, bus, self.instance, self.members, ttl=ttl,
                shutdown_timeout=cfg.bridge.shutdown_timeout, max_deliveries=cfg.bridge.max_deliveries,
            )  # fmt: skip
        self.lifecycle.on_stop("workers", self._stop_workers)
        self.supervisor.spawn("members", lambda: members.run(self._workers_stop))
        self.supervisor.spawn("router", lambda: router_lease.run(self._workers_stop))
        for name, runners in self.runners.items():
            self.supervisor.spawn(f"runner:{name}", runners.run)
        for name, src in self.sources.items():
            if src.long_running:
                self.supervisor.spawn(f"source:{name}", src.run)

    async def _start_heartbeat(self) -> None:
        """This instance's heartbeat (``wechat-bridge status`` lists live instances by it)."""
        self.heartbeat = Heartbeat(
            self.redis, Keys(self.config.redis.prefix), self.instance, leases=self._lease_names
        )
        self.supervisor.spawn("heartbeat", self.heartbeat.run)
        self.lifecycle.on_stop("heartbeat", self._stop_heartbeat)

    async def _stop_heartbeat(self) -> None:
        self.supervisor.cancel("heartbeat")
        if self.heartbeat is not None:
            await self.heartbeat.stop()

    def _make_router(self, _n: int, lease: Lease) -> Router:
        assert self.bus is not None
        self.router = Router(self.config, self.bus, self.instance, lease=lease, gate=self.gate)
        return self.router

    def _router_done(self, router: Worker) -> None:
        if isinstance(router, Router):
            self._routed_before += router.routed
            if router is self.router:
                self.router = None

    async def _serve_http(self) -> None:
        http = self.config.http
        admin_at = self.config.admin_listen
        app = build_app(
            self,
            max_body=http.max_body,
            routes=[(name, src.routes()) for name, src in self.sources.items()],
            metrics=self.metrics,
            admin=admin_at is None,
            body_timeout=http.body_timeout,
        )
        undo_accept_guard = install_accept_guard(asyncio.get_running_loop())

        async def restore_handler() -> None:
            undo_accept_guard()

        self.lifecycle.on_stop("accept_guard", restore_handler)
        self.app_runner = await self._listen(app, "public", self.config.listen)
        if admin_at is not None:
            await self._listen(build_admin_app(self), "admin", admin_at)

    async def _listen(self, app: web.Application, name: str, where: tuple[str, int]) -> web.AppRunner:
        """Serve ``app`` on ``where`` through a guarded :class:`Listener` (bridge/listener.py)."""
        http = self.config.http
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=http.keepalive_timeout
        )
        await runner.setup()
        suffix = "" if name == "public" else f":{name}"
        self.lifecycle.on_stop(f"http_server{suffix}", runner.cleanup)
        listener = Listener(
            runner, name, header_timeout=http.header_timeout, max_connections=http.max_connections
        )
        port = await listener.start(*where)
        self.lifecycle.on_stop(f"stop_accepting{suffix}", listener.stop)
        self.listeners[name] = listener
        self.ports[name] = port
        if name == "public":
            self.port = port
        return runner

    async def _start_watchdog(self) -> None:
        wd = os.environ.get("WATCHDOG_USEC")
        if wd and wd.isdigit():
            self.supervisor.spawn("watchdog", lambda: self._watchdog(int(wd) / 2e6))
            self.lifecycle.on_stop("watchdog", self._stop_watchdog)

    async def _stop_watchdog(self) -> None:
        self.supervisor.cancel("watchdog")

    async def _freeze_gc(self) -> None:
        """What start-up made (modules, config, clients) lives as long as the daemon: freeze it out of
        the garbage collector's sight, so a full collection walks only what was made since and its
        pause stays short (the tail of the ingest latency; figures in bench/RESULTS.md).
        ``WECHAT_BRIDGE_GC_FREEZE=0`` leaves the collector as Python sets it."""
        if os.environ.get("WECHAT_BRIDGE_GC_FREEZE", "1").strip() == "0":
            return
        gc.collect()
        gc.freeze()
        self.lifecycle.on_stop("unfreeze_gc", _unfreeze_gc)

    async def _announce_ready(self) -> None:
        sd_notify("READY=1\nSTATUS=running")
        host, _ = self.config.listen
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info("daemon.started", listen=f"{host}:{self.port}", sources=list(self.sources),
                 sinks=list(self.sinks), routes=len(self.config.routes), loop=loop)  # fmt: skip

    async def _check_persistence(self) -> None:
        """Warn when the Redis we use could lose writes it acknowledged, saying what and when."""
        conf: dict[str, str] = {}
        try:
            for name in ("appendonly", "appendfsync", "save"):
                for k, v in (await self.redis.config_get(name)).items():
                    conf[_text(k)] = _text(v)
        except Exception:  # managed Redis often forbids CONFIG: nothing to say then
            return
        risk = persistence_risk(conf)
        if risk is not None:
            log.warning(risk[0], hint=risk[1])

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
        self._workers_stop.set()
        for r in self.runners.values():
            r.stop()
        for s in self.sources.values():
            s.stop()
        # runners bound their own drain by shutdown_timeout; give them a little more, then cancel
        await self.supervisor.stop(self.config.bridge.shutdown_timeout + 5)

    async def _watchdog(self, every: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(every)

    async def stop(self) -> None:
        self.supervisor.cancel("watchdog")  # first: no WATCHDOG=1 after STOPPING=1
        sd_notify("STOPPING=1")
        log.info("daemon.stopping")
        await self.lifecycle.stop()
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

    def counters(self) -> Counters:
        return Counters(
            routed=self._routed_before + (self.router.routed if self.router else 0),
            sent={name: r.sent for name, r in self.runners.items()},
            dead={name: r.dead for name, r in self.runners.items()},
            task_crashes=dict(self.supervisor.crashes),
        )

    def _leases(self) -> list[Lease]:
        """The leases of this daemon (those made on its Redis client)."""
        return [le for le in LIVE_LEASES if le.redis is self.redis]

    def _lease_names(self) -> list[str]:
        return [le.name for le in self._leases()]

    async def exposition(self) -> bytes:
        """/metrics: the counters as counted, the Redis gauges read now (``redis_up`` 0 when it
        did not answer within 2 s)."""
        m = self.metrics
        for task, n in self.supervisor.crashes.items():
            if n > self._crashes_counted.get(task, 0):
                m.task_crashes.labels(task).inc(n - self._crashes_counted.get(task, 0))
                self._crashes_counted[task] = n
        mine = self._leases()
        snap = None
        try:
            assert self.redis is not None
            snap = await asyncio.wait_for(
                snapshot(
                    self.redis,
                    Keys(self.config.redis.prefix),
                    self.sinks,
                    [le.name for le in mine],
                    partitions={o.name: o.partitions for o in self.config.outbound},
                ),
                2.0,
            )
        except Exception as e:
            log.warning("metrics.redis_unavailable", error=type(e).__name__)
        gauge(m, snap, [(le.name, le.held) for le in mine])
        return m.render()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def reload(self) -> bool:
        """SIGHUP (``systemctl reload``): the daemon keeps running and checks the config file again,
        logging whether it is valid (``daemon.reload_checked``); changes take effect on a restart. It
        never stops the service. Returns whether the file is valid."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            load(self.config.path)
        except ConfigError as e:
            log.error("daemon.reload_checked", valid=False, error=str(e))
            return False
        finally:
            sd_notify("READY=1\nSTATUS=running")
        log.info("daemon.reload_checked", valid=True, note="changes take effect on restart")
        return True

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()
