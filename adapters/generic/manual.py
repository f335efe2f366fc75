"""``manual``: an inbound with no platform behind it; envelopes come from ``wechat-bridge inject``."""

from __future__ import annotations

from bridge.adapter import Source


class ManualSource(Source):
    """Takes nothing from the network. Useful for demos, dry runs and scripted tests."""
