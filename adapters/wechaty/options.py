"""The options of the ``wechaty`` inbound and outbound (documented in source.py and sink.py)."""

from __future__ import annotations

import random

import msgspec

from adapters.wechaty.client import PuppetClient, parse_endpoint
from bridge.config import Secret, parse_rates
from bridge.text import MIN_LIMIT_BYTES


class WechatyOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    endpoint: str
    token: Secret
    tls: bool = True
    server_name: str = ""
    #: PEM text of the CA to trust (the config gives ``ca_file = "<path>"``); default: the community CA
    ca: str = ""
    timeout: float = 15.0
    keepalive: float = 30.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    lease_ttl: float = 10.0
    cache_ttl: float = 300.0
    dedupe_ttl: int = 86_400
    fetch_files: bool = True

    def check(self) -> None:
        try:
            parse_endpoint(self.endpoint)
        except ValueError as e:
            raise ValueError(f"endpoint: {e}") from None
        token = self.token.reveal()
        if not token:
            raise ValueError("token: must not be empty")
        if self.tls and not self.server_name and "_" not in token.lstrip("_"):
            raise ValueError(
                "server_name: the token has no server-name prefix (like insecure_<uuid>); "
                "set server_name for TLS, or tls = false for a plaintext service"
            )
        for key in ("timeout", "keepalive", "reconnect_min", "cache_ttl"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be positive")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max: must be at least reconnect_min")
        if self.lease_ttl < 1:
            raise ValueError("lease_ttl: must be at least 1 second")
        if self.dedupe_ttl < 60:
            raise ValueError("dedupe_ttl: must be at least 60 seconds")

    def client(self) -> PuppetClient:
        return PuppetClient(
            self.endpoint, self.token, tls=self.tls, server_name=self.server_name,
            ca=self.ca or None, timeout=self.timeout, keepalive=self.keepalive,
            cache_ttl=self.cache_ttl,
        )  # fmt: skip


def backoff(attempt: int, low: float, high: float) -> float:
    """Exponential back-off with full jitter: uniform in [low, min(high, low * 2**attempt)]."""
    return random.uniform(low, min(high, low * 2 ** min(attempt, 30)))


class WechatySinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    inbound: str
    mention_reply: bool = True
    max_bytes: int = 2048
    per_conversation_rate: str = "10/minute"
    timeout: float = 30.0

    def check(self) -> None:
        if not self.inbound:
            raise ValueError("inbound: must name a wechaty inbound")
        if self.max_bytes < MIN_LIMIT_BYTES:
            raise ValueError(f"max_bytes: must be at least {MIN_LIMIT_BYTES}")
        try:
            parse_rates(self.per_conversation_rate)
        except ValueError as e:
            raise ValueError(f"per_conversation_rate: {e}") from None
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
