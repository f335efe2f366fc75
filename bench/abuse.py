"""Legitimate callbacks while the daemon is attacked (issue 11): ``python -m bench.abuse``.

One daemon (the real one, ``bench/daemon_proc.py``) with a ``wecom_app`` inbound and a ``webhook``
inbound. For ``--seconds`` (default 30) the bench sends **legitimate** signed, encrypted callbacks at
``--rate`` per second (open loop: request *i* is due at *i / rate* and its latency counts from then)
while an attacker process (this module with ``--role attack``) keeps up, at the same time:

* ``--forged`` connections posting **forged 64 KiB bodies** (and 30 KiB ones, under the cap, so the
  signature path is exercised too) to the callback, one after another;
* ``--slow`` **slow-header** connections, a header byte a second, reopened when the daemon closes them;
* ``--unsigned`` connections posting **unsigned 1 MiB bodies** to the webhook.

Printed: the legitimate p50/p99/max and how many failed, the daemon's CPU share (of one core) and its
peak RSS against the unit's MemoryMax (512 MiB), and what the attackers got (answers by status,
connections closed). Everything is on loopback; counts and time are bounded; every process started
is stopped by its pid. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import time
import urllib.parse
from collections import Counter
from typing import Any

from bench.common import (
    OUT,
    PY,
    Procs,
    cleanup_prefix,
    daemon_args,
    free_port,
    new_prefix,
    percentile,
    proc_cpu_seconds,
    proc_rss_mb,
    save_json,
    wait_http,
    write_config,
)

TOKEN = "benchAbuseToken"
KEY = base64.b64encode(b"wechat-bridge abuse bench key!!!").decode().rstrip("=")
CORP = "wwabusebench0001"
MEMORY_MAX_MB = 512

CONFIG = f"""
[[inbound]]
name = "app"
type = "wecom_app"
path = "/wecom/app"
token = "{TOKEN}"
encoding_aes_key = "{KEY}"
corp_id = "{CORP}"

[[inbound]]
name = "hook"
type = "webhook"
path = "/hook"
secret = "abuse-bench-secret"
"""


def _signed(seq: int) -> tuple[str, bytes]:
    from adapters.wechat.crypto import WXBizMsgCrypt

    c = WXBizMsgCrypt(TOKEN, KEY, CORP)
    ts = str(int(time.time()))
    msg = (
        f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName>"
        f"<FromUserName><![CDATA[u{seq % 50}]]></FromUserName>"
        f"<CreateTime>{ts}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello {seq}]]>"
        f"</Content><MsgId>{10**15 + seq}</MsgId><AgentID>1000002</AgentID></xml>"
    ).encode()
    enc = c.encrypt(msg)
    nonce = str(1000 + seq)
    q = urllib.parse.urlencode(
        {"msg_signature": c.signature(ts, nonce, enc), "timestamp": ts, "nonce": nonce}
    )
    body = f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>"
    return q, body.encode()


async def _request(host: str, port: int, head: bytes, body: bytes, timeout: float) -> int:
    """One request on its own connection; the status (0 when refused or cut)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(head + body)
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0


# -- the legitimate client ---------------------------------------------------------------------------


