"""A bridge daemon in a process of its own, with a stand-in agent sink, for tests that kill it.

``python -m tests.integration.aibot_ws_node <config.toml>``. The ``agent`` outbound type answers
``echo: <text>``; a text with ``SLOW`` answers after a second, one with ``DRAFT`` writes three
growing drafts first, one with ``LONG`` answers with 50 000 bytes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import ClassVar

from bridge import logging as blog
from bridge.adapter import Registry, SendContext, Sink
from bridge.config import load
from bridge.daemon import Daemon, run_loop
from bridge.envelope import Delivery


class AgentSink(Sink):
    """Stands in for an agent; records what it answered, by instance."""

    answered: ClassVar[list[tuple[str, str]]] = []

    async def send(self, delivery: Delivery, ctx: SendContext) -> str:
        env = delivery.envelope
        text = f"echo: {env.text or env.event or ''}"
        if "LONG" in env.text:
            text = (text + " ") + ("lorem ipsum dolor sit amet. " * 1800)
        if "DRAFT" in env.text:
            for n in (1, 2, 3):
                await ctx.draft(text[: len(text) * n // 4])
                await asyncio.sleep(0.15)
        if "SLOW" in env.text:
            await asyncio.sleep(1.0)
        if "CARD" in env.text:
            await ctx.reply(text, meta={"template_card": env.meta.get("card", "")})
        else:
            await ctx.reply(text)
        AgentSink.answered.append((self.ctx.instance, env.id))
        return "a"


def registry() -> Registry:
    reg = Registry.from_module("adapters")
    reg.sinks["agent"] = AgentSink
    return reg


def main() -> None:
    cfg = load(Path(sys.argv[1]))
    blog.setup("debug", "console")
    run_loop(Daemon(cfg, registry()).run_until_stopped())


if __name__ == "__main__":
    main()
