"""The fault run: several daemons, one private Redis, a recording receiver, and faults on purpose.

``python -m bench.fault [--envelopes 10000] [--conversations 50] [--instances 3] [--kills 5]
[--outage 15] [--fail 0.1] [--rate 100/second]`` starts a private ``redis-server`` on a free loopback
port (appendonly, fsync always; never the machine's shared Redis), a recording HTTP receiver, and
``--instances`` daemons (``python -m bridge run``) as subprocesses sharing it, each with one ``http``
sink to the receiver. It publishes the envelopes over the conversations in order (retrying while
Redis is down, as a platform retries a callback), and meanwhile:

* kills a random daemon with SIGKILL ``--kills`` times (restarted a second later, except one that
  never comes back);
* stops Redis once for ``--outage`` seconds (SHUTDOWN, then a restart on the same files);
* the receiver answers 503, or waits past the sink's timeout, on ``--fail`` of the sends; a few
  envelopes in conversations of their own are answered 400 (permanent: they must be dead letters).

Then it waits until everything is drained and checks the receiver's record with :func:`check`:
every envelope delivered; no duplicates but same-delivery-id resends, at most one per fault that can
open the crash window (a kill, the outage); no conversation out of order; no rate exceeded in any
window; dead letters exactly the permanent failures; nothing pending. tests/integration/test_fault.py
runs a short version; tests/unit/test_fault_checker.py shows each check failing on a bad record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "fault"


# -- the record and its checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One request the receiver got: when, which delivery, and what it answered."""

    at: float
    delivery: str
    conversation: str
    seq: int
    #: ``ok`` (2xx), ``fail`` (503), ``slow`` (answered after the sink's timeout), ``perm`` (400)
    answer: str


@dataclass
class Report:
    delivered: int = 0
    expected: int = 0
    duplicates: int = 0
    allowed_duplicates: int = 0
    max_in_window: int = 0
    allowed_in_window: int = 0
    dead: int = 0
    pending: int = 0
    failures: list[str] = field(default_factory=list)
    #: the accepted resends (the second and later 2xx of one message)
    resent: list[Hit] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        mark = {True: "ok  ", False: "FAIL"}
        return [
            f"{mark[not any(f.startswith('lost') for f in self.failures)]} every envelope delivered: "
            f"{self.delivered}/{self.expected}",
            f"{mark[not any(f.startswith('dup') for f in self.failures)]} duplicates (same delivery id, "
            f"crash window): {self.duplicates} (allowed {self.allowed_duplicates})",
            f"{mark[not any(f.startswith('order') for f in self.failures)]} every conversation in order",
            f"{mark[not any(f.startswith('rate') for f in self.failures)]} rate: at most "
            f"{self.max_in_window} sends in a window (allowed {self.allowed_in_window})",
            f"{mark[not any(f.startswith('dead') for f in self.failures)]} dead letters only for "
            f"permanent failures: {self.dead}",
            f"{mark[not any(f.startswith('pending') for f in self.failures)]} drained: "
            f"{self.pending} pending",
            *[f"  {f}" for f in self.failures[:20]],
        ]