async def legit(port: int, rate: float, seconds: float) -> dict[str, Any]:
    n = int(rate * seconds)
    start = time.monotonic() + 0.2
    lat: list[float] = []
    statuses: Counter[int] = Counter()

    async def one(i: int) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        q, body = _signed(i)
        head = (
            f"POST /wecom/app?{q} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status = await _request("127.0.0.1", port, head, body, 10.0)
        statuses[status] += 1
        lat.append(time.monotonic() - due)

    await asyncio.gather(*(one(i) for i in range(n)))
    lat.sort()
    return {
        "sent": n,
        "statuses": dict(statuses),
        "p50_ms": round(percentile(lat, 50) * 1e3, 1),
        "p99_ms": round(percentile(lat, 99) * 1e3, 1),
        "max_ms": round(lat[-1] * 1e3, 1) if lat else 0.0,
    }


# -- the attacker (its own process) ------------------------------------------------------------------


async def attack(port: int, seconds: float, forged: int, slow: int, unsigned: int) -> dict[str, Any]:
    end = time.monotonic() + seconds
    got: Counter[str] = Counter()
    q, _ = _signed(0)
    forged_big = b"<xml>" + b"<a/>" * 16_000 + b"<Encrypt>QUJD</Encrypt></xml>"  # ~64 KiB
    forged_small = b"<xml>" + b"<a/>" * 7_000 + b"<Encrypt>QUJD</Encrypt></xml>"  # ~28 KiB, under the cap

    async def forger(k: int) -> None:
        i = 0
        while time.monotonic() < end:
            body = forged_big if (i + k) % 2 else forged_small
            head = f"POST /wecom/app?{q} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            got[f"forged:{await _request('127.0.0.1', port, head, body, 10.0)}"] += 1
            i += 1

    async def slowloris() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                got["slow:connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            got["slow:opened"] += 1
            opened = time.monotonic()
            how = "held_to_end"
            try:
                writer.write(b"POST /hook HTTP/1.1\r\nHost: x\r\n")
                while time.monotonic() < end:
                    await asyncio.sleep(1.0)
                    if reader.at_eof():
                        how = "closed_by_daemon"
                        break
                    writer.write(b"X")
                    await writer.drain()
            except OSError:
                how = "reset_by_daemon"
            got[f"slow:{how}"] += 1
            if how != "held_to_end":
                got["slow:seconds_held_total"] += round(time.monotonic() - opened)
            writer.close()

    async def flooder() -> None:
        body = b"{" * 1_048_576
        while time.monotonic() < end:
            head = (
                b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1048576\r\n\r\n"
            )
            got[f"unsigned:{await _request('127.0.0.1', port, head, body, 10.0)}"] += 1

    await asyncio.gather(
        *(forger(k) for k in range(forged)),
        *(slowloris() for _ in range(slow)),
        *(flooder() for _ in range(unsigned)),
    )
    return dict(got)


# -- what a refusal costs in the handler (in process, no HTTP) ----------------------------------------


def refusal_cost() -> dict[str, float]:
    """µs per refusal: a cheap one (a short Encrypt, bad signature), and a forged body just under the
    cap (8,000 empty elements around a bad-signature Encrypt) refused as the inbound does it — scan,
    then verify — beside parsing it first, as the code before issue 11 did."""
    import timeit

    from adapters.wechat.callback import scan_encrypt
    from adapters.wechat.crypto import CryptoError, WXBizMsgCrypt
    from adapters.wechat.parsing import CallbackRefused, parse_xml

    c = WXBizMsgCrypt(TOKEN, KEY, CORP)
    forged = b"<xml>" + b"<a/>" * 8000 + b"<Encrypt>QUJD</Encrypt></xml>"

    def cheap() -> None:
        with contextlib.suppress(CryptoError):
            c.verify_signature("0" * 40, "1", "2", "QUJD")

    def scan_first() -> None:
        with contextlib.suppress(CryptoError, CallbackRefused):
            c.verify_signature("0" * 40, "1", "2", scan_encrypt(forged))

    def parse_first() -> None:
        with contextlib.suppress(CryptoError, CallbackRefused):
            c.verify_signature("0" * 40, "1", "2", str(parse_xml(forged, "body").get("Encrypt", "")))

    out = {}
    for name, f, n in (
        ("cheap", cheap, 2000),
        ("forged_scan_first", scan_first, 2000),
        ("forged_parse_first", parse_first, 50),
    ):
        out[name + "_us"] = round(min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6, 1)
    return out


# -- the run -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=20.0, help="legitimate callbacks per second")
    ap.add_argument("--forged", type=int, default=32, help="connections posting forged bodies")
    ap.add_argument("--slow", type=int, default=400, help="slow-header connections")
    ap.add_argument("--unsigned", type=int, default=32, help="connections posting unsigned 1 MiB bodies")
    ap.add_argument("--role", choices=["run", "attack"], default="run", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not 1 <= a.seconds <= 600 or a.forged + a.slow + a.unsigned > 2000:
        sys.exit("bounded: --seconds 1..600 and at most 2,000 attacking connections")
    if a.role == "attack":
        got = asyncio.run(attack(a.port, a.seconds, a.forged, a.slow, a.unsigned))
        (OUT / "abuse-attack.json").write_text(json.dumps(got))
        return

    prefix = new_prefix("abuse")
    port, stats = free_port(), free_port()
    cfg = write_config("abuse", prefix=prefix, listen_port=port, body=CONFIG, log_level="warning")
    res: dict[str, Any] = {"args": vars(a), "refusal_cost": refusal_cost()}
    print(f"refusal cost in the handler (µs): {res['refusal_cost']}")
    with Procs() as procs:
        d = procs.start("abuse-daemon", daemon_args(cfg, stats))
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=d)
        res["quiet"] = asyncio.run(legit(port, a.rate, min(5.0, a.seconds)))
        cpu0, t0 = proc_cpu_seconds(d.pid), time.monotonic()
        attacker = procs.start(
            "abuse-attacker",
            [PY, "-m", "bench.abuse", "--role", "attack", "--port", str(port),
             "--seconds", str(a.seconds + 2),
             "--forged", str(a.forged), "--slow", str(a.slow), "--unsigned", str(a.unsigned)],
        )  # fmt: skip
        time.sleep(2.0)  # let the attack build up
        peak = [proc_rss_mb(d.pid)]

        async def measured() -> dict[str, Any]:
            async def sample() -> None:
                while True:
                    peak.append(proc_rss_mb(d.pid))
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            try:
                return await legit(port, a.rate, a.seconds)
            finally:
                sampler.cancel()

        res["under_attack"] = asyncio.run(measured())
        cpu1, t1 = proc_cpu_seconds(d.pid), time.monotonic()
        attacker.wait(a.seconds + 60)
        res["attack"] = json.loads((OUT / "abuse-attack.json").read_text())
        res["daemon_cpu_share"] = round((cpu1 - cpu0) / (t1 - t0), 3)
        res["daemon_rss_peak_mb"] = round(max(peak), 1)
        res["memory_max_mb"] = MEMORY_MAX_MB
        with_metrics = os.environ.get("WB_BENCH_METRICS", "1") == "1"
        if with_metrics:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                res["refused"] = [line for line in r.read().decode().splitlines() if "refused_total{" in line]
        procs.stop(d)
    cleanup_prefix(prefix)
    path = save_json(OUT / "abuse.json", res)
    u = res["under_attack"]
    print(
        f"quiet:        p50 {res['quiet']['p50_ms']} ms  p99 {res['quiet']['p99_ms']} ms  "
        f"{res['quiet']['statuses']}"
    )
    print(f"under attack: p50 {u['p50_ms']} ms  p99 {u['p99_ms']} ms  max {u['max_ms']} ms  {u['statuses']}")
    print(f"daemon: CPU {res['daemon_cpu_share'] * 100:.0f} % of a core, "
          f"RSS peak {res['daemon_rss_peak_mb']} MiB"
          f" (MemoryMax {MEMORY_MAX_MB} MiB)")  # fmt: skip
    print(f"attackers got: {res['attack']}")
    for line in res.get("refused", []):
        print(f"  {line}")
    print(
        f"targets: p99 < 1000 ms: {u['p99_ms'] < 1000}; "
        f"RSS < MemoryMax: {res['daemon_rss_peak_mb'] < MEMORY_MAX_MB}"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
