"""The embedded default and the CLI, as a person runs them: a real process, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bridge.bus import Field, connect
from bridge.embedded_redis import EmbeddedRedis
from tests.integration.test_daemon import free_port

ROOT = Path(__file__).parents[2]


async def test_embedded_redis_starts_persists_and_stops(tmp_path: Path) -> None:
    data = tmp_path / "var"
    er = EmbeddedRedis(data)
    await er.start()
    pid = er.proc.pid if er.proc else 0
    r = connect(er.url)
    await r.xadd("s", {"k": "v"})
    await r.aclose()
    await er.stop()
    files = {p.name for p in data.iterdir()}
    assert "redis.sock" not in files  # stopped cleanly
    assert "appendonly.aof" in files or "appendonlydir" in files  # persistence is on
    assert not Path(f"/proc/{pid}").exists()  # noqa: ASYNC240 - the process is gone

    er2 = EmbeddedRedis(data)
    await er2.start()
    r = connect(er2.url)
    assert await r.xlen("s") == 1  # survived the restart
    await r.aclose()
    # a second daemon on the same data_dir is refused, naming the key
    er3 = EmbeddedRedis(data)
    try:
        await er3.start()
        raise AssertionError("a second embedded Redis started on the same data_dir")
    except Exception as e:
        assert "bridge.data_dir" in str(e)
    await er2.stop()


def cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def demo_config(tmp_path: Path, port: int) -> Path:
    text = (ROOT / "config" / "demo.toml").read_text()
    text = text.replace('"../var/demo"', f'"{tmp_path / "var"}"').replace(
        "127.0.0.1:8080", f"127.0.0.1:{port}"
    )
    p = tmp_path / "demo.toml"
    p.write_text(text)
    return p


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_demo_run_inject_tail_and_sigterm(tmp_path: Path) -> None:
    """The README's first command, end to end: the demo config on the embedded default."""
    port = free_port()
    cfg = demo_config(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(cfg)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        end = time.time() + 20
        status: int = 0
        while time.time() < end:
            try:
                status, body = get(f"http://127.0.0.1:{port}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert status == 200 and body["ready"] is True

        out = cli(
            "inject",
            "--config",
            str(cfg),
            "--inbound",
            "demo",
            "--conversation",
            "room-1",
            "--text",
            "hello 你好",
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        env_id = json.loads(out.stdout)["envelope"]
        rows: list[Any] = []
        end = time.time() + 10
        while time.time() < end and not rows:
            t = cli("tail", "--config", str(cfg), "out:console", "--count", "5", cwd=tmp_path)
            assert t.returncode == 0, t.stderr
            rows = [json.loads(line) for line in t.stdout.splitlines()]
            time.sleep(0.1)
        assert rows[-1][Field.DELIVERY]["envelope"]["id"] == env_id
        assert rows[-1][Field.DELIVERY]["envelope"]["text"] == "hello 你好"
        t = cli("tail", "--config", str(cfg), "inbound", cwd=tmp_path)
        assert json.loads(t.stdout.splitlines()[-1])[Field.ENVELOPE]["id"] == env_id
        bad = cli(
            "inject",
            "--config",
            str(cfg),
            "--inbound",
            "nope",
            "--conversation",
            "c",
            "--text",
            "t",
            cwd=tmp_path,
        )
        assert bad.returncode == 1 and "no inbound named 'nope'" in bad.stderr
        bad = cli("tail", "--config", str(cfg), "sideways", cwd=tmp_path)
        assert bad.returncode == 2 and "unknown stream" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    assert code == 0, log
    assert "sink.log.delivery" in log and "hello 你好" in log
    assert "daemon.stopped" in log and "embedded_redis.stopped" in log
    # the embedded Redis stopped with the daemon
    assert not (tmp_path / "var" / "redis.sock").exists()


def test_cli_without_a_running_daemon_says_so(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path, free_port())
    out = cli("tail", "--config", str(cfg), "inbound", cwd=tmp_path)
    assert out.returncode == 1
    assert "no running daemon" in out.stderr


def test_check_config_masks_secrets_and_names_bad_keys(tmp_path: Path) -> None:
    p = tmp_path / "b.toml"
    p.write_text(
        '[[inbound]]\nname = "hook"\ntype = "webhook"\npath = "/h"\nsecret = "very-secret-hook"\n'
        '[[outbound]]\nname = "dash"\ntype = "http"\nurl = "https://dash.example/in"\nsecret = "very-secret-sink"\n'
        '[[routes]]\nfrom = "hook"\nto = "dash"\n'
    )
    out = cli("check-config", "--config", str(p), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "very-secret" not in out.stdout + out.stderr
    shown = json.loads(out.stdout)
    assert shown["outbound"][0]["options"]["secret"] == "***"
    assert shown["routes"][0]["to"] == [{"sink": "dash", "conversation": None}]
    p.write_text(
        '[[outbound]]\nname = "dash"\ntype = "http"\nurl = "https://x"\nsecrett = "very-secret-sink"\n'
    )
    out = cli("check-config", "--config", str(p), cwd=tmp_path)
    assert out.returncode == 1
    assert "outbound.dash.secrett: unknown key" in out.stderr
    assert "very-secret" not in out.stderr
    env_cfg = cli("check-config", cwd=tmp_path)  # no --config, no $WECHAT_BRIDGE_CONFIG: ./bridge.toml
    assert env_cfg.returncode == 1 and "bridge.toml: no such file" in env_cfg.stderr


async def test_status_and_dead_replay(write_config: Any, start_daemon: Any) -> None:
    import asyncio

    from bridge.envelope import Conversation, make_envelope
    from bridge.errors import PermanentError
    from tests.conftest import CollectSink, wait_for

    cfg = write_config(
        '[[inbound]]\nname = "in"\ntype = "manual"\n[[outbound]]\nname = "c"\ntype = "collect"\n'
        '[[routes]]\nfrom = "in"\nto = "c"\n'
    )
    d = await start_daemon(cfg)
    sink = CollectSink.instances["c"]
    sink.script = [PermanentError("chat gone: recreate it")]
    await d.bus.publish(make_envelope("in", Conversation("g1"), "retry me"))
    await wait_for(lambda: d.redis.xlen(d.bus.keys.dead))

    status = await asyncio.to_thread(cli, "status", "--config", str(cfg.path), cwd=cfg.path.parent)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)  # not a terminal: JSON
    s = {row["name"]: row for row in snap["streams"]}
    assert s["dead"]["length"] == 1 and snap["dead_letters"] == 1
    parts = [v for k, v in s.items() if k == "out:c" or k.startswith("out:c:p")]  # the sink's partitions
    assert len(parts) == 4 and sum(g["pending"] for p in parts for g in p["groups"]) == 0
    assert any(c["name"] == "t1" for p in parts for g in p["groups"] for c in g["consumers"])
    assert [i["name"] for i in snap["instances"]] == ["t1"]
    shown = await asyncio.to_thread(cli, "status", "--table", "--config", str(cfg.path), cwd=cfg.path.parent)
    assert "DEAD LETTERS  1" in shown.stdout and "INSTANCES (live)" in shown.stdout

    listed = await asyncio.to_thread(cli, "dead", "list", "--config", str(cfg.path), cwd=cfg.path.parent)
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["reason"] == "permanent: chat gone: recreate it" and row["sink"] == "c"
    shown = await asyncio.to_thread(
        cli, "dead", "show", row["id"], "--config", str(cfg.path), cwd=cfg.path.parent
    )
    assert json.loads(shown.stdout)["payload"]["envelope"]["text"] == "retry me"
    bad = await asyncio.to_thread(
        cli, "dead", "replay", "0-1", "--config", str(cfg.path), cwd=cfg.path.parent
    )
    assert bad.returncode == 1 and "no dead letter 0-1" in bad.stderr
    out = await asyncio.to_thread(
        cli, "dead", "replay", row["id"], "--config", str(cfg.path), cwd=cfg.path.parent
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"replayed": 1, "skipped": 0}
    await wait_for(lambda: len(sink.sent) == 1)
    assert sink.sent[0].envelope.text == "retry me"
    assert await d.redis.xlen(d.bus.keys.dead) == 0
