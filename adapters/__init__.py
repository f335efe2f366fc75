"""The registry's entries: config ``type`` → ``"module:Class"``, one line per adapter.

The core (``bridge/``) never imports this package directly; it loads it by name through
:meth:`bridge.adapter.Registry.from_module`, and each class only when a config uses its type.
"""

SOURCES: dict[str, str] = {
    "manual": "adapters.generic.manual:ManualSource",
    "webhook": "adapters.generic.webhook:WebhookSource",
    "wecom_app": "adapters.wecom.app_callback:WeComAppSource",
    "wecom_aibot": "adapters.wecom.aibot:WeComAIBotSource",
    "wecom_aibot_ws": "adapters.wecom.aibot_ws:WeComAIBotWSSource",
    "wechat_oa": "adapters.official_account.push:WeChatOASource",
}

SINKS: dict[str, str] = {
    "log": "adapters.generic.log_sink:LogSink",
    "http": "adapters.generic.http_sink:HttpSink",
    "wecom_aibot": "adapters.wecom.aibot_sink:WeComAIBotSink",
    "wecom_aibot_ws": "adapters.wecom.aibot_ws_sink:WeComAIBotWSSink",
    "wecom_app": "adapters.wecom.app_sink:WeComAppSink",
    "wecom_webhook": "adapters.wecom.webhook_sink:WeComWebhookSink",
    "wechat_oa": "adapters.official_account.customer_service:WeChatOASink",
    "openclaw": "adapters.openclaw.sink:OpenClawSink",
}

#: sub-commands of ``wechat-bridge`` the adapters contribute: name → module with configure() and run()
COMMANDS: dict[str, str] = {
    "simulate": "adapters.wechat.simulate",
    "wecom": "adapters.wecom.cli",
}
