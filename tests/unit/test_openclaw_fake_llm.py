"""The fake LLM behind the e2e gateway answers like an OpenAI-compatible streaming server."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.fakes.fake_llm import FakeLLM, answer_for, clean_user_text, user_texts


def test_user_texts_are_cleaned_the_way_openclaw_wraps_them() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are…"},
        {"role": "user", "content": "[Sat 2026-11-21 10:50 UTC] first\n\nRuntime: agent=main | session=x"},
        {"role": "assistant", "content": [{"type": "text", "text": "echo: first"}]},
        {"role": "user", "content": [{"type": "text", "text": "[Sat 2026-11-21 10:51 UTC] [note] second"}]},
        {"role": "user", "content": [{"type": "text", "text": "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>…"}]},
    ]
    assert user_texts(messages) == ["first", "[note] second"]
    assert clean_user_text("plain") == "plain"
    assert answer_for(["first", "[note] second"]) == "echo: [note] second | users=2 | prev=first"
    long = answer_for(["LONG3000 please"])
    assert len(long) >= 3000 and long.startswith("echo: LONG3000 please | users=1 | prev=-\nline 1: ")


async def test_it_streams_chunks_then_done_and_records_requests() -> None:
    llm = FakeLLM()
    url = await llm.start()
    try:
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi there"}]}
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                lines = (await r.text()).split("\n")
            data = [x[6:] for x in lines if x.startswith("data: ")]
            assert data[-1] == "[DONE]"
            chunks = [json.loads(x) for x in data[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text == "echo: hi there | users=1 | prev=-"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            async with s.post(
                url + "/v1/chat/completions",
                json={**body, "messages": [{"role": "user", "content": "FAIL400"}]},
            ) as r:
                assert r.status == 400 and (await r.json())["error"]["message"] == "fake failure 400"
            async with s.get(url + "/_requests") as r:
                assert [x["user_texts"] for x in await r.json()] == [["hi there"], ["FAIL400"]]
    finally:
        await llm.stop()
