"""The Redis scripts, one ``.lua`` file each, and the small loader that composes them.

A script's file starts with a header saying what it does, its KEYS, its ARGV and what it returns. A
line ``--!include <fragment>.lua`` is replaced by that fragment's text (fragments live beside the
scripts; they define local functions the script then calls, never variables the caller must set).
The files ship as package data: a wheel install reads them exactly as the source tree does.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_INCLUDE = re.compile(r"^--!include\s+([A-Za-z0-9_]+\.lua)\s*$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The text of script ``name`` (``"lease_acquire"`` or ``"lease_acquire.lua"``), includes resolved."""
    return _resolve(name if name.endswith(".lua") else f"{name}.lua", ())


def _resolve(file: str, stack: tuple[str, ...]) -> str:
    if file in stack:
        raise ValueError(f"lua include cycle: {' -> '.join((*stack, file))}")
    text = resources.files(__package__).joinpath(file).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _resolve(m.group(1), (*stack, file)).rstrip("\n"), text)
