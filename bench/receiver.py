"""A no-limit HTTP receiver for the relay benchmarks (its own process; uvloop when installed).

A bare asyncio protocol, HTTP/1.1 keep-alive, answering every POST ``200 {}`` at once — far cheaper
than the bridge, so it does not cap what is measured. For each POST it records the arrival time and
the message's added latency: arrival − the envelope's ``received_at`` (the moment the inbound
accepted it; both clocks are this machine's). It understands two bodies: a delivery (the bridge's
``http`` sink: ``{"envelope": {...}}``) and a bare envelope (the baseline relay).

``GET /stats`` → JSON figures since the last ``POST /reset`` (sorts every latency: ask once, at the
end); ``GET /progress`` → the count so far, cheap enough to poll; ``GET /healthz`` → 200.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from array import array
from typing import Any

import msgspec

from bench.common import percentile


class _Env(msgspec.Struct):
    received_at: float = 0.0


class _Body(msgspec.Struct):
    envelope: _Env | None = None
    received_at: float = 0.0
    id: str = ""
    #: a delivery's: when the router planned it
    created_at: float = 0.0


_decode = msgspec.json.Decoder(_Body).decode
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class State:
    def __init__(self, track_ids: bool) -> None:
        self.track_ids = track_ids
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.lat = array("d")
        self.routed = array("d")  # received_at → the router planned the delivery
        self.per_second: dict[int, int] = {}
        self.ids: set[str] = set()
        self.duplicates = 0
        self.bad = 0

    def record(self, body: bytes, delivery: str) -> None:
        now = time.time()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        sec = int(now)
        self.per_second[sec] = self.per_second.get(sec, 0) + 1
        try:
            b = _decode(body)
        except msgspec.DecodeError:
            self.bad += 1
            return
        sent_at = b.envelope.received_at if b.envelope is not None else b.received_at
        if sent_at:
            self.lat.append(now - sent_at)
            if b.envelope is not None and b.created_at:
                self.routed.append(b.created_at - sent_at)
        if self.track_ids:
            key = delivery or b.id
            if key in self.ids:
                self.duplicates += 1
            else:
                self.ids.add(key)

    def progress(self) -> dict[str, Any]:
        """O(1): what a harness polls while it waits."""
        return {"count": self.count, "first": self.first, "last": self.last}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.lat)
        routed = sorted(self.routed)
        span = self.last - self.first
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "rate": (self.count - 1) / span if span > 0 else 0.0,
            "lat_n": len(lat),
            "lat_p50_ms": percentile(lat, 50) * 1000,
            "lat_p90_ms": percentile(lat, 90) * 1000,
            "lat_p99_ms": percentile(lat, 99) * 1000,
            "lat_max_ms": (lat[-1] * 1000) if lat else 0.0,
            "to_router_p50_ms": percentile(routed, 50) * 1000,
            "to_router_p99_ms": percentile(routed, 99) * 1000,
            "duplicates": self.duplicates,
            "unique": len(self.ids),
            "bad": self.bad,
            "per_second": sorted(self.per_second.items()),
        }


class Http(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            delivery = ""
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip())
                elif lname == b"x-bridge-delivery":
                    delivery = value.strip().decode()
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            method, path = lines[0].split(b" ")[:2]
            if method == b"POST" and path == b"/reset":
                self.state.reset()
                self.reply(b"{}")
            elif method == b"GET" and path.startswith(b"/progress"):
                self.reply(msgspec.json.encode(self.state.progress()))
            elif method == b"GET" and path.startswith(b"/stats"):
                self.reply(msgspec.json.encode(self.state.stats()))
            elif method == b"GET":
                self.reply(b"{}")
            else:
                self.state.record(body, delivery)
                self.transport.write(_OK)

    def reply(self, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


async def serve(port: int, track_ids: bool) -> None:
    state = State(track_ids)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(state), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--track-ids", action="store_true", help="count duplicate deliveries (memory: a set)")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(serve(a.port, a.track_ids))
    except ImportError:
        asyncio.run(serve(a.port, a.track_ids))


if __name__ == "__main__":
    main()
