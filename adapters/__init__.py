"""The registry's entries: config ``type`` → ``"module:Class"``, one line per adapter.

The core (``bridge/``) never imports this package directly; it loads it by name through
:meth:`bridge.adapter.Registry.from_module`, and each class only when a config uses its type.
"""

SOURCES: dict[str, str] = {
    "manual": "adapters.generic.manual:ManualSource",
    "webhook": "adapters.generic.webhook:WebhookSource",
}

SINKS: dict[str, str] = {
    "log": "adapters.generic.log_sink:LogSink",
    "http": "adapters.generic.http_sink:HttpSink",
}
