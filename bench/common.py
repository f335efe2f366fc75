"""What every benchmark shares: machine facts, child processes, ports, configs, Redis clean-up, stats.

Benchmarks run loopback-only and kill every process they start (``Procs`` is a context manager that
terminates its children by pid, then kills what did not stop). Working files go to ``bench/out/``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = sys.executable
DEFAULT_REDIS = os.environ.get("WB_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def new_prefix(what: str) -> str:
    return f"wbbench-{what}-{uuid.uuid4().hex[:8]}"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, round(p / 100.0 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


# -- machine facts -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(mod: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod)
    except PackageNotFoundError:
        return "absent"


def machine_info(redis_url: str = DEFAULT_REDIS) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        info = r.info("server")
        redis_version = f"{info.get('redis_version')} ({info.get('executable', '?')})"
    finally:
        r.close()
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "packages": {
            m: _version(m)
            for m in ("aiohttp", "redis", "hiredis", "msgspec", "pycryptodome", "uvloop", "wechatpy")
        },
        "load_avg_at_start": os.getloadavg(),
    }


def print_machine(info: dict[str, Any]) -> None:
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    print(f"machine: nproc={info['nproc']}  cpu={info['cpu']}  mem={info['memory']}  kernel={info['kernel']}")
    print(f"         python {info['python']}  redis {info['redis']}  load avg {info['load_avg_at_start']}")
    print(f"         {pk}")


def command_line() -> str:
    mod = "bench." + Path(sys.argv[0]).stem
    return " ".join([".venv/bin/python", "-m", mod, *sys.argv[1:]])


# -- processes -----------------------------------------------------------------------------------------


class Procs:
    """Child processes of one benchmark; every one is stopped (by its pid) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        OUT.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: Sequence[str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log or OUT / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        p = subprocess.Popen(
            list(args), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        out.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = [(n, q) for n, q in self.procs if q is not p]
        return p.returncode

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, p in reversed(list(self.procs)):
            self.stop(p)


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def post_json(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(body or {}).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _cpu_ticks() -> tuple[int, int, int]:
    """All cores since boot, from /proc/stat: (busy, total, steal) ticks; ``steal`` is time the host
    gave our virtual cores to someone else (counted in busy too)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return sum(f[:8]) - idle, sum(f[:8]), f[7]


class MachineLoad:
    """Busy share of all cores over a phase, and the share other processes took (noise).

    ``others`` = busy − ours: other processes, the kernel's softirq work (our own loopback traffic
    too) and ``steal``, which is also given on its own: time the host ran someone else on our cores.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t0 = time.monotonic()
        self.b0, self.n0, self.s0 = _cpu_ticks()
        self.c0 = {p: _safe_cpu(p) for p in self.pids}
        #: CPU seconds of processes that came and went during the phase (a load generator)
        self.extra = 0.0

    def done(self) -> dict[str, float]:
        b1, n1, s1 = _cpu_ticks()
        wall = time.monotonic() - self.t0
        ncpu = os.cpu_count() or 1
        busy = (b1 - self.b0) / max(n1 - self.n0, 1)
        ours = (sum(_safe_cpu(p) - c for p, c in self.c0.items()) + self.extra) / max(wall * ncpu, 1e-9)
        steal = (s1 - self.s0) / max(n1 - self.n0, 1)
        return {
            "machine_busy": round(busy, 3),
            "ours": round(ours, 3),
            "others": round(max(busy - ours, 0.0), 3),
            "steal": round(steal, 3),
        }


def _safe_cpu(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return 0.0


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy over ``seconds`` (0..1), whoever keeps them busy."""
    b0, t0, _ = _cpu_ticks()
    time.sleep(seconds)
    b1, t1, _ = _cpu_ticks()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(limit: float = 0.15, max_wait: float = 90.0) -> float:
    """Before a measurement: wait (up to ``max_wait`` s) until other work keeps at most ``limit`` of
    the cores busy — this machine is shared and noisy. Returns the last busy share seen (reported)."""
    end = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > limit and time.monotonic() < end:
        busy = machine_busy(2.0)
    return round(busy, 3)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_counting_cpu(p: subprocess.Popen[Any], timeout: float) -> float:
    """Wait for ``p`` to exit; its CPU seconds, read while it lives (gone from /proc once reaped)."""
    cpu = 0.0
    while p.poll() is None:
        try:
            cpu = proc_cpu_seconds(p.pid)
        except OSError:
            break
        time.sleep(0.2)
    p.wait(timeout)
    return cpu


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def redis_pid(redis_url: str = DEFAULT_REDIS) -> int | None:
    """The Redis server's pid when it runs on this machine (for its CPU in /proc)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        pid = int(r.info("server").get("process_id", 0))
    finally:
        r.close()
    return pid if pid and Path(f"/proc/{pid}/stat").exists() else None


def redis_cpu_seconds(redis_url: str = DEFAULT_REDIS) -> float:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        info = r.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    finally:
        r.close()


def cleanup_prefix(prefix: str, redis_url: str = DEFAULT_REDIS) -> int:
    """Delete every key of a benchmark's prefix (UNLINK in batches)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    n = 0
    try:
        batch: list[bytes] = []
        for k in r.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(k)
            if len(batch) >= 5000:
                n += r.unlink(*batch)
                batch = []
        if batch:
            n += r.unlink(*batch)
    finally:
        r.close()
    return n


# -- configs -------------------------------------------------------------------------------------------


def write_config(
    name: str,
    *,
    prefix: str,
    instance: str = "bench1",
    listen_port: int,
    body: str,
    redis_url: str = DEFAULT_REDIS,
    log_level: str = "info",
    stream_maxlen: int = 1_000_000,
) -> Path:
    """A bridge config under bench/out/ with the bench's Redis, prefix, port and log settings."""
    OUT.mkdir(parents=True, exist_ok=True)
    p = OUT / f"{name}.toml"
    p.write_text(
        f"""[bridge]
instance = "{instance}"
data_dir = "{OUT / "var"}"
log_level = "{log_level}"
log_format = "json"
shutdown_timeout = 5

[redis]
url = "{redis_url}"
prefix = "{prefix}"
stream_maxlen = {stream_maxlen}

[http]
listen = "127.0.0.1:{listen_port}"
"""
        + body
    )
    return p


def daemon_args(config: Path, stats_port: int, *, loop: str = "auto") -> list[str]:
    return [PY, "-m", "bench.daemon_proc", "--config", str(config), "--stats-port", str(stats_port),
            "--loop", loop]  # fmt: skip


def save_json(path: Path, res: dict[str, Any]) -> Path:
    """Write ``res`` to ``path`` and keep a copy per run (``<stem>-<date-time>.json`` next to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    path.write_text(text)
    copy = path.with_name(f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    copy.write_text(text)
    return copy


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"
