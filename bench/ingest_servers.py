"""The two baselines of the ingest benchmark, each its own process on the same event loop as the bridge.

* ``--kind bare``: aiohttp answering ``success`` to every POST, reading the body and nothing else;
* ``--kind wechatpy``: what a user would otherwise write — aiohttp + wechatpy's WeCom crypto
  (signature check, AES decrypt, receive-id check) + wechatpy's XML parse into a message object,
  answering ``success``, without any durability (nothing stored, no dedupe).

wechatpy 1.8.18 installs and imports on Python 3.11 (with pycryptodome as its AES backend).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import web


def bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="success")

    app = web.Application()
    app.router.add_post("/wecom/callback", handle)
    app.router.add_get("/healthz", lambda _: _ok())
    return app


async def _ok() -> web.Response:
    return web.Response(text="ok")


def wechatpy_app(token: str, aes_key: str, corp_id: str) -> web.Application:
    from wechatpy.enterprise import parse_message
    from wechatpy.enterprise.crypto import WeChatCrypto
    from wechatpy.exceptions import InvalidSignatureException

    crypto = WeChatCrypto(token, aes_key, corp_id)

    async def handle(request: web.Request) -> web.Response:
        q = request.query
        body = await request.read()
        try:
            xml = crypto.decrypt_message(body, q["msg_signature"], q["timestamp"], q["nonce"])
        except InvalidSignatureException:
            return web.Response(status=403, text="bad signature")
        msg: Any = parse_message(xml)
        if not msg.source:
            return web.Response(status=400, text="no sender")
        return web.Response(text="success")

    app = web.Application()
    app.router.add_post("/wecom/callback", handle)
    app.router.add_get("/healthz", lambda _: _ok())
    return app


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("bare", "wechatpy"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--aes-key", default="")
    ap.add_argument("--corp-id", default="")
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    app = bare_app() if a.kind == "bare" else wechatpy_app(a.token, a.aes_key, a.corp_id)
    if a.uvloop:
        import uvloop

        uvloop.run(serve(app, a.port))
    else:
        asyncio.run(serve(app, a.port))


if __name__ == "__main__":
    main()
