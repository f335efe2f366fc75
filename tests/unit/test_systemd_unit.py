"""The shipped unit passes `systemd-analyze verify` (where systemd-analyze exists) and keeps its promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "systemd" / "wechat-bridge.service"


def test_unit_promises() -> None:
    text = UNIT.read_text()
    for line in [
        "Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=wechat-bridge",
        "LoadCredential=", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "KillMode=mixed",
    ]:  # fmt: skip
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "wechat-bridge"
    unit = tmp_path / "wechat-bridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/wechat-bridge/.venv/bin/wechat-bridge", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "wechat-bridge.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
