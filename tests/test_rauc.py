"""The OS half of updates, with the real `rauc` tool (Debian bookworm's package) as far as this machine allows:
the image's PKI script, a signed verity bundle of a root filesystem, verification against the keyring,
tampered and foreign bundles refused, and the appliance's system.conf through RAUC's own parser. Installing
into a slot and the boot selection need the appliance (image/rauc/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAUC_DIR = REPO / "image/rauc"


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def rauc() -> str:
    path = shutil.which("rauc")
    assert path, "rauc is missing: scripts/test.sh installs it (scripts/apt-packages.txt)"
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    result = run(RAUC_DIR / "make-keys.sh", out)
    assert result.returncode == 0, result.stderr
    assert (out / "signing.key").stat().st_mode & 0o077 == 0, "private keys are mode 600"
    return out


def rootfs_image(tmp: Path) -> Path:
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/storelink-image").write_text("STORELINK_VERSION=test\n")
    (tree / "opt").mkdir()
    (tree / "opt/payload.bin").write_bytes(os.urandom(256 * 1024))  # squashfs compresses zeros to nothing
    image = tmp / "rootfs.ext4"
    result = run("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, image, "8M")
    assert result.returncode == 0, result.stderr
    return image


def build(keys: Path, image: Path, out: Path, version: str = "2026.12.1") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RAUC_CERT": str(keys / "signing.pem"),
           "RAUC_KEY": str(keys / "signing.key"), "RAUC_KEYRING": str(keys / "ca.pem"), "VERSION": version}
    return run(RAUC_DIR / "build-bundle.sh", image, out, env=env)


@pytest.fixture(scope="module")
def bundle(keys: Path, tmp_path_factory: pytest.TempPathFactory, rauc: str) -> Path:
    tmp = tmp_path_factory.mktemp("bundle")
    out = tmp / "storelink-os.raucb"
    result = build(keys, rootfs_image(tmp), out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "signature and payload verified" in result.stdout
    return out


def flipped(bundle: Path, out: Path, offset: int) -> Path:
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def test_bundle_verifies_against_the_keyring(rauc: str, keys: Path, bundle: Path, tmp_path: Path) -> None:
    info = run(rauc, "info", "--keyring", keys / "ca.pem", bundle)
    assert info.returncode == 0, info.stderr
    assert "Compatible: \t'storelink-rpi-arm64'" in info.stdout and "Version:    \t'2026.12.1'" in info.stdout
    assert "Bundle Format: \tverity" in info.stdout
    extract = run(rauc, "extract", "--keyring", keys / "ca.pem", bundle, tmp_path / "out")
    assert extract.returncode == 0, extract.stderr
    assert (tmp_path / "out/rootfs.ext4").is_file()


def test_tampered_and_foreign_bundles_are_refused(rauc: str, keys: Path, bundle: Path, tmp_path: Path) -> None:
    # The payload (the root filesystem): RAUC's signature covers the manifest, which pins the payload's dm-verity
    # root hash; `rauc extract` (and `rauc install`) check the payload against it.
    payload = flipped(bundle, tmp_path / "payload.raucb", 4096 * 10)
    extract = run(rauc, "extract", "--keyring", keys / "ca.pem", payload, tmp_path / "x")
    assert extract.returncode != 0 and "payload is corrupted" in extract.stderr, extract.stderr
    assert not (tmp_path / "x").exists()
    # The signature itself.
    sig = flipped(bundle, tmp_path / "sig.raucb", bundle.stat().st_size - 700)
    info = run(rauc, "info", "--keyring", keys / "ca.pem", sig)
    assert info.returncode != 0, info.stdout
    # A bundle signed under another CA (someone else's keys).
    other = tmp_path / "other"
    assert run(RAUC_DIR / "make-keys.sh", other).returncode == 0
    foreign = tmp_path / "foreign.raucb"
    assert build(other, rootfs_image(tmp_path), foreign).returncode == 0
    info = run(rauc, "info", "--keyring", keys / "ca.pem", foreign)
    assert info.returncode != 0 and "signature verification failed" in info.stderr.lower(), info.stderr


def test_system_config_passes_rauc_checks(rauc: str, keys: Path, bundle: Path, tmp_path: Path) -> None:
    text = (RAUC_DIR / "system.conf").read_text()
    assert "path=/etc/rauc/keyring.pem" in text and "statusfile=/data/rauc.status" in text
    conf = tmp_path / "system.conf"  # the image's file, pointed at this test's keyring and a scratch status file
    conf.write_text(text.replace("/etc/rauc/keyring.pem", str(keys / "ca.pem"))
                    .replace("/data/rauc.status", str(tmp_path / "rauc.status")))
    result = run(rauc, "--conf", conf, "info", bundle)
    assert result.returncode == 0, result.stderr
    assert "Verified inline signature" in result.stderr, "the keyring came from the system config"
    # The check is only worth something if RAUC rejects what is wrong: a misspelt key, a missing backend.
    (tmp_path / "typo.conf").write_text(conf.read_text().replace("bootname=B", "bootnme=B"))
    typo = run(rauc, "--conf", tmp_path / "typo.conf", "info", bundle)
    assert typo.returncode != 0 and "Invalid key 'bootnme'" in typo.stderr, typo.stderr
    (tmp_path / "custom.conf").write_text(conf.read_text().replace("bootloader=uboot", "bootloader=custom"))
    custom = run(rauc, "--conf", tmp_path / "custom.conf", "info", bundle)
    assert custom.returncode != 0 and "custom bootloader backend" in custom.stderr, custom.stderr


def test_make_keys_never_overwrites_a_key(keys: Path) -> None:
    before = (keys / "ca.key").read_bytes()
    result = run(RAUC_DIR / "make-keys.sh", keys)
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr
    assert (keys / "ca.key").read_bytes() == before
