"""A real Wechaty puppet service with the official mock puppet, run by tests/e2e/puppet_driver.mjs.

``wechaty-puppet-service@1.19.9``, ``wechaty-puppet-mock@1.19.4`` and ``wechaty-puppet@1.21.3`` are
installed by tests/e2e/install_peers.sh into ``$WECHAT_BRIDGE_CACHE/npm/wechaty`` (outside the repo).
The driver takes JSON commands on stdin and prints what happened in the mock's world as JSON lines:
every message (the contacts' and the bot's), and an answer to each command. A test can kill the
service and start it again on the same port (:meth:`PuppetService.restart`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import CACHE, NODE_BIN, ROOT, free_port

WECHATY_DIR = CACHE / "npm" / "wechaty"
NODE_MODULES = WECHATY_DIR / "node_modules"
DRIVER = ROOT / "tests" / "e2e" / "puppet_driver.mjs"
VERSIONS = {"wechaty-puppet-service": "1.19.9", "wechaty-puppet-mock": "1.19.4", "wechaty-puppet": "1.21.3"}
ROOM = "room1@chatroom"


def installed() -> bool:
    for pkg, version in VERSIONS.items():
        pj = NODE_MODULES / pkg / "package.json"
        try:
            if json.loads(pj.read_text()).get("version") != version:
                return False
        except (OSError, ValueError):
            return False
    return node() is not None


def node() -> str | None:
    """node 24 from the cache when there, else the node on PATH (20 is enough for the service)."""
    cached = NODE_BIN / "node"
    return str(cached) if cached.is_file() else shutil.which("node")


def ensure_installed() -> str | None:
    """None when the peers are there (installing them if needed), else why not."""
    if installed():
        return None
    script = ROOT / "tests" / "e2e" / "install_peers.sh"
    try:
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        return "install_peers.sh did not finish within 15 minutes"
    if installed():
        return None
    said = [x[3:].strip() for x in r.stderr.splitlines() if x.startswith("!! ")]
    return " ".join(said) or (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")[-600:]


class PuppetService:
    """One puppet service process (restartable on the same port) and what it printed."""

    def __init__(self, token: str, *, tls: bool, auto_login: bool = True, log: Path | None = None) -> None:
        self.token = token
        self.tls = tls
        self.auto_login = auto_login
        self.port = free_port()
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WECHATY_", "NODE_"))},
            "WB_NODE_MODULES": str(NODE_MODULES),
            "WB_PORT": str(self.port),
            "WB_TOKEN": self.token,
            "WB_TLS": "1" if self.tls else "",
            "WB_AUTO_LOGIN": "1" if self.auto_login else "",
        }
        err = self.log.open("ab") if self.log else subprocess.DEVNULL
        exe = node()
        assert exe is not None
        self.proc = await asyncio.create_subprocess_exec(
            exe, str(DRIVER), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True, limit=16 * 1024 * 1024,
        )  # fmt: skip
        if self.log:
            err.close()  # type: ignore[union-attr]
        start = len(self.events)
        self._reader = asyncio.create_task(self._read(self.proc))
        await self.wait(lambda e: e.get("ev") == "listening", timeout=timeout, since=start)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
                self._changed.set()
        self.events.append({"ev": "exited", "code": await proc.wait()})
        self._changed.set()

    async def wait(
        self, pred: Callable[[dict[str, Any]], bool], *, timeout: float = 20.0, since: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``since`` on for which ``pred`` holds."""
        async with asyncio.timeout(timeout):
            i = since
            while True:
                while i < len(self.events):
                    e = self.events[i]
                    i += 1
                    if pred(e):
                        return e
                    if e.get("ev") == "exited" and not pred(e):
                        raise AssertionError(f"the puppet service exited: {e}; events: {self.events[-5:]}")
                self._changed.clear()
                await self._changed.wait()

    def messages(self, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("ev") == "message" and all(e.get(k) == v for k, v in match.items())
        ]

    async def send(self, **command: Any) -> None:
        """Run one command; fail if the driver says it failed."""
        assert self.proc is not None and self.proc.stdin is not None
        start = len(self.events)
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        e = await self.wait(
            lambda e: e.get("ev") in ("ok", "error") and e.get("op") == command["op"], since=start
        )
        assert e["ev"] == "ok", e

    async def say(self, text: str, *, frm: str = "alice", room: str | None = ROOM, **kw: Any) -> None:
        await self.send(op="say", **{"from": frm}, room=room, text=text, **kw)

    async def kill(self) -> None:
        """SIGKILL: the service dies as in a crash."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            self.proc = None

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def stop(self) -> None:
        await self.kill()
