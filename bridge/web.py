"""The daemon's one aiohttp app: /healthz, /readyz, /metrics and the inbound adapters' routes.

The app sees the daemon only through :class:`Status`, the little it needs to answer those three
endpoints, so this module does not import the daemon (and the daemon imports it without a cycle).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from bridge import logging as blog
from bridge.adapter import Handler, HttpRoute
from bridge.bus import UNAVAILABLE
from bridge.errors import BusUnavailable
from bridge.metrics import CONTENT_TYPE, Metrics

log = blog.get("web")


@dataclass(frozen=True)
class Counters:
    """A daemon's counts at a glance (tests, bench): routed, sent and dead-lettered per sink, crashes
    per task. /metrics shows these and much more (:mod:`bridge.metrics`)."""

    routed: int = 0
    sent: Mapping[str, int] = field(default_factory=dict)
    dead: Mapping[str, int] = field(default_factory=dict)
    task_crashes: Mapping[str, int] = field(default_factory=dict)


class Status(Protocol):
    """What the web app asks of the daemon."""

    @property
    def instance(self) -> str:
        """This daemon's instance name (in /healthz and /readyz)."""
        ...

    async def readiness(self) -> dict[str, str]:
        """What is not ready, by name, and why (empty when all is)."""
        ...

    async def exposition(self) -> bytes:
        """The Prometheus exposition /metrics serves, its Redis gauges refreshed now."""
        ...


def guarded(handler: Handler) -> Handler:
    """``handler`` with the part written once for every inbound: Redis down → 503 (the platform
    retries), nothing lost; a bug → 500 with a log line, never a traceback to the caller.

    A wrapper per route rather than an aiohttp middleware: the same effect, without the middleware
    machinery aiohttp would then run on every request, the health probes included."""

    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (BusUnavailable, *UNAVAILABLE) as e:
            log.warning("http.bus_unavailable", path=request.path, error=type(e).__name__)
            return web.Response(status=503, text="service unavailable, retry later")
        except Exception:
            log.exception("http.handler_error", path=request.path, method=request.method)
            return web.Response(status=500, text="internal error")

    return guard


def counted(name: str, handler: Handler, metrics: Metrics) -> Handler:
    """``handler`` of inbound ``name``, counting what it received and what it refused (a 4xx answer,
    by status: the adapter said why in its log line)."""
    received = metrics.received.labels(name)

    async def count(request: web.Request) -> web.StreamResponse:
        received.inc()
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            if 400 <= e.status < 500:
                metrics.refused.labels(name, str(e.status)).inc()
            raise
        if 400 <= resp.status < 500:
            metrics.refused.labels(name, str(resp.status)).inc()
        return resp

    return count


def build_app(
    status: Status,
    *,
    max_body: int,
    routes: Iterable[tuple[str, Sequence[HttpRoute]]] = (),
    metrics: Metrics | None = None,
) -> web.Application:
    """The app: the three status endpoints and each inbound's routes (``routes``: by inbound name),
    counted in ``metrics`` when given.

    Two inbounds claiming the same method and path is a configuration error naming both."""
    app = web.Application(client_max_size=max_body)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "instance": status.instance})

    async def readyz(_: web.Request) -> web.Response:
        problems = await status.readiness()
        body = {"ready": not problems, "instance": status.instance, "not_ready": problems}
        return web.json_response(body, status=200 if not problems else 503)

    async def prometheus(_: web.Request) -> web.Response:
        body = await status.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", guarded(healthz))
    app.router.add_get("/readyz", guarded(readyz))
    app.router.add_get("/metrics", guarded(prometheus))
    taken: dict[tuple[str, str], str] = {}
    for name, declared in routes:
        for route in declared:
            key = (route.method.upper(), route.path)
            if key in taken:
                raise ValueError(f"inbound.{name}.path: {route.path} is already served by {taken[key]}")
            taken[key] = name
            handler = route.handler if metrics is None else counted(name, route.handler, metrics)
            app.router.add_route(route.method, route.path, guarded(handler))
    return app
