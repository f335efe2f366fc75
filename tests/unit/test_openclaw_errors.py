"""How the openclaw sink reads the gateway's answers: refusals, run results, history, errors, options."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest

from adapters.openclaw.gateway import (
    Connection,
    FrameTooLarge,
    GatewayClient,
    GatewayError,
    GatewayRefused,
    RunEnded,
    _Retry,
    connect_refusal,
    final_answer,
    find_in_history,
)
from adapters.openclaw.http import http_base
from adapters.openclaw.sink import KeyRejected, OpenClawSink, run_failure, turn_error
from bridge.adapter import Registry
from bridge.errors import ConfigError, PermanentError, RetryableError

# -- connecting ----------------------------------------------------------------------------------


def test_a_bad_token_is_a_refusal_that_names_the_fix() -> None:
    err = GatewayError(
        {
            "code": "INVALID_REQUEST",
            "message": "unauthorized: gateway token mismatch (provide gateway auth token)",
            "details": {"code": "AUTH_TOKEN_MISMATCH", "canRetryWithDeviceToken": True},
        }
    )
    r = connect_refusal(err, "dev1")
    assert isinstance(r, GatewayRefused)
    assert "refused the credentials" in str(r) and "AUTH_TOKEN_MISMATCH" in str(r) and "token" in str(r)


def test_pairing_and_protocol_refusals() -> None:
    pairing = GatewayError(
        {
            "code": "NOT_PAIRED",
            "message": "pairing required",
            "details": {"code": "PAIRING_REQUIRED", "requestId": "req-7"},
        }
    )
    r = connect_refusal(pairing, "dev1")
    assert isinstance(r, GatewayRefused) and "openclaw devices approve req-7" in str(r) and "dev1" in str(r)
    proto = GatewayError(
        {"code": "INVALID_REQUEST", "message": "protocol mismatch", "details": {"code": "PROTOCOL_MISMATCH"}}
    )
    assert isinstance(connect_refusal(proto, "d"), GatewayRefused)
    device = GatewayError(
        {
            "code": "INVALID_REQUEST",
            "message": "bad sig",
            "details": {"code": "DEVICE_AUTH_SIGNATURE_INVALID"},
        }
    )
    assert "device identity" in str(connect_refusal(device, "d"))


def test_a_starting_gateway_is_retried_after_its_hint() -> None:
    err = GatewayError(
        {
            "code": "UNAVAILABLE",
            "message": "gateway starting; retry shortly",
            "retryable": True,
            "retryAfterMs": 500,
        }
    )
    r = connect_refusal(err, "d")
    assert isinstance(r, _Retry) and r.retry_after == 0.5


# -- a run's final answer ----------------------------------------------------------------------------


def test_the_answer_is_the_runs_payload_texts() -> None:
    ok = {"runId": "k", "status": "ok", "result": {"payloads": [{"text": "hello", "mediaUrl": None}]}}
    assert final_answer(ok, "k").text == "hello"
    two = {
        "status": "ok",
        "result": {"payloads": [{"text": "a"}, {"text": "b", "mediaUrl": "https://x/c.png"}]},
    }
    assert final_answer(two, "k").text == "a\n\nb\n[media: https://x/c.png]"
    silent = {"status": "ok", "result": {"payloads": []}}
    assert final_answer(silent, "k").text == ""
    mixed = {"status": "ok", "result": {"payloads": [{"text": "oops", "isError": True}, {"text": "fine"}]}}
    assert final_answer(mixed, "k").text == "fine"


@pytest.mark.parametrize(
    "payload,words",
    [
        (
            {
                "status": "error",
                "summary": "failed",
                "result": {"payloads": [{"text": "⚠️ Agent run failed", "isError": True}]},
            },
            "failed",
        ),
        (
            {"status": "ok", "result": {"payloads": [{"text": "⚠️ Agent run failed", "isError": True}]}},
            "Agent run failed",
        ),
        ({"status": "timeout", "summary": "aborted", "stopReason": "timeout"}, "aborted (timeout)"),
    ],
)
def test_a_run_without_an_answer_fails(payload: dict[str, Any], words: str) -> None:
    with pytest.raises(RunEnded, match=re.escape(words)):
        final_answer(payload, "k")


# -- error mapping for a turn ---------------------------------------------------------------------------


def test_a_failed_run_is_permanent_with_the_reason() -> None:
    e = GatewayError(
        {
            "code": "UNAVAILABLE",
            "message": "LLM request failed: provider rejected the request schema or tool payload.",
        },
        {
            "runId": "k",
            "status": "error",
            "summary": "LLM request failed: provider rejected the request schema or tool payload.",
        },
    )
    out = turn_error(e)
    assert isinstance(out, PermanentError)
    assert (
        str(out)
        == "the agent run failed: LLM request failed: provider rejected the request schema or tool payload."
    )
    assert isinstance(run_failure({"status": "error"}, RunEnded("boom")), PermanentError)


def test_after_a_gateway_restart_the_old_key_is_rejected_not_failed() -> None:
    changed = GatewayError(
        {
            "code": "UNAVAILABLE",
            "message": 'Session "agent:main:x" changed while starting work. Retry. | SESSION_WORK_START_CHANGED',
        },
        {"runId": "k", "status": "error", "summary": "... | SESSION_WORK_START_CHANGED"},
    )
    assert isinstance(turn_error(changed), KeyRejected)
    ended = GatewayError(
        {"code": "UNAVAILABLE", "message": "Pending input ownership ended; submit a new turn to continue"}
    )
    assert isinstance(turn_error(ended), KeyRejected)


def test_unavailable_is_retryable_and_the_rest_permanent() -> None:
    busy = turn_error(
        GatewayError({"code": "UNAVAILABLE", "message": "gateway draining", "retryAfterMs": 2000})
    )
    assert isinstance(busy, RetryableError) and busy.retry_after == 2.0
    plain = turn_error(GatewayError({"code": "UNAVAILABLE", "message": "later"}))
    assert isinstance(plain, RetryableError) and plain.retry_after == 5.0
    unknown = turn_error(GatewayError({"code": "INVALID_REQUEST", "message": 'Unknown agent id "nosuch"'}))
    assert isinstance(unknown, PermanentError) and "Unknown agent id" in str(unknown)
    restart = run_failure({"status": "timeout", "stopReason": "restart"}, RunEnded("aborted"))
    assert isinstance(restart, RetryableError)


# -- the answer in chat.history after a restart ----------------------------------------------------------


def user(key: str, text: str = "hi", recovery: bool = False) -> dict[str, Any]:
    m: dict[str, Any] = {
        "role": "user",
        "content": text,
        "idempotencyKey": f"{key}:user",
        "__openclaw": {"idempotencyKey": f"{key}:user"},
    }
    if recovery:
        m["provenance"] = {"kind": "internal_system", "sourceTool": "main_session_restart_recovery"}
    return m


def assistant(run: str, text: str, stop: str = "stop") -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "stopReason": stop,
        "__openclaw": {"runId": run},
    }


def test_history_finds_our_runs_answer() -> None:
    msgs = [user("old"), assistant("old", "old answer"), user("K"), assistant("K", "our answer")]
    m = find_in_history(msgs, ["K"])
    assert m.answer is not None and m.answer.text == "our answer" and m.answer.run_id == "K" and m.seen


def test_history_finds_the_gateways_rerun_after_a_restart() -> None:
    rec = "5ae12788-3e44-4a86-8532-5c0c38a58d89"
    pending = [
        user("K", "question"),
        user(rec, "[System] Your previous turn was interrupted…", recovery=True),
    ]
    m = find_in_history(pending, ["K"])
    assert m.answer is None and m.seen and m.recovery_run == rec
    done = [*pending, assistant(rec, "calling a tool", stop="toolUse"), assistant(rec, "the answer")]
    m = find_in_history(done, ["K"])
    assert m.answer is not None and m.answer.text == "the answer" and m.answer.run_id == rec


def test_history_stops_at_the_next_turn_and_knows_when_it_saw_nothing() -> None:
    msgs = [user("K"), user("next"), assistant("next", "not ours")]
    m = find_in_history(msgs, ["K"])
    assert m.answer is None and m.seen and m.recovery_run is None
    assert find_in_history([user("other"), assistant("other", "x")], ["K"]) == find_in_history([], ["K"])
    assert not find_in_history([], ["K"]).seen
    # any key this delivery used counts (the original and the ones derived after a restart)
    m2 = find_in_history([user("K-r1"), assistant("K-r1", "second try")], ["K", "K-r1"])
    assert m2.answer is not None and m2.answer.text == "second try"


def test_a_failed_run_in_history_is_reported() -> None:
    m = find_in_history(
        [user("K"), {**assistant("K", ""), "stopReason": "error", "errorMessage": "model down"}], ["K"]
    )
    assert m.failed == "the agent run failed: model down"


# -- before sending -----------------------------------------------------------------------------------------


class _NoSocket:
    close_code = None

    async def send_str(self, data: str) -> None:
        raise AssertionError("nothing may be sent")


async def test_a_request_over_max_payload_is_refused_before_sending() -> None:
    client = GatewayClient(
        "ws://127.0.0.1:1", token=None, password=None, device=None, log=None, http=aiohttp.ClientSession
    )
    conn = Connection(_NoSocket(), {"policy": {"maxPayload": 1000}}, 1)  # type: ignore[arg-type]
    with pytest.raises(FrameTooLarge, match=r"over the gateway's policy.maxPayload of 1000 bytes"):
        await client.request(conn, "agent", {"message": "x" * 2000, "idempotencyKey": "k"})
    assert conn.pending == {}
    await asyncio.sleep(0)


def test_http_base_from_the_gateway_url() -> None:
    assert http_base("ws://127.0.0.1:18789") == "http://127.0.0.1:18789"
    assert http_base("wss://gw.example.com/ws") == "https://gw.example.com"
    assert http_base("http://h:1/") == "http://h:1"


def test_run_keys() -> None:
    assert OpenClawSink.run_key("abc", 0) == "abc"
    assert OpenClawSink.run_key("abc", 2) == "abc-r2"


# -- options ------------------------------------------------------------------------------------------------

BASE = """
[[inbound]]
name = "in"
type = "manual"
[[outbound]]
name = "claw"
type = "openclaw"
{opts}
[[routes]]
name = "ai"
from = "in"
to = "claw"
reply = true
"""


@pytest.mark.parametrize(
    "opts,error",
    [
        ("", "outbound.claw.token: required (or password)"),
        ('token = "t"\npassword = "p"', "outbound.claw.password: give either token or password"),
        ('token = "t"\nurl = "tcp://x"', "outbound.claw.url: expected ws://"),
        ('token = "t"\nagent = "WeChat"', "outbound.claw.agent: 'WeChat' is not an agent id"),
        ('token = "t"\nroute_agents = {ai = "Ops Bot"}', "outbound.claw.route_agents.ai: 'Ops Bot'"),
        (
            'token = "t"\nsession_key = "agent:x:{conversation}"',
            "outbound.claw.session_key: must not start with agent:",
        ),
        ('token = "t"\ngroup_template = "{sender}"', "outbound.claw.group_template: must contain {text}"),
        ('token = "t"\nmode = "grpc"', "outbound.claw.mode"),
        ('token = "t"\ntimeout = 0', "outbound.claw.timeout: must be positive"),
        ('token = "t"\nmodel = "x"', "outbound.claw.model: unknown key"),
    ],
)
def test_options_are_checked_with_the_key_named(write_config: Any, opts: str, error: str) -> None:
    cfg = write_config(BASE.format(opts=opts), redis=False)
    with pytest.raises(
        ConfigError,
        match=re.escape(error),
    ):
        Registry.from_module("adapters").validate(cfg)


def test_good_options_validate_and_secrets_stay_masked(write_config: Any) -> None:
    cfg = write_config(
        BASE.format(opts='token = "s3cret-token"\nagent = "wechat"\nroute_agents = {ai = "ops"}'), redis=False
    )
    opts = Registry.from_module("adapters").validate(cfg)["claw"]
    assert opts.agent == "wechat" and opts.route_agents == {"ai": "ops"}
    assert "s3cret" not in repr(opts)


def _no_http() -> Any:
    raise AssertionError("no HTTP here")


async def test_route_agents_must_name_routes(write_config: Any, tmp_path: Any) -> None:
    from bridge.adapter import Context

    cfg = write_config(BASE.format(opts='token = "t"\nroute_agents = {nosuch = "ops"}'), redis=False)
    opts = Registry.from_module("adapters").validate(cfg)["claw"]
    ctx = Context(config=cfg, bus=None, redis=None, instance="t", data_dir=tmp_path, http=_no_http)  # type: ignore[arg-type]
    sink = OpenClawSink("claw", opts, ctx)
    with pytest.raises(
        ConfigError, match=r"outbound.claw.route_agents.nosuch: no route named 'nosuch' \(routes: ai\)"
    ):
        await sink.start()
    await sink.close()


def test_the_example_configs_openclaw_section_is_valid(tmp_path: Any) -> None:
    """config/bridge.example.toml ships the section commented out: uncommented, it validates."""
    from pathlib import Path

    from bridge.config import load

    text = (Path(__file__).parents[2] / "config" / "bridge.example.toml").read_text()
    start = text.index('# [[outbound]]\n# name = "claw"')
    block = text[start : text.index("\n\n", start)]
    body = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    (tmp_path / "openclaw-gateway-token").write_text("a-gateway-token")
    cfg_file = tmp_path / "bridge.toml"
    cfg_file.write_text('[[inbound]]\nname = "in"\ntype = "manual"\n' + body + "\n")
    cfg = load(cfg_file, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    opts = Registry.from_module("adapters").validate(cfg)["claw"]
    assert opts.agent == "wechat" and opts.token.reveal() == "a-gateway-token"
    assert cfg.outbound_by_name("claw").concurrency == 4  # type: ignore[union-attr]
