from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.fakes.wecom_api import FakeWeComAPI

JSON = dict[str, Any]


@dataclass
class Env:
    fake: FakeWeComAPI
    base: str
    http: aiohttp.ClientSession

    async def get(self, path: str, **params: str) -> JSON:
        async with self.http.get(self.base + path, params=params) as resp:
            assert resp.status == 200
            body: JSON = await resp.json()
            return body

    async def post(self, path: str, body: Any, **params: str) -> JSON:
        # A stream rather than json=: big bodies (2 MB images) would warn about blocking the loop.
        data = io.BytesIO(json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        async with self.http.post(self.base + path, data=data, params=params, headers=headers) as resp:
            assert resp.status == 200
            answer: JSON = await resp.json()
            return answer

    async def wecom_token(self, secret: str | None = None) -> str:
        fake = self.fake
        body = await self.get("/cgi-bin/gettoken", corpid=fake.corpid, corpsecret=secret or fake.corpsecret)
        assert body["errcode"] == 0
        return str(body["access_token"])

    async def oa_token(self) -> str:
        fake = self.fake
        body = await self.get(
            "/cgi-bin/token", grant_type="client_credential", appid=fake.appid, secret=fake.appsecret
        )
        return str(body["access_token"])

    async def send(self, token: str, body: JSON) -> JSON:
        return await self.post("/cgi-bin/message/send", body, access_token=token)

    def text(self, content: str, **extra: Any) -> JSON:
        return {
            "touser": "alice",
            "msgtype": "text",
            "agentid": self.fake.agentid,
            "text": {"content": content},
        } | extra


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fake = FakeWeComAPI()
    base = await fake.start()
    async with aiohttp.ClientSession() as http:
        yield Env(fake, base, http)
    await fake.stop()


# ---- WeCom gettoken -----------------------------------------------------------------------


async def test_gettoken(env: Env) -> None:
    fake = env.fake
    body = await env.get("/cgi-bin/gettoken", corpid=fake.corpid, corpsecret=fake.corpsecret)
    assert body["errcode"] == 0 and body["errmsg"] == "ok"
    assert body["expires_in"] == 7200 and len(body["access_token"]) > 20
    again = await env.get("/cgi-bin/gettoken", corpid=fake.corpid, corpsecret=fake.corpsecret)
    assert again["access_token"] == body["access_token"]  # same token while valid [91039]
    assert len(fake.token_requests()) == 2


@pytest.mark.parametrize(
    ("params", "errcode"),
    [
        ({"corpsecret": "fake-corp-secret"}, 41002),
        ({"corpid": "wwother", "corpsecret": "fake-corp-secret"}, 40013),
        ({"corpid": "wwfakecorp0001"}, 41004),
        ({"corpid": "wwfakecorp0001", "corpsecret": "wrong"}, 40001),
    ],
)
async def test_gettoken_errors(env: Env, params: dict[str, str], errcode: int) -> None:
    body = await env.get("/cgi-bin/gettoken", **params)
    assert body["errcode"] == errcode
    assert "access_token" not in body
    assert f"e={errcode}" in body["errmsg"]


async def test_token_errors(env: Env) -> None:
    msg = env.text("hi")
    assert (await env.post("/cgi-bin/message/send", msg))["errcode"] == 41001
    assert (await env.send("not-a-token", msg))["errcode"] == 40014
    token = await env.wecom_token()
    assert (await env.send(token, msg))["errcode"] == 0
    env.fake.invalidate_tokens()
    assert (await env.send(token, msg))["errcode"] == 42001
    fresh = await env.wecom_token()
    assert fresh != token
    assert (await env.send(fresh, msg))["errcode"] == 0


async def test_token_expiry(env: Env) -> None:
    env.fake.token_ttl = 60
    body = await env.get("/cgi-bin/gettoken", corpid=env.fake.corpid, corpsecret=env.fake.corpsecret)
    assert body["expires_in"] == 60
    env.fake.advance(61)
    assert (await env.send(body["access_token"], env.text("hi")))["errcode"] == 42001
    assert await env.wecom_token() != body["access_token"]


# ---- WeCom message/send -------------------------------------------------------------------


async def test_message_send(env: Env) -> None:
    token = await env.wecom_token()
    body = await env.send(token, env.text("one", touser="alice|BOB|nobody"))
    assert body["errcode"] == 0
    assert body["invaliduser"] == "nobody"
    assert body["invalidparty"] == "" and body["invalidtag"] == ""
    assert body["msgid"]
    await env.send(token, env.text("two", touser="alice"))
    assert env.fake.contents("alice") == ["one", "two"]
    assert env.fake.contents("bob") == ["one"]
    record = env.fake.sent("/message/send")[-1]
    assert record.json["text"] == {"content": "two"}
    assert record.query["access_token"] == token
    assert record.errcode == 0


async def test_message_send_all_and_party(env: Env) -> None:
    token = await env.wecom_token()
    await env.send(token, env.text("everyone", touser="@all"))
    await env.send(token, env.text("party", touser="", toparty="1|99"))
    for user in ("alice", "bob", "carol", "dave"):
        assert env.fake.contents(user) == ["everyone", "party"]


async def test_message_send_errors(env: Env) -> None:
    token = await env.wecom_token()
    assert (await env.send(token, env.text("x", touser="ghost|Phantom")))["errcode"] == 81013
    body = await env.send(token, env.text("x", touser="ghost|Phantom"))
    assert body["invaliduser"] == "ghost|phantom"
    assert (await env.send(token, env.text("x", touser="")))["errcode"] == 82001
    assert (await env.send(token, env.text("x", agentid=42)))["errcode"] == 301002
    no_agent = env.text("x")
    del no_agent["agentid"]
    assert (await env.send(token, no_agent))["errcode"] == 41011
    assert (await env.send(token, env.text("x", msgtype="bogus")))["errcode"] == 40008
    assert (await env.send(token, env.text("")))["errcode"] == 44004
    markdown = {"touser": "alice", "msgtype": "markdown", "agentid": env.fake.agentid}
    ok = await env.send(token, markdown | {"markdown": {"content": "m" * 2048}})
    assert ok["errcode"] == 0
    too_long = await env.send(token, markdown | {"markdown": {"content": "m" * 2049}})
    assert too_long["errcode"] == 45002
    async with env.http.post(env.base + "/cgi-bin/message/send?access_token=" + token, data=b"{") as resp:
        assert (await resp.json())["errcode"] == 40058


async def test_message_send_truncates_long_text(env: Env) -> None:
    token = await env.wecom_token()
    text = "汉" * 700  # 2100 bytes
    body = await env.send(token, env.text(text))
    assert body["errcode"] == 0  # the real API truncates silently
    delivered = env.fake.delivered_to("alice")[0]
    assert delivered.truncated
    assert delivered.content == "汉" * 682  # 2046 bytes: cut at a code point boundary


async def test_duplicate_check(env: Env) -> None:
    token = await env.wecom_token()
    msg = env.text("same", enable_duplicate_check=1, duplicate_check_interval=600)
    assert (await env.send(token, msg))["errcode"] == 0
    assert (await env.send(token, msg))["errcode"] == 0
    assert env.fake.contents("alice") == ["same"]
    assert [d.dropped for d in env.fake.dropped] == ["duplicate"]
    env.fake.advance(601)
    await env.send(token, msg)
    assert env.fake.contents("alice") == ["same", "same"]
    plain = env.text("same")  # no duplicate check: every copy arrives
    await env.send(token, plain)
    await env.send(token, plain)
    assert len(env.fake.contents("alice")) == 4


async def test_member_rate_limit_drops_silently(env: Env) -> None:
    token = await env.wecom_token()
    for i in range(31):
        assert (await env.send(token, env.text(f"m{i}")))["errcode"] == 0
    assert len(env.fake.contents("alice")) == 30
    assert env.fake.dropped[-1].dropped == "rate_limited"
    env.fake.advance(60)
    await env.send(token, env.text("later"))
    assert env.fake.contents("alice")[-1] == "later"
    env.fake.member_rate_limits = False
    for i in range(40):
        await env.send(token, env.text(f"n{i}"))
    assert len(env.fake.contents("alice")) == 71


# ---- WeCom appchat ------------------------------------------------------------------------


async def test_appchat_lifecycle(env: Env) -> None:
    token = await env.wecom_token()
    created = await env.post(
        "/cgi-bin/appchat/create",
        {"name": "ops", "owner": "alice", "userlist": ["alice", "bob"], "chatid": "ops01"},
        access_token=token,
    )
    assert created == {"errcode": 0, "errmsg": "ok", "chatid": "ops01"}
    auto = await env.post("/cgi-bin/appchat/create", {"userlist": ["alice", "bob"]}, access_token=token)
    assert auto["errcode"] == 0 and auto["chatid"].isalnum()
    update = {"chatid": "ops01", "name": "ops2", "add_user_list": ["carol"], "del_user_list": ["bob"]}
    assert (await env.post("/cgi-bin/appchat/update", update, access_token=token))["errcode"] == 0
    info = await env.get("/cgi-bin/appchat/get", access_token=token, chatid="ops01")
    assert info["chat_info"] == {
        "chatid": "ops01",
        "name": "ops2",
        "owner": "alice",
        "userlist": ["alice", "carol"],
        "chat_type": 0,
    }
    for content in ("first", "second"):
        msg = {"chatid": "ops01", "msgtype": "text", "text": {"content": content}, "safe": 0}
        assert (await env.post("/cgi-bin/appchat/send", msg, access_token=token))["errcode"] == 0
    msg = {"chatid": "ops01", "msgtype": "markdown", "markdown": {"content": "**third**"}}
    assert (await env.post("/cgi-bin/appchat/send", msg, access_token=token))["errcode"] == 0
    assert env.fake.contents("ops01") == ["first", "second", "**third**"]


async def test_appchat_errors(env: Env) -> None:
    token = await env.wecom_token()

    async def create(body: JSON) -> int:
        return int((await env.post("/cgi-bin/appchat/create", body, access_token=token))["errcode"])

    assert await create({"userlist": ["alice"]}) == 86006
    assert await create({"userlist": ["alice", "ghost"]}) == 86007
    assert await create({"userlist": ["alice", "bob"], "owner": "carol"}) == 86207
    assert await create({"userlist": ["alice", "bob"], "chatid": "bad-id"}) == 86001
    assert await create({"userlist": ["alice", "bob"], "chatid": "x" * 33}) == 86205
    assert await create({"userlist": ["alice", "bob"], "chatid": "c1"}) == 0
    assert await create({"userlist": ["alice", "bob"], "chatid": "c1"}) == 86215

    send = {"chatid": "nope", "msgtype": "text", "text": {"content": "x"}}
    assert (await env.post("/cgi-bin/appchat/send", send, access_token=token))["errcode"] == 86003
    assert (await env.get("/cgi-bin/appchat/get", access_token=token, chatid="nope"))["errcode"] == 86003
    long_text = {"chatid": "c1", "msgtype": "text", "text": {"content": "x" * 2049}}
    assert (await env.post("/cgi-bin/appchat/send", long_text, access_token=token))["errcode"] == 45002
    drop_owner = {"chatid": "c1", "del_user_list": ["alice"]}
    assert (await env.post("/cgi-bin/appchat/update", drop_owner, access_token=token))["errcode"] == 86203
    bad_add = {"chatid": "c1", "add_user_list": ["ghost"]}
    assert (await env.post("/cgi-bin/appchat/update", bad_add, access_token=token))["errcode"] == 86216

    env.fake.add_app("other-secret", 1000003)
    other = await env.wecom_token("other-secret")
    send = {"chatid": "c1", "msgtype": "text", "text": {"content": "x"}}
    assert (await env.post("/cgi-bin/appchat/send", send, access_token=other))["errcode"] == 86008


# ---- WeCom group webhook bot --------------------------------------------------------------


async def test_webhook_send_types(env: Env) -> None:
    env.fake.add_webhook_key("KEY1")

    async def send(body: JSON, key: str = "KEY1") -> int:
        return int((await env.post("/cgi-bin/webhook/send", body, key=key))["errcode"])

    text = {"msgtype": "text", "text": {"content": "hello", "mentioned_list": ["alice", "@all"]}}
    assert await send(text) == 0
    assert await send(text, key="unknown") == 93000
    assert await send({"msgtype": "text", "text": {"content": "x" * 2049}}) == 40058
    assert await send({"msgtype": "text", "text": {"content": "x", "mentioned_list": "alice"}}) == 40058
    assert await send({"msgtype": "markdown", "markdown": {"content": "m" * 4096}}) == 0
    assert await send({"msgtype": "markdown", "markdown": {"content": "m" * 4097}}) == 40058
    assert await send({"msgtype": "sticker", "sticker": {}}) == 40008

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    image = {"base64": base64.b64encode(png).decode(), "md5": hashlib.md5(png).hexdigest()}
    assert await send({"msgtype": "image", "image": image}) == 0
    assert await send({"msgtype": "image", "image": image | {"md5": "0" * 32}}) == 40058
    big = b"\0" * (2 * 1024 * 1024 + 1)
    big_image = {"base64": base64.b64encode(big).decode(), "md5": hashlib.md5(big).hexdigest()}
    assert await send({"msgtype": "image", "image": big_image}) == 40009

    article = {"title": "t", "url": "https://example.com"}
    assert await send({"msgtype": "news", "news": {"articles": [article] * 8}}) == 0
    assert await send({"msgtype": "news", "news": {"articles": [article] * 9}}) == 45008
    assert await send({"msgtype": "news", "news": {"articles": []}}) == 40058
    assert [d.msgtype for d in env.fake.delivered_to("KEY1")] == ["text", "markdown", "image", "news"]


async def test_webhook_upload_and_file(env: Env) -> None:
    env.fake.add_webhook_key("KEY1")

    async def upload(data: bytes, kind: str, key: str = "KEY1") -> JSON:
        form = aiohttp.FormData()
        form.add_field("media", data, filename="report.txt", content_type="application/octet-stream")
        url = f"{env.base}/cgi-bin/webhook/upload_media"
        async with env.http.post(url, data=form, params={"key": key, "type": kind}) as resp:
            body: JSON = await resp.json()
            return body

    uploaded = await upload(b"quarterly numbers", "file")
    assert uploaded["errcode"] == 0 and uploaded["type"] == "file"
    assert uploaded["media_id"] and uploaded["created_at"].isdigit()
    record = env.fake.sent("/webhook/upload_media")[-1]
    assert record.form["media"] == "report.txt" and record.files["media"] == b"quarterly numbers"
    media_id = uploaded["media_id"]
    file_msg = {"msgtype": "file", "file": {"media_id": media_id}}
    assert (await env.post("/cgi-bin/webhook/send", file_msg, key="KEY1"))["errcode"] == 0
    voice_msg = {"msgtype": "voice", "voice": {"media_id": media_id}}
    assert (await env.post("/cgi-bin/webhook/send", voice_msg, key="KEY1"))["errcode"] == 40007
    assert (await upload(b"abc", "file"))["errcode"] == 40006
    assert (await upload(b"abcdefgh", "image"))["errcode"] == 40005
    assert (await upload(b"abcdefgh", "file", key="nope"))["errcode"] == 93000


async def test_webhook_rate_limit(env: Env) -> None:
    env.fake.add_webhook_key("KEY1")
    env.fake.add_webhook_key("KEY2")
    msg = {"msgtype": "text", "text": {"content": "tick"}}
    codes = [(await env.post("/cgi-bin/webhook/send", msg, key="KEY1"))["errcode"] for _ in range(21)]
    assert codes == [0] * 20 + [45009]
    assert (await env.post("/cgi-bin/webhook/send", msg, key="KEY2"))["errcode"] == 0  # per key
    env.fake.advance(60)
    assert (await env.post("/cgi-bin/webhook/send", msg, key="KEY1"))["errcode"] == 0
    env.fake.webhook_rate_limit = False
    for _ in range(30):
        assert (await env.post("/cgi-bin/webhook/send", msg, key="KEY1"))["errcode"] == 0
    assert len(env.fake.delivered_to("KEY1")) == 51


# ---- Official Account ---------------------------------------------------------------------


async def test_oa_token(env: Env) -> None:
    fake = env.fake
    body = await env.get(
        "/cgi-bin/token", grant_type="client_credential", appid=fake.appid, secret=fake.appsecret
    )
    assert set(body) == {"access_token", "expires_in"} and body["expires_in"] == 7200

    async def code(**params: str) -> int:
        return int((await env.get("/cgi-bin/token", **params))["errcode"])

    assert await code(grant_type="password", appid=fake.appid, secret=fake.appsecret) == 40002
    assert await code(grant_type="client_credential", secret=fake.appsecret) == 41002
    assert await code(grant_type="client_credential", appid="wxnope", secret=fake.appsecret) == 40013
    assert await code(grant_type="client_credential", appid=fake.appid, secret="wrong") == 40125
    assert await code(grant_type="client_credential", appid=fake.appid) == 41004


async def test_oa_custom_send(env: Env) -> None:
    token = await env.oa_token()

    async def send(openid: str, content: str, tok: str = token) -> int:
        body = {"touser": openid, "msgtype": "text", "text": {"content": content}}
        return int((await env.post("/cgi-bin/message/custom/send", body, access_token=tok))["errcode"])

    assert await send("oAlice", "hello") == 0
    assert env.fake.contents("oAlice") == ["hello"]
    env.fake.set_outside_window("oAlice")
    assert await send("oAlice", "late") == 45015
    env.fake.set_outside_window("oAlice", outside=False)
    assert await send("oAlice", "back") == 0
    assert await send("oStranger", "x") == 40003
    assert await send("oAlice", "x" * 2049) == 45002
    assert await send("oAlice", "x", tok="bogus") == 40001
    assert await send("oAlice", "x", tok=await env.wecom_token()) == 40001
    env.fake.invalidate_tokens("oa")
    assert await send("oAlice", "x") == 42001
    assert env.fake.contents("oAlice") == ["hello", "back"]


async def test_oa_new_token_supersedes_old(env: Env) -> None:
    old = await env.oa_token()
    new = await env.oa_token()
    assert new != old
    body = {"touser": "oBob", "msgtype": "text", "text": {"content": "x"}}
    assert (await env.post("/cgi-bin/message/custom/send", body, access_token=old))["errcode"] == 0
    env.fake.advance(301)  # the old token lives on for 5 minutes only
    assert (await env.post("/cgi-bin/message/custom/send", body, access_token=old))["errcode"] == 40001
    assert (await env.post("/cgi-bin/message/custom/send", body, access_token=new))["errcode"] == 0


# ---- fault injection and switches ---------------------------------------------------------


async def test_fail_next_errcode(env: Env) -> None:
    token = await env.wecom_token()
    env.fake.fail_next("/message/send", errcode=-1)
    env.fake.fail_next("/appchat/send", errcode=45033, times=2)
    assert (await env.send(token, env.text("a")))["errcode"] == -1
    assert (await env.send(token, env.text("b")))["errcode"] == 0
    assert env.fake.contents("alice") == ["b"]
    msg = {"chatid": "nope", "msgtype": "text", "text": {"content": "x"}}
    codes = [(await env.post("/cgi-bin/appchat/send", msg, access_token=token))["errcode"] for _ in range(3)]
    assert codes == [45033, 45033, 86003]
    env.fake.fail_next("/gettoken", errcode=42001)
    body = await env.get("/cgi-bin/gettoken", corpid=env.fake.corpid, corpsecret=env.fake.corpsecret)
    assert body["errcode"] == 42001
    assert [r.errcode for r in env.fake.sent("/message/send")] == [-1, 0]


async def test_fail_next_http_status(env: Env) -> None:
    env.fake.add_webhook_key("K")
    env.fake.fail_next("/webhook/send", http_status=502)
    msg = {"msgtype": "text", "text": {"content": "x"}}
    async with env.http.post(env.base + "/cgi-bin/webhook/send", json=msg, params={"key": "K"}) as resp:
        assert resp.status == 502
        assert resp.content_type != "application/json"
    assert env.fake.sent("/webhook/send")[-1].status == 502
    assert (await env.post("/cgi-bin/webhook/send", msg, key="K"))["errcode"] == 0


async def test_fail_next_delay_then_delivers(env: Env) -> None:
    token = await env.wecom_token()
    env.fake.fail_next("/message/send", delay=0.5)
    timeout = aiohttp.ClientTimeout(total=0.1)
    with pytest.raises(asyncio.TimeoutError):
        async with env.http.post(
            env.base + "/cgi-bin/message/send",
            json=env.text("slow"),
            params={"access_token": token},
            timeout=timeout,
        ):
            pass
    # The client gave up, but the server still handles the call: delivery is ambiguous.
    for _ in range(50):
        if env.fake.contents("alice"):
            break
        await asyncio.sleep(0.05)
    assert env.fake.contents("alice") == ["slow"]


async def test_ip_not_trusted(env: Env) -> None:
    token = await env.wecom_token()
    env.fake.add_webhook_key("K")
    env.fake.ip_not_trusted = True
    assert (await env.send(token, env.text("x")))["errcode"] == 60020
    chat = {"userlist": ["alice", "bob"]}
    assert (await env.post("/cgi-bin/appchat/create", chat, access_token=token))["errcode"] == 60020
    webhook = {"msgtype": "text", "text": {"content": "x"}}
    assert (await env.post("/cgi-bin/webhook/send", webhook, key="K"))["errcode"] == 0
    env.fake.ip_not_trusted = False
    assert (await env.send(token, env.text("x")))["errcode"] == 0


async def test_unknown_path_and_records(env: Env) -> None:
    async with env.http.get(env.base + "/cgi-bin/nothing") as resp:
        assert resp.status == 404
    await env.wecom_token()
    await env.oa_token()
    assert [r.path for r in env.fake.token_requests()] == ["/cgi-bin/gettoken", "/cgi-bin/token"]
    assert env.fake.requests[0].method == "GET" and env.fake.requests[0].status == 404
    assert env.fake.requests[1].query["corpid"] == env.fake.corpid
