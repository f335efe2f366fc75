"""The Grafana dashboard and the Prometheus alert rules in deploy/ use only metrics a daemon serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.daemon import Daemon
from bridge.envelope import Conversation, make_envelope
from bridge.errors import PermanentError, RetryableError
from bridge.lease import Lease
from tests.conftest import CollectSink, wait_for
from tests.integration.test_observe import MANY_SINKS, post

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\bwechat_bridge_[a-z_]+\b")


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "wechat-bridge.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "wechat-bridge-alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


async def served_names(d: Daemon) -> set[str]:
    """Every sample name the daemon serves or declares (a family with no series yet is declared by
    its TYPE line: ``_total``, ``_bucket``, … forms included)."""
    text = (await d.exposition()).decode()
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + suffix for suffix in SUFFIXES.get(fam.type, ("",))}
    return names


async def test_dashboard_and_alerts_use_only_served_metrics(write_config: Any, start_daemon: Any) -> None:
    d: Daemon = await start_daemon(write_config(MANY_SINKS))
    assert d.bus is not None
    # make every labelled family have a series: a request, a refusal, a retry, a dead letter, a lease
    CollectSink.instances["a"].script = [RetryableError("again")]
    CollectSink.instances["b"].script = [PermanentError("gone")]
    assert await post(d, b'{"conversation": "g1", "text": "x"}') == 200
    assert await post(d, b"{}", signed=False) == 401
    await d.bus.publish(make_envelope("hook", Conversation("g2"), "y"), dedupe_key="k")
    await d.bus.publish(make_envelope("hook", Conversation("g2"), "y"), dedupe_key="k")
    keys = d.bus.keys
    lease = Lease(d.redis, keys, "partition-0", "t1:x", ttl=5)
    assert await lease.acquire()
    d.supervisor.crashes["probe"] = 1
    await wait_for(lambda: len(CollectSink.instances["a"].sent) == 2 and d.redis.xlen(keys.dead))
    served = await served_names(d)
    exprs = dashboard_exprs() + rule_exprs()
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used, "no metric found in the dashboard or the rules"
    assert used - served == set(), f"used but not served: {sorted(used - served)}"
    # and every family the daemon serves is on the dashboard (its _bucket/_total forms count)
    shown = {n for e in dashboard_exprs() for n in NAME.findall(e)}
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in served}
    missing = {f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert missing == set(), f"served but not on the dashboard: {sorted(missing)}"
    await lease.release()


def test_the_dashboard_is_grafana_json() -> None:
    dash = json.loads((DEPLOY / "grafana" / "wechat-bridge.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "wechat-bridge"
    for p in dash["panels"]:
        assert p["targets"] and set(p["gridPos"]) == {"x", "y", "w", "h"}, p["title"]


def test_the_alert_rules_cover_the_states_that_need_a_person() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "wechat-bridge-alerts.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert "wechat_bridge_dead_lettered_total" in by_name["WechatBridgeDeadLettersGrowing"]["expr"]
    assert "wechat_bridge_stream_lag" in by_name["WechatBridgeLagRising"]["expr"]
    assert "wechat_bridge_lease_has_holder" in by_name["WechatBridgeNoLeaseHolder"]["expr"]
    assert "wechat_bridge_redis_up" in by_name["WechatBridgeRedisUnreachable"]["expr"]
    for r in by_name.values():
        assert r["labels"]["severity"] in ("info", "warning", "critical") and r["annotations"]["summary"]


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    out = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "wechat-bridge-alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
