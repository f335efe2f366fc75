"""Limits on what an inbound request may cost before it is trusted: body size and read deadlines.

Every inbound reads its body through :func:`read_capped`: refused (413) when ``Content-Length``
announces more than the cap, without reading a byte; otherwise read in chunks up to the cap, refused
(413) the moment it passes it and (408) when it takes longer than the deadline. A refusal before the
body was read closes the connection (``Connection: close``), so the unread rest is never drained.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

#: seconds a request may take to send its body once its headers are in (when its app sets none)
BODY_TIMEOUT = 10.0
#: where an app keeps its own body deadline (``[http] body_timeout``)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)


class Refusal(Protocol):
    def __call__(self, status: int, reason: str) -> Exception: ...


async def read_capped(request: web.Request, cap: int, deadline: float | None, refuse: Refusal) -> bytes:
    """The body of ``request``: at most ``cap`` bytes, within ``deadline`` seconds (when None: the
    app's ``BODY_TIMEOUT_KEY``, else :data:`BODY_TIMEOUT`); refusals are ``refuse(status, reason)``."""
    if deadline is None:
        deadline = request.config_dict.get(BODY_TIMEOUT_KEY, BODY_TIMEOUT)
    if request.content_length is not None and request.content_length > cap:
        raise refuse(413, "body too large")
    buf = bytearray()
    try:
        async with asyncio.timeout(deadline):
            while True:
                chunk = await request.content.read(cap + 1 - len(buf))
                if not chunk:
                    break
                buf += chunk
                if len(buf) > cap:
                    raise refuse(413, "body too large")
    except HttpProcessingError:
        raise refuse(400, "unreadable body") from None
    except TimeoutError:
        raise refuse(408, "body too slow") from None
    return bytes(buf)