def check(
    hits: list[Hit], expected: dict[str, int], *, permanent: set[str], dead: set[str], crash_faults: int,
    rate: tuple[int, float], burst: int, pending: int = 0, slack: int = 1,
) -> Report:  # fmt: skip
    """Check a fault run's record.

    ``expected``: conversation → how many envelopes (seq 0..n-1); ``permanent``: delivery texts
    (``conv:seq``) answered 400; ``dead``: the texts found in the dead letters; ``crash_faults``:
    kills + Redis outages (each may resend what was on the wire); ``rate``: (count, period s) every
    attempt is charged to, with ``burst``; ``slack``: sends a window may hold over the rate because
    the receiver timestamps arrivals, not the moments they were charged.
    """
    rep = Report(expected=sum(expected.values()))
    accepted: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for h in sorted(hits, key=lambda h: h.at):
        if h.answer == "ok":
            accepted[h.conversation].append((h.seq, h.delivery))
    # every envelope, once; a same-id resend is a duplicate of the crash window
    for conv, n in expected.items():
        got = accepted.get(conv, [])
        seqs = {s for s, _ in got}
        missing = [s for s in range(n) if s not in seqs]
        rep.delivered += n - len(missing)
        if missing:
            rep.failures.append(f"lost: {conv} never got {missing[:10]}")
        ids: dict[int, set[str]] = defaultdict(set)
        for s, did in got:
            ids[s].add(did)
        for s, dids in ids.items():
            if len(dids) > 1:
                rep.failures.append(f"dup: {conv}:{s} came under {len(dids)} delivery ids")
        rep.duplicates += len(got) - len(seqs)
        seen_seq: set[int] = set()
        for h in sorted((h for h in hits if h.conversation == conv and h.answer == "ok"), key=lambda h: h.at):
            if h.seq in seen_seq:
                rep.resent.append(h)
            seen_seq.add(h.seq)
        # in order: each accepted seq is the one before it or the next (a same-id resend repeats)
        last = -1
        for s, _ in got:
            if s < last:
                rep.failures.append(f"order: {conv}: {s} after {last}")
                break
            last = s
    for conv in accepted:
        if conv not in expected:
            rep.failures.append(f"lost: unexpected conversation {conv}")
    rep.allowed_duplicates = crash_faults
    if rep.duplicates > crash_faults:
        rep.failures.append(f"dup: {rep.duplicates} duplicates for {crash_faults} kills and outages")
    # the rate, over every attempt the receiver saw, in every window of one period
    count, period = rate
    rep.allowed_in_window = count + burst + slack
    times = sorted(h.at for h in hits)
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        rep.max_in_window = max(rep.max_in_window, i - j + 1)
    if rep.max_in_window > rep.allowed_in_window:
        rep.failures.append(
            f"rate: {rep.max_in_window} sends in {period} s (allowed {rep.allowed_in_window})"
        )
    rep.dead = len(dead)
    if dead != permanent:
        rep.failures.append(
            f"dead: dead letters {sorted(dead - permanent)[:5]} are not permanent failures, "
            f"permanent ones not dead: {sorted(permanent - dead)[:5]}"
        )
    rep.pending = pending
    if pending:
        rep.failures.append(f"pending: {pending} entries still pending after the last fault")
    return rep


# -- the receiver --------------------------------------------------------------------------------


