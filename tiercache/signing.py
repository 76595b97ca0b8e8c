"""HMAC-SHA256 signatures of Redis envelopes and invalidation messages, with key rotation.

An envelope's signature covers the namespace, the encoded key and every header field (version,
flags, codec, expiry times) and the payload, so a payload copied to another key, an older
envelope put back, or a flipped bit all fail verification — before anything is deserialized.
A message's signature covers the namespace, the key, the version, the operation and the origin.

``secret`` is one key, or a list whose first key signs and every key verifies (rotation: deploy
``[new, old]`` everywhere, then ``[new]``). Comparisons are constant-time. No I/O here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_SIZE = 32  # bytes of an envelope signature (HMAC-SHA256)
MESSAGE_SIGNATURE_HEX = 32  # hex characters of a message signature (128 bits)
MIN_SECRET_BYTES = 16

Secret = str | bytes | Sequence[str | bytes]


def _as_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a secret must be str or bytes of at least {MIN_SECRET_BYTES} bytes")
    return secret


class Signer:
    """Signs with the first secret, verifies with any of them."""

    def __init__(self, secret: Secret, namespace: str) -> None:
        keys = [secret] if isinstance(secret, (str, bytes)) else list(secret)
        if not keys:
            raise ValueError("secret must be a key or a non-empty list of keys")
        self._keys = [_as_bytes(k) for k in keys]
        self._context = b"tiercache/1\x00" + namespace.encode("utf-8") + b"\x00"

    def _mac(self, key: bytes, *parts: bytes) -> bytes:
        mac = hmac.new(key, self._context, hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    def sign_envelope(self, encoded: bytes, header: bytes, payload: bytes) -> bytes:
        """The signature of an envelope of ``encoded`` (its header says the signature size)."""
        return self._mac(self._keys[0], b"env", encoded, header, payload)

    def verify_envelope(
        self, encoded: bytes, header: bytes, payload: bytes, signature: bytes
    ) -> bool:
        """Whether ``signature`` is a valid signature of this envelope under any secret."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        return any(
            hmac.compare_digest(self._mac(k, b"env", encoded, header, payload), signature)
            for k in self._keys
        )

    def sign_message(self, encoded: bytes, version: int, op: str, origin: str) -> str:
        """The signature field of an invalidation message (hex)."""
        return self._message_mac(self._keys[0], encoded, version, op, origin)

    def verify_message(
        self, encoded: bytes, version: int, op: str, origin: str, signature: str
    ) -> bool:
        """Whether a message's signature field is valid under any secret."""
        if len(signature) != MESSAGE_SIGNATURE_HEX:
            return False
        return any(
            hmac.compare_digest(self._message_mac(k, encoded, version, op, origin), signature)
            for k in self._keys
        )

    def _message_mac(self, key: bytes, encoded: bytes, version: int, op: str, origin: str) -> str:
        mac = self._mac(key, b"msg", encoded, b"%d" % version, op.encode(), origin.encode())
        return mac.hex()[:MESSAGE_SIGNATURE_HEX]

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} key(s))"  # never the keys themselves
