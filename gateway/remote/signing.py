"""Ed25519 signatures over a canonical-JSON envelope, shared by remote config, commands AND prices.

One verifier for the whole gateway (gateway/prices/ uses this module too), so that "signed by head office" means the
same thing everywhere and there is one place to get it right.

The envelope on the wire::

    {"payload": <any JSON object>, "key_id": "<16 hex>", "sig": "<base64 of the 64-byte signature>"}

``sig`` covers ``canonical_json(payload)``: keys sorted, no whitespace, UTF-8 (not ASCII-escaped), no NaN/Infinity.
Head office re-serialises nothing: it signs the canonical bytes of the object it publishes, and the gateway checks
the canonical bytes of the object it parsed, so the JSON text in between may be pretty-printed or reordered.

``key_id`` is the first 16 hex digits of SHA-256 over the 32 raw public-key bytes. It only picks the key to try
(several keys are trusted during a key rotation); the signature is what is trusted, never the id.

Keys are given as base64 of the 32 raw bytes (what ``[trust] public_keys`` holds and what ``keygen()`` prints),
or as the path of a PEM file.

Callers MUST make the payload say what it is for (e.g. ``"kind": "config"`` plus the store id) and check that, so a
signed price batch cannot be replayed as a config or a command: the signature proves who, not what for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from storelink import safe_json

__all__ = [
    "KeyPair",
    "SignatureError",
    "canonical_json",
    "key_id",
    "keygen",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify",
]


class SignatureError(Exception):
    """The envelope is not validly signed by a trusted key. ``reason`` is short and safe to report upstream."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class KeyPair:
    private_b64: str  # keep secret: base64 of the 32-byte Ed25519 seed
    public_b64: str  # goes into [trust] public_keys
    key_id: str


def canonical_json(obj: Any) -> bytes:
    """The exact bytes a signature covers. Raises ValueError for non-finite floats or non-string keys."""

    def check(o: Any) -> None:
        if isinstance(o, float) and not math.isfinite(o):
            raise ValueError("NaN/Infinity cannot be signed")
        if isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, str):
                    raise ValueError(f"object keys must be strings, got {type(k).__name__}")
                check(v)
        elif isinstance(o, list | tuple):
            for v in o:
                check(v)

    check(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | str) -> str:
    pub = load_public_key(key) if isinstance(key, str) else key
    return hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def _b64_32(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def load_public_key(text: str) -> Ed25519PublicKey:
    """Base64 of 32 raw bytes, PEM text, or a path to a PEM file. Raises ValueError with a clear message."""
    raw = _b64_32(text)
    if raw is not None:
        return Ed25519PublicKey.from_public_bytes(raw)
    pem = text.encode() if "-----BEGIN" in text else _read_key_file(text)
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"not an Ed25519 public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("public key is not Ed25519")
    return key


def load_private_key(text: str) -> Ed25519PrivateKey:
    """Base64 of the 32-byte seed, PEM text, or a path to an unencrypted PEM (PKCS#8) file."""
    raw = _b64_32(text)
    if raw is not None:
        return Ed25519PrivateKey.from_private_bytes(raw)
    pem = text.encode() if "-----BEGIN" in text else _read_key_file(text)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an unencrypted Ed25519 private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("private key is not Ed25519")
    return key


def _read_key_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"not base64 key bytes and not a readable key file ({e.strerror or e})") from None


def keygen() -> KeyPair:
    priv = Ed25519PrivateKey.generate()
    seed = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = priv.public_key()
    return KeyPair(
        private_b64=base64.b64encode(seed).decode(),
        public_b64=base64.b64encode(_raw_public(pub)).decode(),
        key_id=key_id(pub),
    )


def sign(payload: Any, private_key: Ed25519PrivateKey | str) -> dict[str, Any]:
    """Wrap ``payload`` in a signed envelope (a dict; json.dumps it to publish)."""
    priv = load_private_key(private_key) if isinstance(private_key, str) else private_key
    sig = priv.sign(canonical_json(payload))
    return {"payload": payload, "key_id": key_id(priv.public_key()), "sig": base64.b64encode(sig).decode()}


TrustedKeys = Iterable[Ed25519PublicKey | str]


def verify(envelope: Any, trusted_keys: TrustedKeys, *, max_bytes: int = safe_json.MAX_BYTES) -> Any:
    """Return the payload of ``envelope`` (a dict, or JSON bytes/str) if a trusted key signed it.

    Raises SignatureError with a reason fit for a rejection report ("not signed", "unknown key", ...).
    """
    if isinstance(envelope, bytes | bytearray | str):
        try:
            envelope = safe_json.loads(envelope, max_bytes=max_bytes)
        except safe_json.JsonRejected as e:
            raise SignatureError(f"not JSON: {e.reason}") from None
    if not isinstance(envelope, Mapping):
        raise SignatureError("not signed: expected an object with payload, key_id and sig")
    missing = [k for k in ("payload", "sig") if k not in envelope]
    if missing:
        raise SignatureError(f"not signed: missing {', '.join(missing)}")
    extra = sorted(set(envelope) - {"payload", "key_id", "sig"})
    if extra:
        raise SignatureError(f"unexpected envelope keys: {', '.join(safe_json.echo(k, 40) for k in extra[:5])}")
    sig_text = envelope["sig"]
    if not isinstance(sig_text, str):
        raise SignatureError("sig must be a base64 string")
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("sig is not valid base64") from None
    if len(sig) != 64:
        raise SignatureError(f"sig must be 64 bytes, got {len(sig)}")
    try:
        message = canonical_json(envelope["payload"])
    except ValueError as e:
        raise SignatureError(f"payload cannot be canonicalised: {e}") from None

    keys: list[Ed25519PublicKey] = []
    for k in trusted_keys:
        try:
            keys.append(load_public_key(k) if isinstance(k, str) else k)
        except ValueError:
            continue  # a broken trust entry is reported by config validation, not per message
    if not keys:
        raise SignatureError("no trusted keys configured ([trust] public_keys is empty)")
    wanted = envelope.get("key_id")
    if wanted is not None:
        if not isinstance(wanted, str):
            raise SignatureError("key_id must be a string")
        keys = [k for k in keys if key_id(k) == wanted]
        if not keys:
            raise SignatureError(f"unknown key_id {safe_json.echo(wanted, 40)}: not in [trust] public_keys")
    for k in keys:
        try:
            k.verify(sig, message)
        except InvalidSignature:
            continue
        return envelope["payload"]
    raise SignatureError("bad signature: payload was altered or signed by an untrusted key")