class Receiver:
    """Records every POST; answers 503 or too late on ``fail`` of them, 400 to ``perm-`` conversations."""

    def __init__(self, fail: float, timeout: float, seed: int = 7) -> None:
        self.fail = fail
        self.timeout = timeout
        self.hits: list[Hit] = []
        self.rng = random.Random(seed)

    async def handle(self, request: web.Request) -> web.Response:
        at = time.time()
        body = await request.read()
        d = json.loads(body)
        env = d["envelope"]
        conv, _, seq = env["text"].rpartition(":")
        did = request.headers.get("X-Bridge-Delivery", "")
        if conv.startswith("perm-"):
            self.hits.append(Hit(at, did, conv, int(seq), "perm"))
            return web.Response(status=400, text="no such chat")
        roll = self.rng.random()
        if roll < self.fail / 2:
            self.hits.append(Hit(at, did, conv, int(seq), "fail"))
            return web.Response(status=503, text="busy")
        if roll < self.fail:
            self.hits.append(Hit(at, did, conv, int(seq), "slow"))
            await asyncio.sleep(self.timeout + 0.3)  # the sink gave up: this answer is never read
            return web.Response(status=503, text="too late")
        self.hits.append(Hit(at, did, conv, int(seq), "ok"))
        return web.json_response({"id": did})


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own on a free loopback port (appendonly, fsync always)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.time() + 10
        while time.time() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        """SHUTDOWN (the AOF is written), as an operator restarting Redis would."""
        if self.proc is None:
            return
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True, timeout=10)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Instance:
    def __init__(
        self, n: int, workdir: Path, redis_url: str, receiver: str, args: argparse.Namespace
    ) -> None:
        self.name = f"i{n}"
        self.cfg = workdir / f"{self.name}.toml"
        self.log = workdir / f"{self.name}.log"
        self.cfg.write_text(
            f'[bridge]\ninstance = "{self.name}"\ndata_dir = "{workdir / self.name}"\nlog_format = "json"\n'
            f"shutdown_timeout = 2\nlease_ttl = {args.lease_ttl}\n"
            f'[redis]\nurl = "{redis_url}"\nprefix = "{PREFIX}"\nsocket_timeout = 1\n'
            f'[http]\nlisten = "127.0.0.1:0"\n'
            f'[[inbound]]\nname = "in"\ntype = "manual"\n'
            f'[[outbound]]\nname = "rx"\ntype = "http"\nurl = "{receiver}"\ntimeout = {args.timeout}\n'
            f'rate = "{args.rate}"\nburst = 1\nconcurrency = 16\nmax_attempts = 1000\nretry_base = 0.1\n'
            f"retry_max = 1.0\npartitions = {args.partitions}\n"
            f'[[routes]]\nfrom = "in"\nto = "rx"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.cfg)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# -- the run -------------------------------------------------------------------------------------


def parse_rate(text: str) -> tuple[int, float]:
    n, _, unit = text.partition("/")
    return int(n), {"second": 1.0, "minute": 60.0}[unit]


async def _publish_all(
    redis_url: str, convs: list[str], per_conv: int, perms: list[str], pace: float
) -> None:
    """Publish seq 0..per_conv-1 of every conversation in order; retry while Redis is down."""
    from bridge.bus import Bus, Keys, connect
    from bridge.envelope import Conversation, make_envelope, stable_id

    r = connect(redis_url, 1.0)
    bus = Bus(r, Keys(PREFIX))

    async def one(conv: str, seq: int) -> None:
        env = make_envelope("in", Conversation(conv), f"{conv}:{seq}", id=stable_id("in", conv, str(seq)))
        while True:
            try:
                await bus.publish(env, dedupe_key=f"{conv}:{seq}")
                return
            except Exception:  # BusUnavailable while Redis is down: the platform retries
                await asyncio.sleep(0.2)

    try:
        for seq in range(per_conv):
            t0 = time.monotonic()
            await asyncio.gather(*(one(c, seq) for c in convs))
            if seq == per_conv // 2:
                await asyncio.gather(*(one(p, 0) for p in perms))
            await asyncio.sleep(max(pace - (time.monotonic() - t0), 0))
    finally:
        await r.aclose()


async def _faults(
    instances: list[Instance],
    redis: PrivateRedis,
    kills: int,
    outage: float,
    duration: float,
    rng: random.Random,
) -> list[str]:
    """Kill -9 a random daemon ``kills`` times (one never restarted) and stop Redis once."""
    log: list[str] = []
    events: list[tuple[float, str]] = [(duration * (i + 1) / (kills + 2), "kill") for i in range(kills)]
    if outage > 0:
        events.append((duration * (kills + 1.5) / (kills + 2), "outage"))
    events.sort()
    never = rng.randrange(kills) if kills else -1
    t0 = time.monotonic()
    k = 0
    for at, what in events:
        await asyncio.sleep(max(at - (time.monotonic() - t0), 0))
        if what == "kill":
            alive = [i for i in instances if i.proc is not None]
            if len(alive) <= 1:
                continue
            victim = rng.choice(alive)
            victim.kill()
            log.append(
                f"{time.monotonic() - t0:6.1f}s kill -9 {victim.name}" + (" (for good)" if k == never else "")
            )
            if k != never:
                await asyncio.sleep(1.0)
                victim.start()
            k += 1
        else:
            redis.stop()
            log.append(f"{time.monotonic() - t0:6.1f}s Redis stopped for {outage:.0f}s")
            await asyncio.sleep(outage)
            redis.start()
            log.append(f"{time.monotonic() - t0:6.1f}s Redis back")
    return log


async def _state(redis_url: str, partitions: int) -> tuple[int, set[str], int]:
    """(pending entries over every group, texts in the dead letters, out-stream entries)."""
    from bridge.bus import Bus, Keys, connect

    r = connect(redis_url, 2.0)
    try:
        bus = Bus(r, Keys(PREFIX))
        bus.partitions = {"rx": partitions}
        pending = await bus.out_pending("rx")
        groups = await r.xinfo_groups(bus.keys.inbound)
        pending += sum(int(g["pending"]) + int(g.get("lag") or 0) for g in groups)
        dead = set()
        for _, f in await r.xrange(bus.keys.dead):
            d = json.loads(f[b"d"])
            dead.add(d["envelope"]["text"])
        total = 0
        for s in bus.out_streams("rx"):
            total += int(await r.xlen(s))
        return pending, dead, total
    finally:
        await r.aclose()


async def run(args: argparse.Namespace) -> Report:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="wb-fault-"))
    redis = PrivateRedis(workdir)
    redis.start()
    receiver = Receiver(args.fail, args.timeout, seed=args.seed)
    app = web.Application()
    app.router.add_post("/in", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    convs = [f"c{i:03d}" for i in range(args.conversations)]
    per_conv = max(args.envelopes // len(convs), 1)
    perms = [f"perm-{i}" for i in range(3)]
    instances = [
        Instance(n, workdir, redis.url, f"http://127.0.0.1:{port}/in", args) for n in range(args.instances)
    ]
    for i in instances:
        i.start()
    count, period = parse_rate(args.rate)
    total: int = per_conv * len(convs)
    duration = max(total * period / count, 5.0)  # the sink's rate bounds the run
    t0, wall0 = time.monotonic(), time.time()
    try:
        pub = asyncio.create_task(_publish_all(redis.url, convs, per_conv, perms, duration / per_conv))
        fault_log = await _faults(instances, redis, args.kills, args.outage, duration * 0.8, rng)
        for line in fault_log:
            print(line, flush=True)
        await pub
        expected = {c: per_conv for c in convs}

        def done() -> bool:
            ok = {(h.conversation, h.seq) for h in receiver.hits if h.answer == "ok"}
            return len(ok) >= total

        end = time.monotonic() + args.drain_timeout
        while time.monotonic() < end:
            if done():
                break
            await asyncio.sleep(0.5)
        # then until nothing is pending (acks, dead letters written)
        pending, dead, _ = await _state(redis.url, args.partitions)
        while time.monotonic() < end and (pending or len(dead) < len(perms)):
            await asyncio.sleep(0.5)
            pending, dead, _ = await _state(redis.url, args.partitions)
        elapsed = time.monotonic() - t0
        rep = check(
            receiver.hits, expected, permanent={f"{p}:0" for p in perms}, dead=dead,
            crash_faults=args.kills + (1 if args.outage > 0 else 0), rate=(count, period), burst=1,
            pending=pending,
        )  # fmt: skip
        print(f"{total} envelopes over {len(convs)} conversations, {args.instances} instances, "
              f"{len(receiver.hits)} requests, {elapsed:.1f} s", flush=True)  # fmt: skip
        for line in rep.lines():
            print(line, flush=True)
        for h in rep.resent:
            print(f"  resent {h.conversation}:{h.seq} ({h.delivery}) at {h.at - wall0:.1f}s", flush=True)
        if not rep.ok:
            print(f"logs: {workdir}", flush=True)
        return rep
    finally:
        for i in instances:
            i.terminate()
        redis.stop()
        await runner.cleanup()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fault", description=__doc__.split("\n\n")[0])
    p.add_argument("--envelopes", type=int, default=10_000)
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--outage", type=float, default=15.0, help="seconds Redis is stopped (0: never)")
    p.add_argument("--fail", type=float, default=0.1, help="share of sends answered 503 or too late")
    p.add_argument("--rate", default="200/second", help="the sink's rate (every attempt is charged)")
    p.add_argument("--timeout", type=float, default=1.0, help="the sink's timeout, seconds")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--lease-ttl", type=float, default=3.0)
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, Redis files)")
    return p


def main(argv: list[str] | None = None) -> int:
    rep = asyncio.run(run(parser().parse_args(argv)))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
