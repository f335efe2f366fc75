"""One TOML file, validated at start into typed models.

Every error names the file, the key and what is wrong, and never shows a secret's value.
``${VAR}`` (or ``${VAR:-default}``) is replaced from the environment in any string; ``<key>_file``
reads ``<key>`` from a file (systemd's LoadCredential puts secrets in ``$CREDENTIALS_DIRECTORY``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from bridge import egress
from bridge.errors import ConfigError

#: ``[redis] url`` schemes (``bridge.bus.connect`` picks the client by them)
SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PLACEHOLDER_RE = re.compile(r"CHANGE_?ME|REPLACE_?ME|<your[ _-]", re.IGNORECASE)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([a-z]+)\s*$")
_PERIODS = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip


class Secret:
    """A string that never shows itself in repr, str or logs; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``period`` seconds."""

    count: float
    period: float

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count:g}/{self.period:g}s"


def parse_rates(spec: str) -> list[Rate]:
    """``"20/minute"``, ``"30/min, 1000/hour"``, ``"5/10s"``; ``"none"`` or ``""`` for no limit."""
    spec = spec.strip()
    if spec.lower() in ("", "none", "unlimited", "0"):
        return []
    rates = []
    for part in spec.split(","):
        m = _RATE_RE.match(part.lower())
        if not m or m.group(3) not in _PERIODS or float(m.group(1)) <= 0:
            raise ValueError(f"{part.strip()!r} is not a rate like '20/minute' or '5/10s'")
        mult = float(m.group(2)) if m.group(2) else 1.0
        if mult <= 0:
            raise ValueError(f"{part.strip()!r}: the period must be positive")
        rates.append(Rate(float(m.group(1)), mult * _PERIODS[m.group(3)]))
    return rates


# -- the core's sections ---------------------------------------------------------------------------


class BridgeSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    instance: str = ""
    data_dir: str = "var"
    log_level: str = "info"
    log_format: str = "auto"  # auto (console on a tty, else json) | json | console
    #: how long a graceful stop waits for sends in flight before giving up on them (they stay pending)
    shutdown_timeout: float = 10.0
    #: replies of replies stop after this many hops (a loop guard)
    max_hops: int = 8
    #: seconds a partition or router lease lasts unrenewed: a dead instance's share moves within it
    lease_ttl: float = 10.0
    #: an entry handed out this many times (crashes, take-overs) goes to the dead-letter stream
    max_deliveries: int = 20


class RedisSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str | None = None
    prefix: str = "wb"
    #: approximate cap on every stream (XADD MAXLEN ~); size it above the worst backlog
    stream_maxlen: int = 1_000_000
    dead_maxlen: int = 100_000
    dedupe_ttl: int = 86_400
    #: seconds; keep it well under WeChat's 5 s callback deadline (and above 1 s, the read block)
    socket_timeout: float = 3.0
    #: an inbound answers success only once this many replicas confirmed its envelope (WAIT);
    #: 0: once the master has it. Not with redis+cluster:// (see README, "Redis topologies")
    wait_replicas: int = 0
    #: milliseconds a publish waits for those replicas; fewer in time: the inbound answers 503
    wait_timeout_ms: int = 1000


class HttpSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    max_body: int = 1_048_576
    #: host:port for /readyz and /metrics (then not served on ``listen``); empty: both on ``listen``
    admin_listen: str = ""
    #: seconds a connection may take to send a request's headers (and to start one after another)
    header_timeout: float = 10.0
    #: seconds a request may take to send its body once its headers are in
    body_timeout: float = 10.0
    #: seconds an idle keep-alive connection is kept
    keepalive_timeout: float = 5.0
    #: connections open at once per listener; more are closed as they arrive (and counted)
    max_connections: int = 512
    #: hosts the daemon fetches from or posts to on a payload's say-so (response_url, attachment
    #: URLs): exact names, or ``.example.com`` for a domain and its subdomains
    fetch_hosts: list[str] = msgspec.field(default_factory=lambda: list(egress.DEFAULT_HOSTS))
    #: private, loopback or link-local networks (CIDR) such fetches may still reach (default none);
    #: both keys are bridge/egress.py's
    fetch_private: list[str] = []


DmPolicy = Literal["open", "allowlist", "pairing", "disabled"]
GroupPolicy = Literal["open", "allowlist", "disabled"]


class AccessConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who may talk through one inbound (``[inbound.access]``); checked by the router before routing
    (bridge/access.py)."""

    dm_policy: DmPolicy = "open"
    group_policy: GroupPolicy = "open"
    #: senders let through in direct chats under ``allowlist`` (and ``pairing``, without a code)
    allow_senders: list[str] = []
    #: groups let through under ``group_policy = "allowlist"``
    allow_groups: list[str] = []
    #: group id → the only senders whose messages in that group pass (admins always pass)
    group_senders: dict[str, list[str]] = {}
    #: always let through; the only ones who may run a command marked ``admins_only``
    admins: list[str] = []
    #: answered (through ``reply_via``) to a refused message addressed to the bot; none by default
    refusal_reply: str | None = None
    #: how often one sender may get ``refusal_reply`` (and a pairing code)
    refusal_rate: str = "1/10min"
    #: the answer that carries a pairing code; ``{code}`` and ``{minutes}`` are filled in
    pairing_reply: str = (
        "This bot needs an operator's approval. Your pairing code is {code} "
        "(valid {minutes} min): ask the operator to run `wechat-bridge pairing approve {code}`."
    )
    #: seconds a pairing code is valid
    pairing_ttl: int = 3600
    #: codes waiting for approval at once on this inbound (a flood cannot fill the code space)
    max_pending: int = 100


class CommandSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: the words that run it (matched without case), e.g. ["/new", "/reset"]
    names: list[str]
    enabled: bool = True
    admins_only: bool = False


def _cmd(*names: str) -> Any:
    return msgspec.field(default_factory=lambda: CommandSpec(names=list(names)))


class CommandsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Session commands answered by the bridge itself (bridge/commands.py)."""

    enabled: bool = True
    new: CommandSpec = _cmd("/new", "/reset")
    status: CommandSpec = _cmd("/status")
    stop: CommandSpec = _cmd("/stop")
    help: CommandSpec = _cmd("/help")


class InboundConfig(msgspec.Struct, kw_only=True):
    name: str
    type: str
    reply_via: str | None = None
    access: AccessConfig = msgspec.field(default_factory=AccessConfig)
    #: seconds: one sender's messages in one conversation this close together are one turn (0: off)
    merge_window: float = 0.0
    #: adapter-specific keys, validated by the adapter's Options model
    options: dict[str, Any] = {}


class OutboundConfig(msgspec.Struct, kw_only=True):
    name: str
    type: str
    #: the sink's own limit, shared by all instances; default: the adapter's
    rate: str | None = None
    burst: int = 1
    default_conversation: str | None = None
    #: deliveries sent at once by one instance (different conversations; one conversation is in order)
    concurrency: int = 16
    max_attempts: int = 8
    retry_base: float = 1.0
    retry_max: float = 300.0
    #: an entry pending longer than this on a vanished consumer is claimed by another instance
    claim_idle: float = 600.0
    #: the sink's stream is split by conversation into this many partitions, each sent by one
    #: instance at a time (bridge/partitions.py): more partitions, more instances share the sink
    partitions: int = 4
    #: an answer this sink cannot carry back (it raises NoWayBack) goes to this outbound instead
    fallback: str | None = None
    #: the fallback's conversation: ``{sender}`` and ``{conversation}`` of the message answered
    fallback_conversation: str = "{sender}"
    options: dict[str, Any] = {}


class RouteTarget(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    sink: str
    conversation: str | None = None


class RouteMatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    conversations: list[str] | None = None
    senders: list[str] | None = None
    mentions_only: bool = False
    text: str | None = None
    kinds: list[str] = msgspec.field(default_factory=lambda: ["message", "reply"])


class RouteConfig(msgspec.Struct, kw_only=True):
    name: str
    sources: list[str]
    to: list[RouteTarget]
    match: RouteMatch
    reply: bool = False
    pattern: re.Pattern[str] | None = None

    def sends_to(self, sink: str) -> bool:
        return any(t.sink == sink for t in self.to)


@dataclass
class Config:
    path: Path
    bridge: BridgeSection
    redis: RedisSection
    http: HttpSection
    inbound: list[InboundConfig]
    outbound: list[OutboundConfig]
    routes: list[RouteConfig]
    commands: CommandsSection = field(default_factory=CommandsSection)

    @property
    def data_dir(self) -> Path:
        p = Path(self.bridge.data_dir)
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    @property
    def listen(self) -> tuple[str, int]:
        host, _, port = self.http.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def admin_listen(self) -> tuple[str, int] | None:
        if not self.http.admin_listen:
            return None
        host, _, port = self.http.admin_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def inbound_by_name(self, name: str) -> InboundConfig | None:
        return next((i for i in self.inbound if i.name == name), None)

    def outbound_by_name(self, name: str) -> OutboundConfig | None:
        return next((o for o in self.outbound if o.name == name), None)


# -- loading --------------------------------------------------------------------------------------

T = TypeVar("T")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Secret:
        if isinstance(obj, Secret):
            return obj
        if not isinstance(obj, str):
            raise ValueError("expected a string")
        return Secret(obj)
    raise NotImplementedError(f"no decoder for {typ}")


def convert(data: dict[str, Any], typ: type[T], where: str, file: Path) -> T:
    """``msgspec.convert`` with an error that names the file and the key."""
    try:
        return msgspec.convert(data, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{file}: {_where(where, str(e))}") from None


def _where(prefix: str, msg: str) -> str:
    m = re.search(r"^(.*) - at `\$(.*)`$", msg)
    if m:
        key = (prefix + m.group(2)).lstrip(".")
        unknown = re.fullmatch(r"Object contains unknown field `([^`]+)`", m.group(1))
        if unknown:
            return f"{key}.{unknown.group(1)}: unknown key"
        return f"{key}: {m.group(1)}"
    m = re.search(r"unknown field `([^`]+)`", msg)
    if m:
        return f"{prefix + '.' + m.group(1) if prefix else m.group(1)}: unknown key"
    m = re.search(r"missing required field `([^`]+)`", msg)
    if m:
        return f"{prefix + '.' + m.group(1) if prefix else m.group(1)}: required key is missing"
    return f"{prefix}: {msg}" if prefix else msg


def _interpolate(value: Any, key: str, file: Path, env: dict[str, str]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            raise ConfigError(f"{file}: {key}: environment variable ${{{var}}} is not set")

        return _ENV_RE.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, f"{key}[{i}]", file, env) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _resolve_table(value, key, file, env)
    return value


def _resolve_table(table: dict[str, Any], where: str, file: Path, env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{where}.{k}" if where else k
        out[k] = _interpolate(v, key, file, env)
    for k in [k for k in out if k.endswith("_file") and len(k) > 5]:
        base = k[:-5]
        key = f"{where}.{k}" if where else k
        if base in out:
            raise ConfigError(f"{file}: {key}: give either {base} or {k}, not both")
        path = out.pop(k)
        if not isinstance(path, str):
            raise ConfigError(f"{file}: {key}: expected a file path")
        try:
            out[base] = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{file}: {key}: cannot read {path}: {e.strerror}") from None
    for k, v in out.items():
        if isinstance(v, str) and _PLACEHOLDER_RE.search(v):
            key = f"{where}.{k}" if where else k
            raise ConfigError(f"{file}: {key}: still holds a placeholder value; set the real one")
    return out


_INBOUND_CORE = {"name", "type", "reply_via", "access", "merge_window"}
_OUTBOUND_CORE = set(OutboundConfig.__struct_fields__) - {"options"}


def _entries(raw: dict[str, Any], section: str, file: Path) -> list[tuple[str, dict[str, Any]]]:
    items = raw.get(section, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{file}: {section}: expected an array of tables ([[{section}]])")
    out = []
    for i, item in enumerate(items):
        name = item.get("name")
        where = f"{section}[{i}]" if not isinstance(name, str) else f"{section}.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"{file}: {where}.name: required, letters, digits, '_', '-', '.' only")
        if not isinstance(item.get("type"), str):
            raise ConfigError(f"{file}: {where}.type: required key is missing")
        out.append((where, item))
    return out


def load(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    file = Path(path)
    env = dict(os.environ) if env is None else env
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}") from None
    known = {"bridge", "redis", "http", "inbound", "outbound", "routes", "commands"}
    for k in raw:
        if k not in known:
            raise ConfigError(f"{file}: {k}: unknown section (expected one of {', '.join(sorted(known))})")

    def section(name: str) -> dict[str, Any]:
        v = raw.get(name, {})
        if not isinstance(v, dict):
            raise ConfigError(f"{file}: {name}: expected a table [{name}]")
        return _resolve_table(v, name, file, env)

    bridge = convert(section("bridge"), BridgeSection, "bridge", file)
    if bridge.lease_ttl < 1:
        raise ConfigError(f"{file}: bridge.lease_ttl: must be at least 1 (seconds)")
    if bridge.max_deliveries < 2:
        raise ConfigError(f"{file}: bridge.max_deliveries: must be at least 2")
    if not bridge.instance:
        bridge.instance = socket.gethostname()
    if not NAME_RE.match(bridge.instance):
        raise ConfigError(f"{file}: bridge.instance: letters, digits, '_', '-', '.' only")
    redis = convert(section("redis"), RedisSection, "redis", file)
    if redis.url is not None and not redis.url.startswith(SCHEMES):
        raise ConfigError(f"{file}: redis.url: expected {', '.join(SCHEMES)}")
    if redis.wait_replicas < 0 or redis.wait_timeout_ms <= 0:
        raise ConfigError(f"{file}: redis.wait_replicas must be ≥ 0 and redis.wait_timeout_ms > 0")
    if redis.wait_replicas and (redis.url or "").startswith(("redis+cluster://", "rediss+cluster://")):
        raise ConfigError(
            f"{file}: redis.wait_replicas: not supported on a Redis Cluster (the cluster client cannot "
            "send WAIT on the connection that wrote); use a single Redis or Sentinel for it"
        )
    if not NAME_RE.match(redis.prefix):
        raise ConfigError(f"{file}: redis.prefix: letters, digits, '_', '-', '.' only")
    http = convert(section("http"), HttpSection, "http", file)
    host, sep, port = http.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{file}: http.listen: expected host:port, got {http.listen!r}")
    if http.admin_listen:
        host, sep, port = http.admin_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"{file}: http.admin_listen: expected host:port, got {http.admin_listen!r}")
    for key in ("header_timeout", "body_timeout", "keepalive_timeout"):
        if not 0 < getattr(http, key) <= 3600:
            raise ConfigError(f"{file}: http.{key}: must be between 0 and 3600 seconds")
    if not 1 <= http.max_connections <= 1_000_000:
        raise ConfigError(f"{file}: http.max_connections: must be at least 1")
    for net in http.fetch_private:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{file}: http.fetch_private: {net!r} is not a network (CIDR)") from None

    inbound: list[InboundConfig] = []
    for where, item in _entries(raw, "inbound", file):
        item = _resolve_table(item, where, file, env)
        core = {k: v for k, v in item.items() if k in _INBOUND_CORE}
        opts = {k: v for k, v in item.items() if k not in _INBOUND_CORE}
        inbound.append(convert({**core, "options": opts}, InboundConfig, where, file))
    outbound: list[OutboundConfig] = []
    for where, item in _entries(raw, "outbound", file):
        item = _resolve_table(item, where, file, env)
        core = {k: v for k, v in item.items() if k in _OUTBOUND_CORE}
        opts = {k: v for k, v in item.items() if k not in _OUTBOUND_CORE}
        ob = convert({**core, "options": opts}, OutboundConfig, where, file)
        if ob.rate is not None:
            try:
                parse_rates(ob.rate)
            except ValueError as e:
                raise ConfigError(f"{file}: {where}.rate: {e}") from None
        for key in ("burst", "concurrency", "max_attempts", "partitions"):
            if getattr(ob, key) < 1:
                raise ConfigError(f"{file}: {where}.{key}: must be at least 1")
        outbound.append(ob)

    for kind, items in (("inbound", inbound), ("outbound", outbound)):
        seen: set[str] = set()
        for it in items:
            if it.name in seen:
                raise ConfigError(f"{file}: {kind}.{it.name}: the name is used twice")
            seen.add(it.name)
    in_names = {i.name for i in inbound}
    out_names = {o.name for o in outbound}
    if in_names & out_names:
        name = sorted(in_names & out_names)[0]
        raise ConfigError(f"{file}: {name}: an inbound and an outbound share this name")
    for i in inbound:
        if i.reply_via is not None and i.reply_via not in out_names:
            raise ConfigError(f"{file}: inbound.{i.name}.reply_via: no outbound named {i.reply_via!r}")
        _check_access(i, file)
    for o in outbound:
        if o.fallback is not None and (o.fallback not in out_names or o.fallback == o.name):
            raise ConfigError(f"{file}: outbound.{o.name}.fallback: no other outbound named {o.fallback!r}")
        try:
            o.fallback_conversation.format(sender="s", conversation="c")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{file}: outbound.{o.name}.fallback_conversation: only {{sender}} and {{conversation}} "
                f"may be filled in ({type(e).__name__}: {e})"
            ) from None
    commands = convert(section("commands"), CommandsSection, "commands", file)
    _check_commands(commands, file)

    routes = [_route(i, r, file, env, in_names, out_names) for i, r in enumerate(_route_tables(raw, file))]
    return Config(file, bridge, redis, http, inbound, outbound, routes, commands)


def _check_access(i: InboundConfig, file: Path) -> None:
    if not 0 <= i.merge_window <= 60:
        raise ConfigError(f"{file}: inbound.{i.name}.merge_window: seconds from 0 (off) to 60")
    a, where = i.access, f"inbound.{i.name}.access"
    try:
        parse_rates(a.refusal_rate)
    except ValueError as e:
        raise ConfigError(f"{file}: {where}.refusal_rate: {e}") from None
    if i.reply_via is None:
        if a.dm_policy == "pairing":
            raise ConfigError(f"{file}: {where}.dm_policy: pairing sends a code back: set reply_via")
        if a.refusal_reply:
            raise ConfigError(f"{file}: {where}.refusal_reply: needs reply_via on inbound.{i.name}")
    if a.pairing_ttl < 60:
        raise ConfigError(f"{file}: {where}.pairing_ttl: at least 60 seconds")
    if a.max_pending < 1:
        raise ConfigError(f"{file}: {where}.max_pending: must be at least 1")
    try:
        a.pairing_reply.format(code="C", minutes=1)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{file}: {where}.pairing_reply: only {{code}} and {{minutes}} ({e})") from None
    if a.dm_policy == "pairing" and "{code}" not in a.pairing_reply:
        raise ConfigError(f"{file}: {where}.pairing_reply: must contain {{code}}")


def _check_commands(c: CommandsSection, file: Path) -> None:
    seen: dict[str, str] = {}
    for key in CommandsSection.__struct_fields__:
        spec = getattr(c, key)
        if not isinstance(spec, CommandSpec):
            continue
        if spec.enabled and not spec.names:
            raise ConfigError(f"{file}: commands.{key}.names: give at least one name")
        for n in spec.names:
            if not re.fullmatch(r"/[^\s/]{1,32}", n):
                raise ConfigError(f"{file}: commands.{key}.names: {n!r} is not a word starting with '/'")
            if n.lower() in seen:
                raise ConfigError(f"{file}: commands.{key}.names: {n!r} is also a name of {seen[n.lower()]}")
            seen[n.lower()] = key


def _route_tables(raw: dict[str, Any], file: Path) -> list[dict[str, Any]]:
    items = raw.get("routes", [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{file}: routes: expected an array of tables ([[routes]])")
    return items


def _route(
    i: int,
    r: dict[str, Any],
    file: Path,
    env: dict[str, str],
    in_names: set[str],
    out_names: set[str],
) -> RouteConfig:
    name = r.get("name") if isinstance(r.get("name"), str) else f"{i}"
    where = f"routes[{i}]"
    r = _resolve_table(r, where, file, env)
    allowed = {"name", "from", "to", "match", "reply"}
    for k in r:
        if k not in allowed:
            raise ConfigError(f"{file}: {where}.{k}: unknown key (expected {', '.join(sorted(allowed))})")
    src = r.get("from")
    sources = [src] if isinstance(src, str) else src
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise ConfigError(f"{file}: {where}.from: required, a source name or a list of names")
    for s in sources:
        if s not in in_names and s not in out_names:
            raise ConfigError(f"{file}: {where}.from: no inbound (or replying outbound) named {s!r}")
    to_raw = r.get("to")
    if isinstance(to_raw, str | dict):
        to_raw = [to_raw]
    if not isinstance(to_raw, list) or not to_raw:
        raise ConfigError(f"{file}: {where}.to: required, a sink name, a table or a list of them")
    targets: list[RouteTarget] = []
    for j, t in enumerate(to_raw):
        t = {"sink": t} if isinstance(t, str) else t
        target = convert(t, RouteTarget, f"{where}.to[{j}]", file) if isinstance(t, dict) else None
        if target is None:
            raise ConfigError(f"{file}: {where}.to[{j}]: expected a sink name or {{sink=…, conversation=…}}")
        if target.sink not in out_names:
            raise ConfigError(f"{file}: {where}.to[{j}]: no outbound named {target.sink!r}")
        targets.append(target)
    match_raw = r.get("match", {})
    if not isinstance(match_raw, dict):
        raise ConfigError(f"{file}: {where}.match: expected a table")
    match = convert(match_raw, RouteMatch, f"{where}.match", file)
    pattern = None
    if match.text is not None:
        try:
            pattern = re.compile(match.text)
        except re.error as e:
            raise ConfigError(f"{file}: {where}.match.text: not a valid regular expression: {e}") from None
    reply = r.get("reply", False)
    if not isinstance(reply, bool):
        raise ConfigError(f"{file}: {where}.reply: expected true or false")
    return RouteConfig(name=str(name), sources=sources, to=targets, match=match, reply=reply, pattern=pattern)
