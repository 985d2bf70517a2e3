"""The appliance image, as far as it can be built here: image/chroot-test.sh debootstraps a Debian root, installs
the wheel with the same script the pi-gen stage runs, and provisions it from a boot partition that holds what
`storelink hq enroll` wrote for the store. These tests check what the SD card would hold (files, owners, modes,
enabled units, no secrets left on the boot side) and that the provisioned store connects to a broker set up with
`storelink hq broker-config`, with its own certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storelink import __version__
from tests.fleet import Fleet
from tests.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "image/chroot-test.sh"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first run debootstraps (minutes)

STORE = "store-0042"
# What head office's enrolment template says for this store's hardware (enrol fills in the rest).
TEMPLATE = """\
[http]
listen = "127.0.0.1:{http_port}"
[mqtt]
reconnect_min = 0.5
reconnect_max = 2.0
"""


@dataclass
class Image:
    root: Path
    boot_files: dict[str, bytes]
    seconds: float
    fleet: Fleet | None = None  # head office that enrolled the store on the boot partition (none: a plain install)

    @property
    def boot(self) -> Path:
        return self.root / "boot/firmware/storelink"

    def chroot(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["chroot", str(self.root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        if user:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)

    def provision(self) -> subprocess.CompletedProcess[str]:
        proc = self.root / "proc"
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        try:
            return self.chroot("/usr/bin/env", "STORELINK_DATA_PARTITION=off", "STORELINK_OVERLAY=off",
                               "/opt/storelink/bin/storelink-provision")
        finally:
            subprocess.run(["umount", "-l", str(proc)], check=True)

    def ids(self, name: str, db: str) -> int:
        for line in (self.root / "etc" / db).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        raise AssertionError(f"{name} not in {db}")


def make_boot_files(fleet: Fleet) -> dict[str, bytes]:
    """What the installer copies to the boot partition: the bundle `storelink hq enroll` wrote, plus a file of
    the installer's own that provisioning must leave alone."""
    (fleet.root / "store-template.toml").write_text(TEMPLATE.format(http_port=free_port()))
    fleet.set_up()
    bundle = fleet.bundle(STORE)
    files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    assert sorted(files) == ["ca.pem", "client.key", "client.pem", "storelink.toml",
                             *[f"trust/{p.name}" for p in sorted((bundle / "trust").iterdir())]]
    return {**files, "README-installer.txt": b"not ours: provisioning must leave this in place\n"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Image]:
    assert os.geteuid() == 0, "the image test needs root (debootstrap, chroot); CI runs as root"
    assert shutil.which("debootstrap"), "debootstrap is missing: scripts/test.sh installs it"
    work = tmp_path_factory.mktemp("image")
    boot_src = work / "bootfiles"
    fleet = Fleet(work / "hq", {STORE: ["north"]})
    files = make_boot_files(fleet)
    for rel, data in files.items():
        (boot_src / rel).parent.mkdir(parents=True, exist_ok=True)
        (boot_src / rel).write_bytes(data)
    started = time.monotonic()
    result = subprocess.run([str(SCRIPT), str(work), str(boot_src)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "STORELINK_TEST_WHEELHOUSE": str(wheelhouse)})
    seconds = time.monotonic() - started
    steps = [line for line in result.stdout.splitlines() if line.startswith("==")]
    print(f"chroot-test.sh took {seconds:.0f} s: {steps}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    yield Image(work / "root", files, seconds, fleet)
    proc = work / "root/proc"
    if os.path.ismount(proc):
        subprocess.run(["umount", "-l", str(proc)], check=False)
    shutil.rmtree(work / "root", ignore_errors=True)


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_storelink_runs_inside_the_root(image: Image) -> None:
    version = image.chroot("/opt/storelink/current/bin/storelink", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"storelink {__version__}"
    check = image.chroot("/opt/storelink/current/bin/storelink", "check-config", "/etc/storelink/storelink.toml",
                         user="storelink")
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout


def test_installed_files_owners_and_modes(image: Image) -> None:
    r = image.root
    uid, gid = image.ids("storelink", "passwd"), image.ids("storelink", "group")
    assert os.access(r / "opt/storelink/current/bin/storelink", os.X_OK)  # what storelink.service's ExecStart runs
    # The release layout application updates switch: a versioned venv, releases/current, and the fixed link.
    assert os.readlink(r / "opt/storelink/current") == "releases/current"
    assert os.readlink(r / "opt/storelink/releases/current") == __version__
    marker = json.loads((r / f"opt/storelink/releases/{__version__}/.storelink-release.json").read_text())
    assert marker["version"] == __version__ and marker["schemas"]["outbox"]["version"] >= 1
    assert mode_owner(r / "opt/storelink/releases" / __version__) == (0o755, 0, 0)
    assert mode_owner(r / "opt/storelink/bin/storelink-provision") == (0o755, 0, 0)
    for unit in ("storelink.service", "storelink-provision.service", "storelink-recover.service",
                 "storelink-recover.timer", "storelink-update.path", "storelink-update.service",
                 "storelink-mark-good.service"):
        assert mode_owner(r / "usr/lib/systemd/system" / unit) == (0o644, 0, 0)
        assert (r / "usr/lib/systemd/system" / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    wants = r / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "storelink.service").is_symlink() and (wants / "storelink-provision.service").is_symlink()
    assert (wants / "storelink-update.path").is_symlink() and (wants / "storelink-mark-good.service").is_symlink()
    assert (r / "etc/rauc/system.conf").read_bytes() == (REPO / "image/rauc/system.conf").read_bytes()
    assert (r / "usr/lib/udev/rules.d/99-storelink.rules").is_file()
    assert "RuntimeWatchdogSec=15s" in (r / "etc/systemd/system.conf.d/storelink-watchdog.conf").read_text()
    assert "RequiresMountsFor=/var/lib/storelink" in (
        r / "etc/systemd/system/storelink.service.d/data-partition.conf").read_text()
    fstab = (r / "etc/fstab").read_text()
    assert fstab.count("LABEL=storelink-data /data ext4") == 1
    assert "/data/storelink /var/lib/storelink none bind" in fstab
    assert "/data/releases /opt/storelink/releases none bind" in fstab
    assert "STORELINK_VERSION=" + __version__ in (r / "etc/storelink-image").read_text()

    shell = (r / "etc/passwd").read_text().split("storelink:", 1)[1].splitlines()[0]
    assert shell.endswith(":/var/lib/storelink:/usr/sbin/nologin")
    groups = {line.split(":")[0]: line.split(":")[3].split(",") for line in (r / "etc/group").read_text().splitlines()}
    assert sorted(g for g, members in groups.items() if "storelink" in members) == ["dialout", "gpio", "input", "lp"]

    assert mode_owner(r / "etc/storelink") == (0o750, 0, gid)
    assert mode_owner(r / "var/lib/storelink") == (0o750, uid, gid)
    assert mode_owner(r / "var/lib/storelink/update") == (0o770, uid, gid)
    for boot_name in image.boot_files:
        if boot_name == "README-installer.txt":
            continue
        rel = boot_name if boot_name.startswith("trust/") or boot_name == "storelink.toml" else f"tls/{boot_name}"
        path = r / "etc/storelink" / rel
        assert mode_owner(path) == (0o640, 0, gid), rel
        assert path.read_bytes() == image.boot_files[boot_name], rel
    assert mode_owner(r / "etc/storelink/tls") == (0o750, 0, gid)
    # Nothing world-readable under /etc/storelink, and the gateway cannot rewrite its own config or keys.
    for path in (r / "etc/storelink").rglob("*"):
        assert not path.lstat().st_mode & 0o007, path
        assert path.lstat().st_uid == 0, path


def test_secrets_removed_from_the_boot_partition(image: Image) -> None:
    left = sorted(p.relative_to(image.boot).as_posix() for p in image.boot.rglob("*"))
    assert left == ["README-installer.txt"], "only the file provisioning does not know stays"
    report = (image.boot.parent / "storelink-provisioned.txt").read_text()
    assert f"storelink {__version__}" in report
    key_body = image.boot_files["client.key"].decode().splitlines()[1]
    assert key_body not in report and "PRIVATE KEY" not in report


def test_bad_config_is_reported_and_secrets_still_leave(image: Image) -> None:
    image.boot.mkdir(parents=True, exist_ok=True)
    good = image.boot_files["storelink.toml"].decode()
    (image.boot / "storelink.toml").write_text(good.replace("[mqtt]\n", "[mqtt]\nprot = 1\n", 1))
    (image.boot / "client.key").write_bytes(image.boot_files["client.key"])
    result = image.provision()
    assert result.returncode != 0
    error = (image.boot.parent / "storelink-provision-error.txt").read_text()
    assert "mqtt.prot" in error and "unknown key" in error
    assert not (image.boot / "client.key").exists() and not (image.boot / "storelink.toml").exists()
    assert not (image.boot.parent / "storelink-provisioned.txt").exists()

    # The installer fixes the config on the card and reboots: provisioning runs again and succeeds.
    (image.boot / "storelink.toml").write_bytes(image.boot_files["storelink.toml"])
    result = image.provision()
    assert result.returncode == 0, result.stderr
    assert not (image.boot.parent / "storelink-provision-error.txt").exists()
    assert (image.root / "etc/storelink/storelink.toml").read_bytes() == image.boot_files["storelink.toml"]


def test_provisioning_with_nothing_to_do_changes_nothing(image: Image) -> None:
    before = {p: p.stat().st_mtime_ns for p in (image.root / "etc/storelink").rglob("*")}
    result = image.provision()
    assert result.returncode == 0, result.stderr
    assert "nothing to provision" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in (image.root / "etc/storelink").rglob("*")}


def test_the_enrolled_store_connects_with_its_certificate(image: Image) -> None:
    """First boot done: the gateway in the image, as the storelink user, reaches head office's TLS broker."""
    fleet = image.fleet
    assert fleet is not None
    broker = fleet.broker()
    watcher = fleet.client(fleet.pki / "hq-ops.pem", fleet.pki / "hq-ops.key")
    watcher.subscribe(f"storelink/{STORE}/status")
    proc_dir = image.root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc_dir)], check=True)
    gateway = subprocess.Popen(
        ["chroot", str(image.root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "setpriv", "--reuid=storelink",
         "--regid=storelink", "--init-groups", "--", "/opt/storelink/current/bin/storelink", "run", "--config",
         "/etc/storelink/storelink.toml"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def online() -> bool:
            assert gateway.poll() is None, gateway.communicate()[0][-3000:]
            births = [json.loads(p) for p in watcher.got(f"storelink/{STORE}/status") if p]
            return any(b.get("state") == "online" and b.get("store_id") == STORE for b in births)

        wait_for(online, 60, what="the store's birth message at head office")
    finally:
        gateway.terminate()
        try:
            out = gateway.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            gateway.kill()
            out = gateway.communicate()[0]
        subprocess.run(["umount", "-l", str(proc_dir)], check=False)
        watcher.close()
        broker.stop()
    assert "uplink connected" in out, out[-3000:]
