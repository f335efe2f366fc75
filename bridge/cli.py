"""``wechat-bridge`` (also ``python -m bridge``): run, check-config, tail, inject, status, poll, dead,
pairing.

Every command takes ``--config F`` (default ``$WECHAT_BRIDGE_CONFIG``, then ``./bridge.toml``). On
the embedded default the commands talk to the running daemon's Redis through its socket.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from bridge import logging as blog
from bridge.adapter import Registry
from bridge.bus import Bus, Field, Keys, connect
from bridge.config import Config, load
from bridge.dead import DeadLetters
from bridge.embedded_redis import client_url
from bridge.envelope import Conversation, Sender, make_envelope
from bridge.errors import ConfigError, EmbeddedRedisError
from bridge.poller import configure_poll, feed_status, feed_table, is_feed, poll_once
from bridge.redact import masked
from bridge.status import snapshot, table

#: a sub-command contributed by the adapters: (configure its parser, run it)
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Config], int]]


def _default_config() -> str:
    return os.environ.get("WECHAT_BRIDGE_CONFIG", "bridge.toml")


def _redis(cfg: Config) -> Any:
    return connect(client_url(cfg.data_dir, cfg.redis.url), 10.0)


def _bus(cfg: Config, r: Any) -> Bus:
    bus = Bus(r, Keys(cfg.redis.prefix), maxlen=cfg.redis.stream_maxlen, dedupe_ttl=cfg.redis.dedupe_ttl)
    bus.partitions = {o.name: o.partitions for o in cfg.outbound}
    return bus


def _entry_order(entry: tuple[Any, Any]) -> tuple[int, int]:
    ms, _, seq = entry[0].decode().partition("-")
    return int(ms), int(seq or 0)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from bridge.daemon import Daemon, run_loop

    daemon = Daemon(cfg, Registry.from_module(args.adapters))
    run_loop(daemon.run_until_stopped())
    return 0


def cmd_check(args: argparse.Namespace, cfg: Config) -> int:
    options = Registry.from_module(args.adapters).validate(cfg)
    out: dict[str, Any] = {
        "config": str(cfg.path),
        "instance": cfg.bridge.instance,
        "data_dir": str(cfg.data_dir),
        "redis": masked(cfg.redis.url) if cfg.redis.url else f"embedded ({cfg.data_dir / 'redis.sock'})",
        "listen": cfg.http.listen,
        "inbound": [
            {"name": i.name, "type": i.type, "reply_via": i.reply_via,
             "options": masked(msgspec.to_builtins(options[i.name], enc_hook=str))}
            for i in cfg.inbound
        ],
        "outbound": [
            {"name": o.name, "type": o.type, "rate": o.rate, "default_conversation": o.default_conversation,
             "options": masked(msgspec.to_builtins(options[o.name], enc_hook=str))}
            for o in cfg.outbound
        ],
        "routes": [
            {"name": r.name, "from": r.sources, "to": [msgspec.to_builtins(t) for t in r.to],
             "match": msgspec.to_builtins(r.match), "reply": r.reply}
            for r in cfg.routes
        ],
    }  # fmt: skip
    print(json.dumps(out, indent=2, ensure_ascii=False))
    print("config OK", file=sys.stderr)
    return 0


async def _tail(cfg: Config, stream: str, count: int) -> int:
    r = _redis(cfg)
    try:
        keys = [Keys(cfg.redis.prefix).stream(stream)]
        if stream.startswith("out:"):  # every partition of the sink, merged by entry id
            keys = _bus(cfg, r).out_streams(stream[4:])
        entries = [e for key in keys for e in await r.xrevrange(key, count=count)]
        entries = sorted(entries, key=_entry_order)[-count:]
        for eid, fields in entries:
            row: dict[str, Any] = {"id": eid.decode()}
            for k, v in fields.items():
                name = k.decode()
                try:
                    row[name] = json.loads(v) if name in (Field.ENVELOPE, Field.DELIVERY) else v.decode()
                except (ValueError, UnicodeDecodeError):
                    row[name] = v.decode(errors="replace")
            print(json.dumps(row, ensure_ascii=False))
    finally:
        await r.aclose()
    return 0


def cmd_tail(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_tail(cfg, args.stream, args.count))


async def _inject(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.inbound_by_name(args.inbound) is None:
        names = ", ".join(i.name for i in cfg.inbound) or "none"
        print(f"error: no inbound named {args.inbound!r} in {cfg.path} (inbound: {names})", file=sys.stderr)
        return 1
    env = make_envelope(
        args.inbound,
        Conversation(args.conversation, "group" if args.group else "direct", args.title),
        args.text,
        sender=Sender(args.sender, args.sender_name),
        mentions_me=args.mention,
        meta={"injected": "1"},
    )
    r = _redis(cfg)
    try:
        stored = await _bus(cfg, r).publish(env)
    finally:
        await r.aclose()
    print(json.dumps({"envelope": env.id, "stored": stored}))
    return 0


def cmd_inject(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_inject(cfg, args))


async def _status(cfg: Config, as_json: bool, scan: bool, registry: Registry | None = None) -> int:
    r = _redis(cfg)
    try:
        partitions = {o.name: o.partitions for o in cfg.outbound}
        snap = await snapshot(r, Keys(cfg.redis.prefix), list(partitions), partitions=partitions, scan=scan)
        feeds: dict[str, Any] = {}
        if registry is not None:  # the feeds' cursor, last success, last error, next poll
            names = [
                i.name for i in cfg.inbound if is_feed(registry.source(i.type, f"inbound.{i.name}", cfg.path))
            ]
            if names:
                feeds = await feed_status(r, Keys(cfg.redis.prefix), names)
    finally:
        await r.aclose()
    if as_json:
        out = snap.to_json()
        if feeds:
            out["feeds"] = feeds
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(table(snap))
        if feeds:
            print(feed_table(feeds))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    as_json = args.json or not (args.table or sys.stdout.isatty())
    return asyncio.run(_status(cfg, as_json, args.scan, Registry.from_module(args.adapters)))


def cmd_poll(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(
        poll_once(cfg, args, Registry.from_module(args.adapters), client_url(cfg.data_dir, cfg.redis.url))
    )


async def _dead(cfg: Config, args: argparse.Namespace) -> int:
    r = _redis(cfg)
    bus = _bus(cfg, r)
    dead = DeadLetters(r, bus.keys, maxlen=cfg.redis.stream_maxlen, stream_of=bus.stream_of)
    try:
        if args.action == "list":
            for dl in await dead.oldest(args.count):
                print(json.dumps(dl.summary(), ensure_ascii=False))
            return 0
        if args.action == "show":
            if len(args.ids) != 1:
                print("error: dead show: give one dead-letter id (from `dead list`)", file=sys.stderr)
                return 2
            [dl] = await dead.get(args.ids)
            print(json.dumps(dl.full(), indent=2, ensure_ascii=False))
            return 0
        if bool(args.ids) == bool(args.all):
            what = f"dead {args.action}: give dead-letter ids (from `dead list`) or --all"
            print(f"error: {what}", file=sys.stderr)
            return 2
        if args.action == "purge":
            print(json.dumps({"purged": await dead.purge(None if args.all else args.ids)}))
            return 0
        letters = await dead.oldest() if args.all else await dead.get(args.ids)
        res = await dead.replay(letters, {o.name for o in cfg.outbound})
        for eid, why in res.skipped.items():
            print(f"skipped {eid}: {why}", file=sys.stderr)
        print(json.dumps({"replayed": len(res.replayed), "skipped": len(res.skipped)}))
        return 0
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    finally:
        await r.aclose()


def cmd_dead(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_dead(cfg, args))


async def _pairing(cfg: Config, args: argparse.Namespace) -> int:
    from bridge.pairing import Pairing, PairingError

    r = _redis(cfg)
    try:
        p = Pairing(r, cfg.redis.prefix)
        if args.action == "list":
            pending = [
                {"inbound": x.inbound, "sender": x.sender, "code": x.code, "expires_at": x.expires_ms / 1000}
                for x in await p.pending()
            ]
            print(json.dumps({"pending": pending, "paired": await p.paired()}, indent=2, ensure_ascii=False))
            return 0
        if len(args.arg) != 1:
            what = "CODE" if args.action == "approve" else "SENDER"
            print(f"error: pairing {args.action}: give one {what}", file=sys.stderr)
            return 2
        if args.inbound is not None and cfg.inbound_by_name(args.inbound) is None:
            print(f"error: no inbound named {args.inbound!r} in {cfg.path}", file=sys.stderr)
            return 1
        if args.action == "approve":
            try:
                inbound, sender = await p.approve(args.arg[0])
            except PairingError as e:
                print(f"error: pairing approve: {e}", file=sys.stderr)
                return 1
            print(json.dumps({"approved": sender, "inbound": inbound}, ensure_ascii=False))
            return 0
        found = await p.revoke(args.arg[0], args.inbound)
        print(json.dumps({"revoked": args.arg[0], "inbounds": found}, ensure_ascii=False))
        return 0 if found else 1
    finally:
        await r.aclose()


def cmd_pairing(args: argparse.Namespace, cfg: Config) -> int:
    return asyncio.run(_pairing(cfg, args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wechat-bridge", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument(
        "--config", default=None, help="config file (default: $WECHAT_BRIDGE_CONFIG, ./bridge.toml)"
    )
    p.add_argument("--adapters", default="adapters", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace, Config], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "run the daemon")
    add("check-config", cmd_check, "validate the config; print adapters and routes, secrets masked")
    t = add("tail", cmd_tail, "print the last entries of a stream as JSON lines, oldest first")
    t.add_argument("stream", help="inbound, out:<sink> or dead")
    t.add_argument("--count", "-n", type=int, default=10)
    i = add("inject", cmd_inject, "publish a test envelope as if an inbound had received it")
    i.add_argument("--inbound", required=True)
    i.add_argument("--conversation", required=True)
    i.add_argument("--text", required=True)
    i.add_argument("--sender", default="cli")
    i.add_argument("--sender-name", default=None)
    i.add_argument("--title", default=None)
    i.add_argument("--group", action="store_true", help="the conversation is a group")
    i.add_argument("--mention", action="store_true", help="the message mentions the bot")
    st = add(
        "status", cmd_status, "streams, lag, pending, dead letters, live instances, lease holders, feeds"
    )
    fmt = st.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON (the default when not on a terminal)")
    fmt.add_argument("--table", action="store_true", help="tables (the default on a terminal)")
    st.add_argument("--scan", action="store_true",
                    help="also find leases no live instance names (SCANs the whole keyspace)")  # fmt: skip
    dl = add("dead", cmd_dead, "list, show, replay or purge dead letters")
    dl.add_argument("action", choices=["list", "show", "replay", "purge"])
    dl.add_argument("ids", nargs="*", help="dead-letter ids (from `dead list`)")
    dl.add_argument("--all", action="store_true", help="replay or purge every dead letter")
    dl.add_argument("--count", "-n", type=int, default=None, help="list: at most this many, oldest first")
    configure_poll(add("poll", cmd_poll, "poll one feed once and print what it finds (--publish to publish)"))
    pr = add("pairing", cmd_pairing, "DM pairing: list codes and paired senders, approve a code, revoke")
    pr.add_argument("action", choices=["list", "approve", "revoke"])
    pr.add_argument("arg", nargs="*", help="approve: the CODE the sender got; revoke: the SENDER id")
    pr.add_argument("--inbound", default=None, help="revoke: only on this inbound")
    for name, (configure, fn) in extra_commands().items():
        sp = add(name, fn, f"{name} (from the adapters)")
        configure(sp)
    return p


def extra_commands(module: str = "adapters") -> dict[str, Command]:
    """Sub-commands the adapters contribute: ``COMMANDS`` in the adapters module maps a name to a
    module with ``configure(parser)`` and ``run(args, config) -> int``."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return {}
    out: dict[str, Command] = {}
    for name, ref in getattr(mod, "COMMANDS", {}).items():
        try:
            cmd = importlib.import_module(ref)
            out[name] = (cmd.configure, cmd.run)
        except ImportError as e:  # one broken command must not take `run` down with it
            out[name] = (_no_args, _broken(ref, e))
    return out


def _no_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER)


def _broken(ref: str, err: ImportError) -> Callable[[argparse.Namespace, Config], int]:
    def run(args: argparse.Namespace, cfg: Config) -> int:
        print(f"error: this command is unavailable: cannot import {ref}: {err}", file=sys.stderr)
        return 1

    return run


def _take_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config F`` is accepted anywhere on the line, nested sub-commands included."""
    rest: list[str] = []
    found: str | None = None
    it = iter(argv)
    for a in it:
        if a == "--config":
            found = next(it, None)
            if found is None:
                raise SystemExit("error: --config needs a file")
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
        else:
            rest.append(a)
    return found, rest


def main(argv: list[str] | None = None) -> int:
    config, rest = _take_config(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    path = config or _default_config()
    try:
        cfg = load(path)
        blog.setup(cfg.bridge.log_level, cfg.bridge.log_format)
        fn: Callable[[argparse.Namespace, Config], int] = args.fn
        return fn(args, cfg)
    except (ConfigError, EmbeddedRedisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
