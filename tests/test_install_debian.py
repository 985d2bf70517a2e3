"""A store without the appliance image: scripts/install.sh on plain Debian, run into a debootstrapped root
(image/chroot-test.sh --plain: the same cached base and wheelhouse build as the image test). The venv, the units,
the udev rules, the user and its directories are there; check-config runs on the example as the gateway's user
(naming the extra one of its devices needs and this install lacks); none of the image's own machinery is
installed; and a second run (an upgrade) keeps the store's config."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink import __version__
from tests.test_image_chroot import Image, mode_owner

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first run may debootstrap


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path
              ) -> Iterator[tuple[Image, subprocess.CompletedProcess[str]]]:
    assert os.geteuid() == 0, "the install test needs root (debootstrap, chroot); CI runs as root"
    assert shutil.which("debootstrap"), "debootstrap is missing: scripts/test.sh installs it"
    work = tmp_path_factory.mktemp("plain")
    started = time.monotonic()
    result = subprocess.run([str(REPO / "image/chroot-test.sh"), "--plain", str(work)], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "STORELINK_TEST_WHEELHOUSE": str(wheelhouse)})
    seconds = time.monotonic() - started
    print(f"chroot-test.sh --plain took {seconds:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    yield Image(work / "root", {}, seconds), result
    if os.path.ismount(work / "root/proc"):
        subprocess.run(["umount", "-l", str(work / "root/proc")], check=False)
    shutil.rmtree(work / "root", ignore_errors=True)


def test_check_config_on_the_example_names_what_this_install_lacks(
        installed: tuple[Image, subprocess.CompletedProcess[str]]) -> None:
    image, result = installed
    # The example has a keyboard-wedge scanner; the default install has no evdev: named, and the install is done.
    assert ("devices[3] (id='scanner-2').driver: hid_scanner needs the extra storelink[hid]" in
            result.stdout + result.stderr)
    assert "systemctl enable --now storelink" in result.stdout  # what to do next
    config = image.root / "etc/storelink/storelink.toml"
    assert config.read_bytes() == (REPO / "docs/storelink.example.toml").read_bytes()
    # The installer deletes the device this store does not have: the rest of the example passes, as the gateway's
    # user (it reads the config through its group).
    text = config.read_text()
    start = text.index("# A keyboard-wedge (HID) scanner")
    config.write_text(text[:start] + text[text.index("# The security mat", start):])
    check = image.chroot("/usr/local/bin/storelink", "check-config", "/etc/storelink/storelink.toml",
                         user="storelink")
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "/etc/storelink/storelink.toml: ok (store store-0042, 7 devices)"


def test_venv_units_rules_user_and_directories(installed: tuple[Image, subprocess.CompletedProcess[str]]) -> None:
    image, _result = installed
    r = image.root
    uid, gid = image.ids("storelink", "passwd"), image.ids("storelink", "group")
    assert os.access(r / "opt/storelink/current/bin/storelink", os.X_OK)
    for unit in ("storelink.service", "storelink-recover.service", "storelink-recover.timer",
                 "storelink-update.path", "storelink-update.service"):
        assert (r / "usr/lib/systemd/system" / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    assert (r / "usr/lib/udev/rules.d/99-storelink.rules").read_bytes() == (
        REPO / "systemd/99-storelink.rules").read_bytes()
    groups = {line.split(":")[0]: line.split(":")[3].split(",") for line in (r / "etc/group").read_text().splitlines()}
    assert sorted(g for g, members in groups.items() if "storelink" in members) == ["dialout", "gpio", "input", "lp"]
    assert mode_owner(r / "etc/storelink") == (0o750, 0, gid)
    assert mode_owner(r / "etc/storelink/storelink.toml") == (0o640, 0, gid)
    assert mode_owner(r / "var/lib/storelink") == (0o750, uid, gid)
    # The drivers' default extras, not evdev (a HID scanner needs --extras all, and a compiler).
    probe = image.chroot("/opt/storelink/current/bin/python", "-c",
                         "import importlib.util as u; print([m for m in ('serial', 'gpiozero', 'escpos', 'evdev') "
                         "if u.find_spec(m)])")
    assert probe.stdout.strip() == "['serial', 'gpiozero', 'escpos']", probe.stderr


def test_none_of_the_image_machinery(installed: tuple[Image, subprocess.CompletedProcess[str]]) -> None:
    r = installed[0].root
    assert not (r / "usr/lib/systemd/system/storelink-provision.service").exists()
    assert not (r / "usr/lib/systemd/system/storelink-mark-good.service").exists()
    assert not (r / "etc/rauc/system.conf").exists()
    assert not (r / "opt/storelink/bin/storelink-provision").exists()
    assert not (r / "etc/systemd/system.conf.d/storelink-watchdog.conf").exists()
    assert not (r / "etc/storelink-image").exists()
    assert "storelink-data" not in (r / "etc/fstab").read_text()
    # Not started at boot until the store's config is written and checked (systemctl enable --now storelink).
    wants = r / "etc/systemd/system/multi-user.target.wants"
    assert not (wants / "storelink.service").exists() and not (wants / "storelink-update.path").exists()


def test_storelink_is_on_the_path(installed: tuple[Image, subprocess.CompletedProcess[str]]) -> None:
    on_path = installed[0].chroot("/usr/bin/env", "PATH=/usr/local/bin:/usr/bin:/bin", "storelink", "--version")
    assert on_path.stdout.strip() == f"storelink {__version__}", on_path.stderr  # (Debian's PATH has /usr/local/bin)


def test_running_it_again_upgrades_and_keeps_the_config(
        installed: tuple[Image, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    image, _result = installed
    config = image.root / "etc/storelink/storelink.toml"
    edited = config.read_text().replace('store_id = "store-0042"', 'store_id = "store-0117"')
    config.write_text(edited)
    wheelhouse = image.root.parent / "wheelhouse"
    again = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--root", str(image.root), "--wheelhouse",
                            str(wheelhouse)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert config.read_text() == edited
    assert "/etc/storelink/storelink.toml: ok (store store-0117, 7 devices)" in again.stdout
