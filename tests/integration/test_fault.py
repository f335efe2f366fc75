"""The fault run, short (bench/fault.py has the long one): three daemons as subprocesses sharing a
private Redis and a recording receiver; kill -9 twice (one never restarted), Redis stopped once, the
receiver failing 10% of sends. Every promise is checked (tests/unit/test_fault_checker.py shows each
check failing on a bad record)."""

from __future__ import annotations

import shutil

import pytest

from bench import fault

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


async def test_three_instances_kills_a_redis_outage_and_a_failing_receiver() -> None:
    args = fault.parser().parse_args(
        ["--envelopes", "1000", "--conversations", "50", "--kills", "3", "--outage", "3",
         "--rate", "100/second", "--drain-timeout", "90"]
    )  # fmt: skip
    rep = await fault.run(args)
    assert rep.ok, "\n".join(rep.lines())
    assert rep.delivered == rep.expected == 1000
