"""A plain (non-editable) install ships every Lua script: ``bridge.lua.source`` loads each from the
installed package, not from the source tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import json, pathlib, bridge
from importlib import resources
from bridge import lua
out = {"file": bridge.__file__}
for pkg in ("bridge.lua", "adapters.wechat.lua"):
    names = sorted(p.name for p in resources.files(pkg).iterdir() if p.name.endswith(".lua"))
    out[pkg] = {"names": names, "sizes": [len(lua.source(n, pkg)) for n in names]}
print(json.dumps(out))
"""


def test_a_wheel_install_loads_every_lua_script(tmp_path: Path) -> None:
    # built from a copy: setuptools leaves build/ behind, whose stale files a later build would ship
    src = tmp_path / "src"
    for name in ("bridge", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", str(src)],
        check=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    out = subprocess.run([str(py), "-c", CHECK], check=True, cwd=tmp_path, capture_output=True, text=True)
    got = json.loads(out.stdout)
    assert got["file"].startswith(str(venv)), got["file"]  # the installed copy, not the source tree
    for pkg, least in (("bridge.lua", 13), ("adapters.wechat.lua", 3)):
        expected = sorted(p.name for p in resources.files(pkg).iterdir() if p.name.endswith(".lua"))
        assert got[pkg]["names"] == expected and len(expected) >= least, pkg
        assert all(n > 0 for n in got[pkg]["sizes"]), pkg
