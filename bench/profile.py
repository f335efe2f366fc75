"""py-spy around a benchmark phase, and a plain-text summary of where the time went.

``record(pid, path)`` starts ``py-spy record --format raw`` (collapsed stacks) on a running process;
``summary(path)`` turns the stacks into two tables — self time and inclusive time per function, as a
share of all samples — which is what RESULTS.md quotes as profile evidence.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
_LINE = re.compile(r":\d+\)$")


def record(pid: int, path: Path, *, rate: int = 250, native: bool = False) -> subprocess.Popen[bytes]:
    # no --idle: samples of a thread waiting in a system call (epoll, with nothing to do) are left out,
    # so the shares below are shares of the time the process was working
    # --nonblocking: read the stacks without stopping the process (stopping it 250 times a second cost
    # the ingest daemon two thirds of its throughput); a sample may then mix two moments, rarely
    args = [_PY_SPY, "record", "-p", str(pid), "-o", str(path), "-f", "raw", "-r", str(rate), "--nonblocking"]
    if native:
        args.append("--native")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: one row per function, not per line."""
    frame = _LINE.sub(")", frame)
    if "(" in frame:
        func, _, where = frame.partition(" (")
        where = where.rstrip(")")
        parts = where.split("/")
        short = "/".join(parts[-2:]) if "site-packages" in where or "python3" in where else parts[-1]
        return f"{func} ({short})"
    return frame


def summary(path: Path, top: int = 25, idle_markers: tuple[str, ...] = ("select", "epoll", "poll")) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        if any(leaf.startswith(m + " ") for m in idle_markers):
            idle += n
            continue
        self_c[leaf] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "(no samples)"
    busy = total - idle
    out = [f"samples: {total} (busy; idle ones are not recorded)"]
    out.append("self time, % of busy samples:")
    for f, n in self_c.most_common(top):
        out.append(f"  {n / max(busy, 1):6.1%}  {f}")
    out.append("inclusive time, % of busy samples:")
    for f, n in incl.most_common(top * 2):
        if f.startswith(("<module>", "run (asyncio", "run_forever", "_run_once", "run_until_complete")):
            continue
        out.append(f"  {n / max(busy, 1):6.1%}  {f}")
        if len(out) > top * 2 + 4:
            break
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
