"""``wechat-bridge wecom appchat create|get|update``: manage the group chats a WeCom app sends to.

The command uses the credentials of a ``wecom_app`` outbound of the config (``--sink NAME``) and its
token cache in Redis (without a reachable Redis, a token of its own), talks to the API directly and
prints the answer as JSON. A chat created here appears in the members' WeCom only after its first
message; route to it with ``conversation = "chat:<chatid>"``.

    wechat-bridge wecom appchat create --sink wecom --name "Ops" --owner alice --users alice,bob,carol
    wechat-bridge wecom appchat get --sink wecom --chatid wrOps2024
    wechat-bridge wecom appchat update --sink wecom --chatid wrOps2024 --add dave --remove bob
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from adapters.wechat.client import WeComApi
from adapters.wechat.errcodes import ApiError, send_error
from adapters.wecom.app_sink import WeComAppSinkOptions
from bridge.bus import UNAVAILABLE, Keys
from bridge.config import Config, convert
from bridge.embedded_redis import client_url
from bridge.errors import ConfigError, EmbeddedRedisError, SendError


def _users(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="wecom_command", required=True, metavar="{appchat}")
    appchat = sub.add_parser("appchat", help="create, show or change a group chat of a WeCom app")
    ops = appchat.add_subparsers(dest="appchat_command", required=True)

    create = ops.add_parser("create", help="create a group chat (2 to 2000 members)")
    create.add_argument("--sink", required=True, help="a wecom_app outbound of the config")
    create.add_argument("--name", default="", help="the chat's name (at most 50 characters)")
    create.add_argument("--owner", default="", help="the owner's user id (default: one of the members)")
    create.add_argument("--users", required=True, type=_users, help="member user ids, comma-separated")
    create.add_argument("--chatid", default="", help="the chat id to use (letters and digits, ≤ 32)")

    get = ops.add_parser("get", help="show a group chat")
    get.add_argument("--sink", required=True, help="a wecom_app outbound of the config")
    get.add_argument("--chatid", required=True)

    update = ops.add_parser("update", help="rename, change the owner, add or remove members")
    update.add_argument("--sink", required=True, help="a wecom_app outbound of the config")
    update.add_argument("--chatid", required=True)
    update.add_argument("--name", default="")
    update.add_argument("--owner", default="")
    update.add_argument("--add", default=[], type=_users, help="user ids to add, comma-separated")
    update.add_argument("--remove", default=[], type=_users, help="user ids to remove, comma-separated")


def sink_options(config: Config, name: str) -> WeComAppSinkOptions:
    out = config.outbound_by_name(name)
    if out is None or out.type != "wecom_app":
        names = ", ".join(o.name for o in config.outbound if o.type == "wecom_app") or "none"
        raise ConfigError(
            f"{config.path}: no wecom_app outbound named {name!r} (wecom_app outbounds: {names})"
        )
    where = f"outbound.{name}"
    opts = convert(out.options, WeComAppSinkOptions, where, config.path)
    try:
        opts.check()
    except ValueError as e:
        raise ConfigError(f"{config.path}: {where}.{e}") from None
    return opts


async def _redis(config: Config) -> Any | None:
    """The config's Redis for the shared token cache, or None (then the token is our own)."""
    try:
        r = aioredis.Redis.from_url(client_url(config.data_dir, config.redis.url), socket_timeout=5)
    except EmbeddedRedisError:
        return None
    try:
        await r.ping()
    except UNAVAILABLE:
        await r.aclose()
        print("note: Redis is not reachable; fetching a token without the shared cache", file=sys.stderr)
        return None
    return r


def _body(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None, dict[str, str] | None]:
    """(method, path, JSON body, query) of the call the arguments ask for."""
    if args.appchat_command == "create":
        body: dict[str, Any] = {"userlist": args.users}
        for k in ("name", "owner", "chatid"):
            if getattr(args, k):
                body[k] = getattr(args, k)
        return "POST", "/cgi-bin/appchat/create", body, None
    if args.appchat_command == "get":
        return "GET", "/cgi-bin/appchat/get", None, {"chatid": args.chatid}
    body = {"chatid": args.chatid}
    for k in ("name", "owner"):
        if getattr(args, k):
            body[k] = getattr(args, k)
    if args.add:
        body["add_user_list"] = args.add
    if args.remove:
        body["del_user_list"] = args.remove
    return "POST", "/cgi-bin/appchat/update", body, None


async def run_async(args: argparse.Namespace, config: Config) -> int:
    opts = sink_options(config, args.sink)
    method, path, body, query = _body(args)
    target = f"chat:{args.chatid}" if getattr(args, "chatid", "") else ""
    redis = await _redis(config)
    keys = Keys(config.redis.prefix)
    try:
        async with aiohttp.ClientSession() as http:
            api = WeComApi(
                corp_id=opts.corp_id, corp_secret=opts.corp_secret, agent_id=opts.agent_id,
                api_base=opts.api_base, http=lambda: http, timeout=opts.timeout, redis=redis,
                state_key=keys.state,
            )  # fmt: skip
            try:
                answer = await api.call(method, path, params=query, body=body)
            except ApiError as e:
                print(f"error: {send_error(e, target=target)}", file=sys.stderr)
                return 1
            except SendError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    finally:
        if redis is not None:
            await redis.aclose()
    answer = {k: v for k, v in answer.items() if k not in ("errcode", "errmsg")}
    if args.appchat_command == "update":
        answer = {"chatid": args.chatid, "updated": True}
    print(json.dumps(answer.get("chat_info", answer), ensure_ascii=False, indent=2))
    if args.appchat_command == "create":
        print(
            f"note: the chat shows in WeCom after its first message; route to it with "
            f'conversation = "chat:{answer.get("chatid", "")}"',
            file=sys.stderr,
        )
    return 0


def run(args: argparse.Namespace, config: Config) -> int:
    return asyncio.run(run_async(args, config))
