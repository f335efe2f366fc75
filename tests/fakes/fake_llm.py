"""The one stand-in behind the real OpenClaw gateway: a small OpenAI-compatible streaming LLM.

OpenClaw calls ``POST /v1/chat/completions`` with ``stream: true`` (always) and reads server-sent
events: ``chat.completion.chunk`` objects, a last chunk with ``finish_reason``, then
``data: [DONE]``. This server answers every request with a deterministic text that shows what the
model was given:

    echo: <the last user text> | users=<user turns seen> | prev=<the user text before it, or ->

so a test can tell session memory (``users=2 | prev=<first turn>``) from a fresh session
(``users=1 | prev=-``). User texts are cleaned the way OpenClaw wraps them: its ``[<timestamp>] ``
prefix and ``\\n\\nRuntime: …`` suffix are stripped, and its injected internal-context user messages
(``<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>``) are not counted.

Words in the last user text steer it:

- ``SLOW<n>``: the answer streams over ``n`` seconds (one chunk per word);
- ``FAIL<code>``: answer HTTP ``code`` with an OpenAI-style error body;
- ``LONG<n>``: the answer is padded with numbered lines to at least ``n`` characters.

``GET /_requests`` lists what it was asked (a summary per request), ``POST /_reset`` forgets it,
``GET /v1/models`` lists the one model ``echo``.

Run: ``python -m tests.fakes.fake_llm --port 18790`` (prints ``fake_llm listening on <url>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time
from typing import Any

from aiohttp import web

__all__ = ["FakeLLM", "answer_for", "clean_user_text", "user_texts"]

INTERNAL = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"
_TS_PREFIX = re.compile(r"^\s*\[[A-Z][a-z]{2} \d{4}-\d{2}-\d{2}[^\]]*\]\s*")
_SLOW = re.compile(r"SLOW(\d+(?:\.\d+)?)")
_FAIL = re.compile(r"FAIL(\d{3})")
_LONG = re.compile(r"LONG(\d+)")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def clean_user_text(raw: str) -> str:
    """``[Sat 2026-11-21 10:50 UTC] text\\n\\nRuntime: …`` → ``text``."""
    return _TS_PREFIX.sub("", raw, count=1).split("\n\nRuntime: ", 1)[0].strip()


def user_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The user turns of a request, cleaned, without OpenClaw's injected context messages."""
    out = []
    for m in messages:
        if m.get("role") != "user":
            continue
        raw = _text(m.get("content"))
        if raw.lstrip().startswith(INTERNAL):
            continue
        out.append(clean_user_text(raw))
    return out


def answer_for(users: list[str]) -> str:
    last = users[-1] if users else ""
    prev = users[-2] if len(users) > 1 else "-"
    text = f"echo: {last} | users={len(users)} | prev={prev}"
    m = _LONG.search(last)
    if m:
        want, n = int(m.group(1)), 0
        lines = [text]
        while sum(len(x) + 1 for x in lines) < want:
            n += 1
            lines.append(f"line {n}: the quick brown fox jumps over the lazy dog.")
        text = "\n".join(lines)
    return text


class FakeLLM:
    """The server; ``requests`` holds a summary of every request, oldest first."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/_requests", self.dump)
        app.router.add_post("/_reset", self.reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        h, p = self._runner.addresses[0][:2]
        self.url = f"http://{h}:{p}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body.get("messages") or []
        users = user_texts(messages if isinstance(messages, list) else [])
        last = users[-1] if users else ""
        entry = {
            "n": len(self.requests) + 1,
            "t": time.time(),
            "model": body.get("model"),
            "stream": body.get("stream"),
            "user_texts": users,
            "tools": [
                t.get("function", {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)
            ],
        }
        self.requests.append(entry)
        fail = _FAIL.search(last)
        if fail:
            status = int(fail.group(1))
            err = {"message": f"fake failure {status}", "type": "invalid_request_error", "code": str(status)}
            return web.json_response({"error": err}, status=status)
        reply = answer_for(users)
        slow = _SLOW.search(last)
        delay = float(slow.group(1)) if slow else 0.0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cid, created, model = f"chatcmpl-fake{entry['n']}", int(time.time()), str(body.get("model", "echo"))

        def chunk(
            delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
        ) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        await resp.write(chunk({"role": "assistant", "content": ""}))
        words = reply.split(" ")
        step = delay / max(len(words), 1)
        for i, w in enumerate(words):
            if step:
                await asyncio.sleep(step)
            await resp.write(chunk({"content": w if i == 0 else " " + w}))
        usage = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words)}
        await resp.write(chunk({}, finish="stop", usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "fake"}]}
        )

    async def dump(self, _: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def reset(self, _: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"ok": True})


async def _serve(host: str, port: int) -> None:
    llm = FakeLLM()
    url = await llm.start(host, port)
    print(f"fake_llm listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await llm.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="a fake OpenAI-compatible streaming LLM for OpenClaw tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    asyncio.run(_serve(a.host, a.port))


if __name__ == "__main__":
    main()
