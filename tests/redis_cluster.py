"""Throw-away Redis topologies on loopback free ports, for the tests: a 3-master Redis Cluster
(``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``) and a master with a
replica watched by one Sentinel. Started and stopped by fixtures; nothing to start by hand."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too (and so ≤ 55535)."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _server() -> str:
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not found or not shutil.which("redis-cli"):
        pytest.skip("redis-server and redis-cli are needed for the cluster and sentinel tests")
    return found


def cli(port: int, *args: str, timeout: float = 10) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=True,
    ).stdout  # fmt: skip


def _wait(pred: object, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():  # type: ignore[operator]
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout} s")


@contextmanager
def _servers(workdir: Path, confs: list[list[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    server = _server()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for n, extra in enumerate(confs):
            d = workdir / f"n{n}"
            d.mkdir()
            common = ["--bind", "127.0.0.1", "--dir", str(d)]
            if "--sentinel" not in extra:
                common += ["--save", "", "--appendonly", "no", "--enable-debug-command", "local"]
            procs.append(
                subprocess.Popen(
                    [server, *extra, *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


@contextmanager
def cluster(workdir: Path, masters: int = 3) -> Iterator[list[int]]:
    """A Redis Cluster of ``masters`` masters (no replicas); yields their ports."""
    ports = [free_port() for _ in range(masters)]
    confs = [["--port", str(p), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
              "--cluster-node-timeout", "2000"] for p in ports]  # fmt: skip
    with _servers(workdir, confs):
        for p in ports:
            _wait(lambda p=p: cli(p, "ping").strip() == "PONG", f"cluster node {p}")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        for p in ports:
            _wait(lambda p=p: "cluster_state:ok" in cli(p, "cluster", "info"), f"cluster state on {p}")
        yield ports


@contextmanager
def sentinel(workdir: Path, service: str = "main") -> Iterator[tuple[int, int, int]]:
    """A master, one replica, and a Sentinel watching them as ``service``: (master, replica, sentinel)."""
    master, replica, sent = free_port(), free_port(), free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {sent}\nbind 127.0.0.1\nsentinel monitor {service} 127.0.0.1 {master} 1\n"
        f"sentinel down-after-milliseconds {service} 1000\nsentinel failover-timeout {service} 5000\n"
    )
    confs = [["--port", str(master)], ["--port", str(replica), "--replicaof", "127.0.0.1", str(master)],
             [str(conf), "--sentinel"]]  # fmt: skip
    with _servers(workdir, confs):
        _wait(lambda: "master_link_status:up" in cli(replica, "info", "replication"), "replica link")
        _wait(lambda: str(master) in cli(sent, "sentinel", "get-master-addr-by-name", service), "sentinel")
        # the Sentinel learns of replicas from the master's INFO (every 10 s): until it lists this one it
        # has no replica to promote ("-failover-abort-no-good-slave")
        _wait(
            lambda: str(replica) in cli(sent, "sentinel", "replicas", service),
            "sentinel sees the replica",
            30,
        )
        yield master, replica, sent
