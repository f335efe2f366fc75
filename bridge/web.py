"""The daemon's aiohttp apps: /healthz, /readyz, /metrics and the inbound adapters' routes.

With ``[http] admin_listen`` set, /readyz and /metrics move to a second app on that (private) address
(:func:`build_admin_app`) and the public one keeps /healthz and the inbound routes. Every answer says
``Server: wechat-bridge`` (no Python or aiohttp version); /healthz names no host; what /readyz says
goes through :func:`bridge.redact.scrub` (a URL with a password in it is shown without it).

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
from bridge.limits import BODY_TIMEOUT_KEY
from bridge.listener import request_in_progress
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.redact import scrub

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
    """``handler`` of inbound ``name``, counting the requests it received (its refusals are counted
    by :mod:`bridge.refusals`, with their reason)."""
    received = metrics.received.labels(name)

    async def count(request: web.Request) -> web.StreamResponse:
        received.inc()
        return await handler(request)

    return count


#: what every answer says in its ``Server`` header (aiohttp's default names Python's and its version)
SERVER = "wechat-bridge"


async def _server_header(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


def _app(max_body: int, body_timeout: float | None) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[request_in_progress])
    app.on_response_prepare.append(_server_header)
    if body_timeout is not None:
        app[BODY_TIMEOUT_KEY] = body_timeout
    return app


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def _add_admin_routes(app: web.Application, status: Status) -> None:
    async def readyz(_: web.Request) -> web.Response:
        problems = {k: scrub(v) for k, v in (await status.readiness()).items()}
        body = {"ready": not problems, "instance": status.instance, "not_ready": problems}
        return web.json_response(body, status=200 if not problems else 503)

    async def prometheus(_: web.Request) -> web.Response:
        body = await status.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/readyz", guarded(readyz))
    app.router.add_get("/metrics", guarded(prometheus))


def build_admin_app(status: Status) -> web.Application:
    """The private app for ``[http] admin_listen``: /healthz, /readyz and /metrics."""
    app = _app(4096, None)
    app.router.add_get("/healthz", guarded(_healthz))
    _add_admin_routes(app, status)
    return app


def build_app(
    status: Status,
    *,
    max_body: int,
    routes: Iterable[tuple[str, Sequence[HttpRoute]]] = (),
    admin: bool = True,
    body_timeout: float | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The app: /healthz, each inbound's routes (``routes``: by inbound name) and, with ``admin``
    (no separate admin listener), /readyz and /metrics; ``body_timeout``: the body read deadline of
    its inbounds (:func:`bridge.limits.read_capped`); each inbound's requests counted in ``metrics``
    when given.

    Two inbounds claiming the same method and path is a configuration error naming both."""
    app = _app(max_body, body_timeout)
    app.router.add_get("/healthz", guarded(_healthz))
    if admin:
        _add_admin_routes(app, status)
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
