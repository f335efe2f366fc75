"""HTTP mode: one turn through the gateway's OpenAI-compatible ``POST /v1/chat/completions``.

For gateways that expose only HTTP (``gateway.http.endpoints.chatCompletions.enabled``). The request
names the agent in ``model`` (``openclaw/<agentId>``) and the conversation in
``x-openclaw-session-key: agent:<agentId>:<key>`` (the gateway keeps the memory; only the new message
is sent), with ``stream: true``: server-sent ``chat.completion.chunk`` events carry the answer in
``choices[0].delta.content`` and end with ``data: [DONE]``. An error after the stream started comes
as HTTP 200 with ``data: {"error": …}``.

Unlike the WebSocket protocol this route has no idempotency key: a retried delivery whose first try
reached the gateway runs the agent again. Prefer ``mode = "ws"`` where the gateway allows it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from bridge.errors import PermanentError, RetryableError

__all__ = ["AuthRejected", "chat_completion", "http_base"]

_dec = msgspec.json.Decoder()


class AuthRejected(PermanentError):
    """401/403: the token (or password) is wrong; the sink's readiness says so."""


def http_base(url: str) -> str:
    """``ws://h:p/x`` → ``http://h:p`` (the gateway serves HTTP and WebSocket on one port)."""
    scheme, sep, rest = url.partition("://")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    host = rest.split("/", 1)[0]
    return f"{scheme}{sep}{host}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(body: bytes) -> str:
    try:
        obj = _dec.decode(body)
    except msgspec.DecodeError:
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(obj)[:200]


async def chat_completion(
    session: aiohttp.ClientSession,
    *,
    base: str,
    secret: str,
    agent: str,
    session_key: str,
    message: str,
    timeout: float,
    on_text: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """Run one turn; the answer's text. Raises RetryableError / PermanentError / AuthRejected."""
    body = {
        "model": f"openclaw/{agent}",
        "stream": True,
        "messages": [{"role": "user", "content": message}],
    }
    headers = {
        "Authorization": f"Bearer {secret}",
        "x-openclaw-session-key": session_key,
        "Accept": "text/event-stream",
    }
    url = base.rstrip("/") + "/v1/chat/completions"
    try:
        async with session.post(
            url,
            data=msgspec.json.encode(body),
            headers={**headers, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout, connect=10.0),
        ) as resp:
            if resp.status in (401, 403):
                why = _error_message(await resp.read())
                raise AuthRejected(
                    f"the gateway refused the credentials (HTTP {resp.status}: {why}); "
                    "check token (or password) of this outbound against gateway.auth on the gateway"
                )
            if resp.status == 404:
                raise PermanentError(
                    f"HTTP 404 from {url}: enable gateway.http.endpoints.chatCompletions on the gateway"
                )
            if resp.status == 429 or resp.status >= 500:
                raise RetryableError(
                    f"HTTP {resp.status} from the gateway: {_error_message(await resp.read())}",
                    retry_after=_retry_after(resp.headers.get("Retry-After")),
                )
            if resp.status != 200:
                raise PermanentError(
                    f"HTTP {resp.status} from the gateway: {_error_message(await resp.read())}"
                )
            return await _read_stream(resp, on_text)
    except (aiohttp.ClientError, OSError) as e:
        raise RetryableError(f"cannot reach the gateway at {base}: {type(e).__name__}: {e}") from None


async def _read_stream(resp: aiohttp.ClientResponse, on_text: Callable[[str], Awaitable[None]] | None) -> str:
    parts: list[str] = []
    done = False
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj: Any = _dec.decode(data)
        except msgspec.DecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("error"), dict):
            raise PermanentError(f"the agent run failed: {obj['error'].get('message') or obj['error']}")
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                parts.append(content)
                if on_text is not None:
                    await on_text("".join(parts))
    if not done:
        raise RetryableError("the gateway's answer stream ended before [DONE]")
    return "".join(parts)
