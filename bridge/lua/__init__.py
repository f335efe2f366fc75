"""The Redis scripts, one ``.lua`` file each, and the small loader that composes them.

A script's file starts with a header saying what it does, its KEYS, its ARGV and what it returns. A
line ``--!include <fragment>.lua`` is replaced by that fragment's text (fragments live beside the
scripts; they define local functions the script then calls, never variables the caller must set).
The files ship as package data: a wheel install reads them exactly as the source tree does.

The scripts and their typed wrappers, in the order a message meets them:

=====================  ==============================================  ================================
file                   what                                            wrapper
=====================  ==============================================  ================================
publish_many.lua       inbound envelopes, deduped, in order            ``bridge.scripts.Scripts``
add_deliveries.lua     the router's deliveries onto a sink's stream    ``bridge.scripts.Scripts``
claim_read.lua         claim what a runner's read just gave            ``bridge.scripts.Scripts``
sync.lua               acks (done markers, XACK) + claims, batched     ``bridge.scripts.Scripts``
claim_send.lua         claim just before a send and charge the rates   ``bridge.scripts.Scripts``
gcra_acquire.lua       charge rates alone (further parts of a reply)   ``bridge.ratelimit.Limiter``
lease_*.lua            fenced leases                                   ``bridge.lease.Lease``
replay.lua             dead letters back onto a sink's stream          ``bridge.dead.DeadLetters``
take_over.lua          a new lease holder claims what others left      ``bridge.recovery.Recovery``
drop_consumers.lua     forget empty consumers of instances gone        ``bridge.recovery.Recovery``
held_request.lua       queue a request for a held connection's holder  ``bridge.held.HeldConnection``
held_finish.lua        record a held request's result, then answer it  ``bridge.held.HeldConnection``
pairing_issue.lua      a DM pairing code for an unknown sender         ``bridge.pairing.Pairing``
claim.lua, gcra.lua,   fragments: ``claim()``, ``gcra()``,
lease_check.lua        ``lease_held()``
=====================  ==============================================  ================================

Adapters keep their own scripts beside them the same way (``adapters/wechat/lua/``: the access-token
cache), loaded with ``source(name, package)``.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_INCLUDE = re.compile(r"^--!include\s+([A-Za-z0-9_]+\.lua)\s*$", re.MULTILINE)


@cache
def source(name: str, package: str = __package__) -> str:
    """The text of script ``name`` (``"lease_acquire"`` or ``"lease_acquire.lua"``), includes resolved.

    ``package``: where the file lives; an adapter keeps its own scripts in a package of its own
    (e.g. ``adapters.wechat.lua``) and loads them through this same loader. Includes resolve within
    that package."""
    return _resolve(package, name if name.endswith(".lua") else f"{name}.lua", ())


def _resolve(package: str, file: str, stack: tuple[str, ...]) -> str:
    if file in stack:
        raise ValueError(f"lua include cycle: {' -> '.join((*stack, file))}")
    text = resources.files(package).joinpath(file).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _resolve(package, m.group(1), (*stack, file)).rstrip("\n"), text)
