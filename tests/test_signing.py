"""storelink.remote.signing: the one Ed25519 envelope verifier (remote config, commands, prices)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from storelink.remote.signing import SignatureError, canonical_json, key_id, keygen, load_private_key, sign, verify


def test_round_trip_and_reordered_json_still_verifies() -> None:
    kp = keygen()
    payload = {"b": [1, 2.5, "é"], "a": {"z": None, "y": True}}
    env = sign(payload, kp.private_b64)
    assert env["key_id"] == kp.key_id == key_id(kp.public_b64)
    # Pretty-printed, reordered text on the wire parses to the same canonical bytes.
    text = json.dumps({"sig": env["sig"], "payload": payload, "key_id": env["key_id"]}, indent=2)
    assert verify(text, [kp.public_b64]) == payload
    assert canonical_json(payload) == '{"a":{"y":true,"z":null},"b":[1,2.5,"é"]}'.encode()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda e: e["payload"].update(price=1), "bad signature"),
        (lambda e: e.pop("sig"), "not signed"),
        (lambda e: e.update(sig="!!"), "not valid base64"),
        (lambda e: e.update(sig="AAAA"), "64 bytes"),
        (lambda e: e.update(key_id="deadbeefdeadbeef"), "unknown key_id"),
        (lambda e: e.update(extra=1), "unexpected envelope keys"),
    ],
)
def test_tampering_is_rejected_with_a_reason(mutate: object, reason: str) -> None:
    kp = keygen()
    env = sign({"price": 2}, kp.private_b64)
    mutate(env)  # type: ignore[operator]
    with pytest.raises(SignatureError) as err:
        verify(env, [kp.public_b64])
    assert reason in err.value.reason


def test_untrusted_key_empty_trust_and_garbage() -> None:
    good, other = keygen(), keygen()
    env = sign({"x": 1}, other.private_b64)
    with pytest.raises(SignatureError, match="unknown key_id"):
        verify(env, [good.public_b64])
    env.pop("key_id")  # without a key id every trusted key is tried, and none matches
    with pytest.raises(SignatureError, match="bad signature"):
        verify(env, [good.public_b64])
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify(env, [])
    with pytest.raises(SignatureError, match="not JSON"):
        verify(b"\xff{", [good.public_b64])
    with pytest.raises(SignatureError, match="not signed"):
        verify([1, 2], [good.public_b64])
    with pytest.raises(ValueError, match="NaN"):
        sign({"x": float("nan")}, good.private_b64)


def test_pem_files_and_rotation(tmp_path: Path) -> None:
    old, new = keygen(), keygen()
    priv = load_private_key(new.private_b64)
    pem = tmp_path / "new.pub.pem"
    pem.write_bytes(
        priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    env = sign({"v": 2}, priv)
    assert verify(env, [old.public_b64, str(pem)]) == {"v": 2}
