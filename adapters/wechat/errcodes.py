"""WeChat errcodes → what the runner does: retry, back off, or dead-letter with what to fix.

Calls branch on ``errcode``, never on ``errmsg`` (that only serves as a hint for an unknown code).
"""

from __future__ import annotations

from bridge.errors import PermanentError, RetryableError, SendError
from bridge.redact import scrub

#: errcodes that mean "this access token is no good": drop it, fetch another, try once more
TOKEN_ERRORS: frozenset[int] = frozenset({40014, 42001, 41001})


class ApiError(Exception):
    """WeChat answered with a non-zero errcode."""

    def __init__(self, path: str, errcode: int, errmsg: str = "") -> None:
        super().__init__(f"{path}: errcode {errcode}")
        self.path = path
        self.errcode = errcode
        # errmsg only ever serves as a hint for an unknown errcode; it never decides anything
        self.errmsg = scrub(errmsg.split(", hint:")[0])[:120]


WECOM_TOKEN_ERRORS = {
    40001: "corp_secret is wrong: copy the app's Secret from the WeCom admin console (应用管理 → the app)",
    40013: "corp_id is wrong: copy the CorpID from the WeCom admin console (我的企业 → 企业信息)",
    41002: "corp_id is missing",
    41004: "corp_secret is missing",
}
OA_TOKEN_ERRORS = {
    40013: "app_id is wrong: copy the AppID from the Official Account platform (设置与开发 → 基本配置)",
    40125: "app_secret is wrong: copy the AppSecret from the Official Account platform "
    "(设置与开发 → 基本配置)",
    40164: "this server's IP is not on the account's IP whitelist: add it under 设置与开发 → 基本配置 → "
    "IP白名单 in the Official Account platform",
    41002: "app_id is missing",
    41004: "app_secret is missing",
}

#: errcodes that are final, and what to fix
PERMANENT = {
    60020: "this server's IP is not a trusted IP of the WeCom app: add its public IP under the app's "
    "'Trusted IP' (企业可信IP) in the WeCom admin console (应用管理 → the app → 企业可信IP)",
    93000: "the webhook key is not valid (the robot was removed or the key is wrong): copy the robot's "
    "webhook URL again from the group's robot settings into this sink's key",
    81013: "no valid recipient: the user id is unknown or outside the app's visible range (可见范围); "
    "check the user id and the app's visible range in the WeCom admin console",
    82001: "no recipient given: the target needs a user id, department or tag",
    301002: "agent_id does not belong to the app whose corp_secret is configured: fix agent_id",
    86008: "the chat was not created by this app: an app can only send to chats it created "
    "(wechat-bridge wecom appchat create)",
    40008: "WeChat does not accept this message type here",
    41006: "the attachment's media_id is missing",
    40007: "the attachment's media_id is not valid (WeChat media ids expire after 3 days)",
    44004: "the message is empty",
    45008: "too many articles in one news message (the bridge sends at most 8)",
    40003: "the openid is not a follower of this Official Account: check the conversation id",
    45015: "the 48-hour customer-service window is closed (or the user unfollowed): the user must send "
    "a message to the Official Account before it can answer",
    45047: "too many customer-service messages since the user's last message: the user must write "
    "to the Official Account again",
    48001: "the Official Account has no permission for customer-service messages (verified service "
    "accounts only)",
}
TOO_LONG = (40058, 45002)
CHAT_GONE = (86001, 86003, 40050)


def token_error(e: ApiError, table: dict[int, str]) -> SendError:
    if e.errcode in table:
        return PermanentError(
            f"fetching the access token failed with errcode {e.errcode}: {table[e.errcode]}"
        )
    return send_error(e, backoff=60.0, oa=table is OA_TOKEN_ERRORS)


WECOM_CODES = "https://developer.work.weixin.qq.com/devtool/query?e="
OA_CODES = "https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html"


def send_error(e: ApiError, *, target: str = "", backoff: float = 60.0, oa: bool = False) -> SendError:
    """The error to raise for a failed call: retry, back off, or dead-letter with what to fix."""
    code = e.errcode
    head = f"{e.path}: errcode {code}"
    if code == -1:
        return RetryableError(f"{head}: WeChat is busy")
    if code == 45009:
        return RetryableError(f"{head}: frequency limit reached, backing off", retry_after=backoff)
    if code == 45033:
        return RetryableError(f"{head}: too many concurrent calls, backing off", retry_after=backoff / 12)
    if code in TOKEN_ERRORS or code == 40001:
        return RetryableError(f"{head}: the access token was rejected again after a refresh")
    if code in CHAT_GONE:
        return PermanentError(
            f"{head}: the chat {target or ''} does not exist (any more): create one with `wechat-bridge "
            "wecom appchat create` and put chat:<chatid> in the route's conversation"
        )
    if code in TOO_LONG:
        return PermanentError(
            f"{head}: WeChat rejected a parameter as invalid or too long; the bridge splits text to the "
            "sink's text_limit/markdown_limit before sending, so a too-long part should not happen: "
            "lower those limits for this sink and report it"
        )
    if code in PERMANENT:
        return PermanentError(
            f"{head}: {PERMANENT[code]}" + (f" ({target})" if target and code == 81013 else "")
        )
    hint = f" ({e.errmsg})" if e.errmsg else ""
    docs = OA_CODES if oa else f"{WECOM_CODES}{code}"
    return PermanentError(f"{head}{hint}: look the errcode up at {docs}")
