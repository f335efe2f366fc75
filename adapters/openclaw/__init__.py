"""OpenClaw: WeChat conversations talk to an AI agent through an OpenClaw gateway (docs/openclaw.md)."""
