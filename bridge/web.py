"""The daemon's one aiohttp app: /healthz, /readyz, /metrics and the inbound adapters' routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge import logging as blog
from bridge.bus import UNAVAILABLE, BusUnavailable
from bridge.poller import feed_metric_lines

if TYPE_CHECKING:
    from bridge.daemon import Daemon

log = blog.get("web")


def guarded(handler: Any) -> Any:
    """``handler`` with the part written once for every inbound: Redis down → 503 (the platform
    retries), nothing lost; a bug → 500 with a log line, never a traceback to the caller.

    A wrapper per route rather than an aiohttp middleware: the same effect, without the middleware
    machinery aiohttp then runs on every request (a few percent of a callback's cost)."""

    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except web.HTTPException:
            raise
        except (BusUnavailable, *UNAVAILABLE) as e:
            log.warning("http.bus_unavailable", path=request.path, error=type(e).__name__)
            return web.Response(status=503, text="service unavailable, retry later")
        except Exception:
            log.exception("http.handler_error", path=request.path, method=request.method)
            return web.Response(status=500, text="internal error")

    return guard


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=daemon.config.http.max_body)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "instance": daemon.instance})

    async def readyz(_: web.Request) -> web.Response:
        problems = await daemon.readiness()
        body = {"ready": not problems, "instance": daemon.instance, "not_ready": problems}
        return web.json_response(body, status=200 if not problems else 503)

    async def metrics(_: web.Request) -> web.Response:
        lines = [
            "# TYPE wechat_bridge_routed_total counter",
            f"wechat_bridge_routed_total {daemon.router.routed if daemon.router else 0}",
            "# TYPE wechat_bridge_sent_total counter",
            "# TYPE wechat_bridge_dead_total counter",
        ]
        for name, r in daemon.runners.items():
            lines.append(f'wechat_bridge_sent_total{{sink="{name}"}} {r.sent}')
            lines.append(f'wechat_bridge_dead_total{{sink="{name}"}} {r.dead}')
        for name, c in daemon.supervisor.crashes.items():
            lines.append(f'wechat_bridge_task_crashes_total{{task="{name}"}} {c}')
        lines += feed_metric_lines(daemon.sources.items())  # polls, items, errors per feed
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    app.router.add_get("/healthz", guarded(healthz))
    app.router.add_get("/readyz", guarded(readyz))
    app.router.add_get("/metrics", guarded(metrics))
    taken: dict[tuple[str, str], str] = {}
    for name, src in daemon.sources.items():
        for route in src.routes():
            key = (route.method.upper(), route.path)
            if key in taken:
                raise ValueError(f"inbound.{name}.path: {route.path} is already served by {taken[key]}")
            taken[key] = name
            app.router.add_route(route.method, route.path, guarded(route.handler))
    return app
