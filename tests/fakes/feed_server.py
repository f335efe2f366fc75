"""What the fake feed APIs share: a local aiohttp server, a request log, queued faults, and a count
of requests in flight (the largest ever seen shows whether two pollers overlapped)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Fault:
    """The answer the next request gets instead of the real one."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeFeedServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        #: faults for given requests, by their number (1 = the first request served)
        self.fault_at: dict[int, Fault] = {}
        #: seconds each request takes (to make overlapping polls visible)
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.base = ""
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> str:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"
        return self.base

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def enter(self, request: web.Request, **extra: Any) -> Fault | None:
        """Log the request, count it in flight, wait ``delay``; the queued fault to answer, if any."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.requests.append({"path": request.path, "query": dict(request.query), **extra})
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if len(self.requests) in self.fault_at:
            return self.fault_at.pop(len(self.requests))
        return self.faults.pop(0) if self.faults else None
