"""The device identity: persistent Ed25519 key, id, and the v3 connect proof the gateway checks."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from Crypto.Signature import eddsa

from adapters.openclaw.device import DeviceIdentity, auth_payload, normalize_metadata

SCOPES = ["operator.read", "operator.write"]


def test_the_signed_string_is_the_gateways_v3_payload() -> None:
    # the form OpenClaw's buildDeviceAuthPayloadV3 builds (and the gateway verifies), field by field
    s = auth_payload(
        device_id="9fbf3a29",
        client_id="gateway-client",
        client_mode="backend",
        role="operator",
        scopes=SCOPES,
        signed_at_ms=1795258238826,
        token="tok-123",
        nonce="c4b165b6-790d-4768-b23e-6558c4dd7350",
        platform=" Linux ",
        device_family=None,
    )
    assert s == (
        "v3|9fbf3a29|gateway-client|backend|operator|operator.read,operator.write|1795258238826|tok-123"
        "|c4b165b6-790d-4768-b23e-6558c4dd7350|linux|"
    )
    # password auth signs an empty token; a device family is lowercased like the platform
    s2 = auth_payload(
        device_id="d", client_id="c", client_mode="m", role="r", scopes=[], signed_at_ms=1, token=None,
        nonce="n", platform="Darwin", device_family="MacBookPro",
    )  # fmt: skip
    assert s2 == "v3|d|c|m|r||1||n|darwin|macbookpro"


def test_metadata_normalisation_lowercases_ascii_only() -> None:
    assert normalize_metadata("  Linux\t") == "linux"
    assert normalize_metadata("ÄBC") == "Äbc"  # like the gateway: A-Z only
    assert normalize_metadata(None) == "" and normalize_metadata("   ") == ""


def test_identity_is_created_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "openclaw" / "device-ed25519.pem"
    dev = DeviceIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = DeviceIdentity.load_or_create(path)
    assert again.id == dev.id and again.public_key == dev.public_key
    raw = base64.urlsafe_b64decode(dev.public_key + "=")
    assert len(raw) == 32 and "=" not in dev.public_key
    assert dev.id == hashlib.sha256(raw).hexdigest()


def test_the_connect_block_verifies_against_the_public_key(tmp_path: Path) -> None:
    dev = DeviceIdentity.load_or_create(tmp_path / "k.pem")
    block = dev.connect_block(
        client_id="gateway-client", client_mode="backend", role="operator", scopes=SCOPES, token="T",
        nonce="nonce-1", signed_at_ms=1700000000000, platform="linux",
    )  # fmt: skip
    assert set(block) == {"id", "publicKey", "signature", "signedAt", "nonce"}
    assert block["signedAt"] == 1700000000000 and block["nonce"] == "nonce-1" and block["id"] == dev.id
    payload = f"v3|{dev.id}|gateway-client|backend|operator|operator.read,operator.write|1700000000000|T|nonce-1|linux|"
    pub = eddsa.import_public_key(base64.urlsafe_b64decode(block["publicKey"] + "="))
    sig = base64.urlsafe_b64decode(block["signature"] + "==")
    eddsa.new(pub, "rfc8032").verify(payload.encode(), sig)  # raises when it does not verify
    with pytest.raises(ValueError):
        eddsa.new(pub, "rfc8032").verify(payload.replace("|T|", "|U|").encode(), sig)


def test_a_damaged_key_file_is_reported_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_text("not a key")
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        DeviceIdentity.load_or_create(path)
    assert path.read_text() == "not a key"
