"""The gateway's update agent in a real `storelink run` process: bad bundles refused before anything is handed to
the updater (wrong hash, bad signature, unknown key, tampered download), unsigned commands refused, the
maintenance window respected; and the USB-stick path (`storelink update install-bundle`) refusing the same."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from storelink.remote.signing import KeyPair, keygen, sign
from storelink.update.manifest import file_sha256
from storelink.update.models import UpdateSettings
from tests.helpers import STORELINK, GatewayProcess, Mosquitto, wait_for
from tests.hq_helpers import HeadOffice, signed_command, start_gateway
from tests.release_helpers import IRREVERSIBLE, HttpsFileServer, ReleaseKit
from tests.test_update_bundle import rewrite, signed_manifest
from tests.tls_certs import make_pki


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[HttpsFileServer, Path]]:
    pki = make_pki(tmp_path)
    (tmp_path / "www").mkdir()
    server = HttpsFileServer(tmp_path / "www", pki)
    yield server, pki["ca"]
    server.close()


def release_args(server: HttpsFileServer, bundle: Path, announced: Path | None = None) -> dict[str, Any]:
    """Serve ``bundle``; announce the size and hash of ``announced`` (default: the same file)."""
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    ref = announced or bundle
    return {"action": "install", "release": {"version": "1.0.0", "url": server.url(bundle.name),
                                             "sha256": file_sha256(ref), "size": ref.stat().st_size}}


def update_state(gw: GatewayProcess) -> dict[str, Any]:
    return gw.get("/api/v1/status")[1]["update"]  # type: ignore[no-any-return]


def test_bad_bundles_are_refused_before_the_updater_sees_them(
        tmp_path: Path, mosquitto: Mosquitto, hq_key: KeyPair, release_kit: ReleaseKit,
        https: tuple[HttpsFileServer, Path]) -> None:
    server, ca = https
    gw = start_gateway(tmp_path, mosquitto.port, hq_key, f'[update]\nca = "{ca}"\n')
    ho = HeadOffice(mosquitto.port)
    try:
        gw.wait_online()
        good = release_kit.bundle("1.0.0")
        env = signed_manifest(good)
        paho = next(w["file"] for w in env["payload"]["wheels"] if w["file"].startswith("paho"))
        cases = {
            "wrong wheel hash": (rewrite(good, tmp_path / "hash.bundle", wheel_edit=paho), None, "does not match"),
            "bad signature": (rewrite(good, tmp_path / "sig.bundle", manifest={
                **env, "payload": {**env["payload"], "notes": "edited"}}), None, "bad signature"),
            "unknown key": (rewrite(good, tmp_path / "key.bundle",
                                    manifest=sign(env["payload"], keygen().private_b64)), None, "unknown key_id"),
            "tampered download": (rewrite(good, tmp_path / "mitm.bundle", wheel_edit=paho), good, "expected"),
        }
        for name, (served, announced, reason) in cases.items():
            served_as = served.with_name(f"{name.replace(' ', '-')}.bundle")
            served.rename(served_as)
            args = release_args(server, served_as, announced)
            reply = ho.command("update", signed_command(hq_key, "update", args))
            assert reply["ok"], (name, reply)
            state = wait_for(lambda: update_state(gw)["state"] == "failed" and update_state(gw), 20, what=name)
            assert reason in state["reason"], (name, state)
            update_dir = tmp_path / "update"
            assert not (update_dir / "pending.json").exists(), f"{name}: handed to the updater"
            assert not list((update_dir / "bundles").iterdir()), f"{name}: the refused file was kept"
        reply = ho.command("update", {"args": release_args(server, good)})
        assert not reply["ok"] and reply["code"] == "unauthorized" and "must be signed" in reply["error"]
        events = [json.loads(p) for t, p in _retained(mosquitto, "storelink/store-0042/update/state")]
        assert events and events[-1]["state"] == "failed" and events[-1]["version"] == "0.1.0"
    finally:
        ho.close()
        gw.stop()


def _retained(mosquitto: Mosquitto, topic: str) -> list[tuple[str, bytes]]:
    from tests.helpers import Subscriber

    sub = Subscriber(mosquitto.port, topic)
    try:
        wait_for(lambda: sub.messages, 5, what=f"retained {topic}")
        return [(t, p) for t, p, _r in sub.messages]
    finally:
        sub.close()


def test_install_waits_for_the_maintenance_window(tmp_path: Path, mosquitto: Mosquitto, hq_key: KeyPair,
                                                  release_kit: ReleaseKit, https: tuple[HttpsFileServer, Path]
                                                  ) -> None:
    server, ca = https
    now = datetime.now(UTC)
    closed = f"{(now + timedelta(hours=2)):%H:00}-{(now + timedelta(hours=3)):%H:00}"
    gw = start_gateway(tmp_path, mosquitto.port, hq_key, f'[update]\nca = "{ca}"\nwindows = ["{closed}"]\n')
    ho = HeadOffice(mosquitto.port)
    try:
        gw.wait_online()
        args = release_args(server, release_kit.bundle("1.0.0"))
        reply = ho.command("update", signed_command(hq_key, "update", args))
        assert reply["ok"], reply
        wait_for(lambda: update_state(gw)["state"] == "waiting_window", 20, what="waiting for the window")
        assert not (tmp_path / "update/pending.json").exists(), "nothing is installed while the store trades"
        assert (tmp_path / "update/bundles/storelink-1.0.0.bundle").exists(), "downloaded and verified already"
    finally:
        ho.close()
        gw.stop()


def test_window_rules() -> None:
    s = UpdateSettings(windows=["22:30-04:00"], timezone="Europe/Berlin")
    at = lambda h, m: datetime(2026, 1, 15, h, m, tzinfo=UTC)  # noqa: E731 - Berlin is UTC+1 in January
    assert s.in_window(at(21, 45)) and s.in_window(at(2, 59)) and not s.in_window(at(3, 1))
    assert not s.in_window(at(12, 0))
    assert UpdateSettings().in_window(at(12, 0)), "no windows: any time"
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        UpdateSettings(windows=["2am-4am"])


def test_usb_stick_bundle_is_refused_the_same_way(tmp_path: Path, release_kit: ReleaseKit, hq_key: KeyPair) -> None:
    env = signed_manifest(release_kit.bundle("1.0.0"))
    bad = rewrite(release_kit.bundle("1.0.0"), tmp_path / "usb.bundle",
                  manifest={**env, "payload": {**env["payload"], "version": "9.9.9"}})
    config = tmp_path / "storelink.toml"
    config.write_text(f'store_id = "s1"\n[storage]\npath = "{tmp_path}/data/storelink.db"\n'
                      f'[trust]\npublic_keys = ["{hq_key.public_b64}"]\n')
    result = subprocess.run([STORELINK, "update", "install-bundle", str(bad), "--config", str(config), "--root",
                             str(tmp_path / "root")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "bad signature" in result.stderr, result.stderr
    assert not (tmp_path / "root").exists() and not (tmp_path / "data/update/pending.json").exists()


def test_a_release_that_cannot_be_rolled_back_past_needs_an_explicit_flag(
        tmp_path: Path, hq_key: KeyPair, release_kit: ReleaseKit) -> None:
    """Store side: the updater compares the bundle's schemas with the running release's before it installs."""
    bundle = release_kit.bundle("3.0.0", IRREVERSIBLE)
    root, data = tmp_path / "root", tmp_path / "data"
    running = root / "opt/storelink/releases/1.0.0"
    running.mkdir(parents=True)
    (running / ".storelink-release.json").write_text(json.dumps({  # as image/install-into-root.sh writes it
        "version": "1.0.0", "manifest_sha256": "image",
        "schemas": {n: {"version": 1, "readable_by": 1, "migrates_from": 1} for n in ("outbox", "prices", "kiosk")}}))
    (root / "opt/storelink/releases/current").symlink_to("1.0.0")
    config = tmp_path / "storelink.toml"
    config.write_text(f'store_id = "s1"\n[storage]\npath = "{data}/storelink.db"\n'
                      f'[trust]\npublic_keys = ["{hq_key.public_b64}"]\n')
    (data / "update/bundles").mkdir(parents=True)
    (data / "update/bundles" / bundle.name).write_bytes(bundle.read_bytes())
    (data / "update/pending.json").write_text(json.dumps({
        "action": "install", "version": "3.0.0", "bundle": str(data / "update/bundles" / bundle.name),
        "requested_at": 0}))
    result = subprocess.run([STORELINK, "update", "apply", "--config", str(config), "--root", str(root),
                             "--service", f"pidfile:{tmp_path / 'none.json'}"], capture_output=True, text=True,
                            timeout=120)
    verdict = json.loads((data / "update/result.json").read_text())
    assert result.returncode == 1 and verdict["outcome"] == "failed", result.stdout + result.stderr
    assert "rollback past this release would be impossible (outbox: schema 2 is readable only by schema 2+" \
        in verdict["reason"] and "--allow-irreversible" in verdict["reason"]
    assert sorted(p.name for p in (root / "opt/storelink/releases").iterdir()) == ["1.0.0", "current"]
    assert not (data / "update/pending.json").exists()
