"""The bridge's OpenClaw device identity: a persistent Ed25519 key, and the connect proof it signs.

The gateway identifies a client device by ``sha256hex(raw 32-byte public key)``. On every connect
the client signs the challenge-bound payload (protocol v3, OpenClaw's ``buildDeviceAuthPayloadV3``)::

    v3|<deviceId>|<clientId>|<clientMode>|<role>|<scopes, comma-joined>|<signedAtMs>|<token>|<nonce>
      |<platform>|<deviceFamily>          (one line, no spaces)

``signedAtMs`` and ``nonce`` come from the server's ``connect.challenge``; ``token`` is the shared
gateway token (empty with password auth); platform and device family are trimmed and ASCII-lowercased
(an absent device family leaves the field empty). The key is stored as PKCS#8 PEM, mode 0600, so the
device keeps its identity (and any pairing approval) across restarts.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

__all__ = ["DeviceIdentity", "auth_payload", "b64url", "normalize_metadata"]


def b64url(data: bytes) -> str:
    """base64url without padding, as the gateway expects."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def normalize_metadata(value: str | None) -> str:
    """Trimmed, ASCII letters lowercased (other characters kept), as the gateway does."""
    if not value:
        return ""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in value.strip())


def auth_payload(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: list[str],
    signed_at_ms: int,
    token: str | None,
    nonce: str,
    platform: str,
    device_family: str | None = None,
) -> str:
    """The v3 string a device signs to connect."""
    return "|".join(
        [
            "v3",
            device_id,
            client_id,
            client_mode,
            role,
            ",".join(scopes),
            str(signed_at_ms),
            token or "",
            nonce,
            normalize_metadata(platform),
            normalize_metadata(device_family),
        ]
    )


@dataclass(frozen=True)
class DeviceIdentity:
    key: Any  # Crypto.PublicKey.ECC.EccKey (untyped)
    path: Path

    @property
    def public_raw(self) -> bytes:
        raw: bytes = self.key.public_key().export_key(format="raw")
        return raw

    @property
    def id(self) -> str:
        return hashlib.sha256(self.public_raw).hexdigest()

    @property
    def public_key(self) -> str:
        return b64url(self.public_raw)

    def sign(self, payload: str) -> str:
        sig: bytes = eddsa.new(self.key, "rfc8032").sign(payload.encode())
        return b64url(sig)

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceIdentity:
        """Read the key at ``path``, or create it there (directory 0700, file 0600, never replaced)."""
        try:
            return cls(ECC.import_key(path.read_text()), path)
        except FileNotFoundError:
            pass
        except (ValueError, IndexError, TypeError) as e:
            raise ValueError(
                f"{path}: not an Ed25519 private key in PEM ({e}); move it away to make a new one"
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ECC.generate(curve="Ed25519")
        pem = key.export_key(format="PEM").encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return cls(ECC.import_key(path.read_text()), path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key, path)

    def connect_block(
        self,
        *,
        client_id: str,
        client_mode: str,
        role: str,
        scopes: list[str],
        token: str | None,
        nonce: str,
        signed_at_ms: int,
        platform: str,
        device_family: str | None = None,
    ) -> dict[str, Any]:
        """The ``device`` object of the ``connect`` request."""
        payload = auth_payload(
            device_id=self.id,
            client_id=client_id,
            client_mode=client_mode,
            role=role,
            scopes=scopes,
            signed_at_ms=signed_at_ms,
            token=token,
            nonce=nonce,
            platform=platform,
            device_family=device_family,
        )
        return {
            "id": self.id,
            "publicKey": self.public_key,
            "signature": self.sign(payload),
            "signedAt": signed_at_ms,
            "nonce": nonce,
        }
