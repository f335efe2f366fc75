"""Files only their owner can read: the data directory 0700, what is in it 0600.

The daemon keeps messages in its data directory (the embedded Redis's append-only file), the OpenClaw
device key and Redis's log. On a machine with the usual umask (022) those would be readable by every
local user. :func:`private_dir` makes the directory (0700) and tightens what an older version left in
it; the embedded Redis runs under umask 077 (bridge/embedded_redis.py), so what it writes is 0600.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """``path`` (and missing parents) made with mode 0700; itself, the directories and the files
    under it that this user owns set to 0700 / 0600 (symlinks are left alone)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    uid = os.getuid()
    _tighten(path, DIR_MODE, uid)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            _tighten(Path(root, d), DIR_MODE, uid)
        for f in files:
            _tighten(Path(root, f), FILE_MODE, uid)


def _tighten(p: Path, mode: int, uid: int) -> None:
    try:
        st = p.lstat()
    except FileNotFoundError:
        return  # gone meanwhile (a socket, a temporary file)
    if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(p, stat.S_IMODE(st.st_mode) & mode)
