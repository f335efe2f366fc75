"""``wechat-bridge wechaty login``: log the bot's WeChat account in, from a terminal.

Uses a ``wechaty`` inbound of the config (``--inbound NAME``; the only one by default): starts the
puppet, opens the Event stream and prints the scan QR code as a link and as a terminal QR code (scan
it with the WeChat app of the bot's account); exits 0 once the account is logged in (at once when it
already is), 1 on a refused token, an unreachable service or ``--timeout``.

While a bridge holds the service's one Event stream, the command cannot open another
(ALREADY_EXISTS): it then follows the login state the bridge records in Redis, and prints the QR
code the bridge received from there.

    wechat-bridge wechaty login --config /etc/wechat-bridge/bridge.toml [--inbound wx] [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from adapters.wechaty.client import AuthError, PuppetClient, PuppetError, StreamBusy
from adapters.wechaty.options import WechatyOptions
from adapters.wechaty.qr import terminal_qr
from adapters.wechaty.source import STATE_ADAPTER, PuppetStatus
from bridge.bus import UNAVAILABLE, Keys
from bridge.config import Config, convert
from bridge.embedded_redis import client_url
from bridge.errors import ConfigError, EmbeddedRedisError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="wechaty_command", required=True, metavar="{login}")
    login = sub.add_parser("login", help="show the scan QR code and wait until the bot is logged in")
    login.add_argument(
        "--inbound", default="", help="a wechaty inbound of the config (default: the only one)"
    )
    login.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the login")


def inbound_options(config: Config, name: str) -> tuple[str, WechatyOptions]:
    found = [i for i in config.inbound if i.type == "wechaty" and (not name or i.name == name)]
    if len(found) != 1:
        names = ", ".join(i.name for i in config.inbound if i.type == "wechaty") or "none"
        what = f"no wechaty inbound named {name!r}" if name else "name one with --inbound"
        raise ConfigError(f"{config.path}: {what} (wechaty inbounds: {names})")
    where = f"inbound.{found[0].name}"
    opts = convert(found[0].options, WechatyOptions, where, config.path)
    try:
        opts.check()
    except ValueError as e:
        raise ConfigError(f"{config.path}: {where}.{e}") from None
    return found[0].name, opts


def _show_qr(qrcode: str) -> None:
    print("Scan this QR code with the WeChat app of the bot's account:", flush=True)
    print(terminal_qr(qrcode), flush=True)
    print(f"(the link in it: {qrcode})", flush=True)


async def _direct(client: PuppetClient, deadline: float) -> int:
    """Our own Event stream: QR codes as they come, until LOGIN."""
    await client.start()
    shown = ""
    async with asyncio.timeout_at(asyncio.get_running_loop().time() + max(deadline - time.time(), 0)):
        async for event, payload in client.events():
            if event == "login":
                contact = str(payload.get("contactId") or "")
                name = ""
                with contextlib.suppress(PuppetError):
                    name = (await client.contact(contact)).name
                print(f"logged in as {contact}" + (f" ({name})" if name else ""), flush=True)
                return 0
            if event == "scan":
                qrcode = str(payload.get("qrcode") or "")
                if qrcode and qrcode != shown:
                    shown = qrcode
                    _show_qr(qrcode)
                elif not qrcode:
                    print(f"scan status: {payload.get('status')}", flush=True)
            elif event == "logout":
                print("the account logged out; waiting for a new QR code", flush=True)
    print("error: the puppet service closed the Event stream before the login", file=sys.stderr)
    return 1


async def _follow_bridge(config: Config, name: str, deadline: float) -> int:
    """The bridge holds the stream: follow the status it records in Redis."""
    try:
        r: Any = aioredis.Redis.from_url(client_url(config.data_dir, config.redis.url), socket_timeout=5)
    except EmbeddedRedisError as e:
        print(f"error: a bridge holds the Event stream and its Redis is not reachable: {e}", file=sys.stderr)
        return 1
    key = Keys(config.redis.prefix).state(STATE_ADAPTER, f"{name}:status")
    print(
        "a running bridge holds the service's Event stream: following the login state it records", flush=True
    )
    shown = ""
    try:
        while time.time() < deadline:
            raw = await r.get(key)
            status = msgspec.json.decode(raw, type=PuppetStatus) if raw else None
            if status is not None and status.state == "logged_in":
                print(
                    f"logged in as {status.self_id}" + (f" ({status.self_name})" if status.self_name else "")
                )
                return 0
            if status is not None and status.qrcode and status.qrcode != shown and status.state == "scan":
                shown = status.qrcode
                _show_qr(status.qrcode)
            await asyncio.sleep(1.0)
    except UNAVAILABLE as e:
        print(f"error: Redis is not reachable: {type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        await r.aclose()
    print("error: not logged in before --timeout", file=sys.stderr)
    return 1


async def login(args: argparse.Namespace, config: Config) -> int:
    name, opts = inbound_options(config, args.inbound)
    deadline = time.time() + args.timeout
    client = opts.client()
    try:
        return await _direct(client, deadline)
    except StreamBusy:
        client.close()
        return await _follow_bridge(config, name, deadline)
    except AuthError as e:
        print(f"error: the puppet service refused the token of inbound.{name}: {e}", file=sys.stderr)
        return 1
    except PuppetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("error: not logged in before --timeout", file=sys.stderr)
        return 1
    finally:
        client.close()


def run(args: argparse.Namespace, config: Config) -> int:
    return asyncio.run(login(args, config))
