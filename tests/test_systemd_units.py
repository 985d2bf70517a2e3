"""The unit files, sysusers/tmpfiles snippets and udev rules, checked with systemd's own tools.

`systemd-analyze verify` exits 0 on unknown or misspelt keys and only prints a warning, so every test here reads
the output and fails on any line at all. It also fails when the ExecStart binary is missing, so the units are
verified in a temporary copy whose ExecStart points at this checkout's real `storelink` (the image test checks
that /opt/storelink/current/bin/storelink exists in the image root).
"""

from __future__ import annotations

import grp
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS_DIR = ROOT / "systemd"
UNITS = ["storelink.service", "storelink-recover.service", "storelink-recover.timer", "storelink-provision.service",
         "storelink-update.path", "storelink-update.service", "storelink-mark-good.service"]
INSTALLED_STORELINK = "/opt/storelink/current/bin/storelink"
LOCAL_STORELINK = str(Path(sys.executable).parent / "storelink")
INSTALLED_PROVISION = "/opt/storelink/bin/storelink-provision"
LOCAL_PROVISION = str(ROOT / "image/provision/storelink-provision")
MAX_EXPOSURE = 2.5
# The root oneshots (first-boot provisioning partitions the card and installs secrets as root; the updater writes
# the releases and restarts the gateway): exactly what each needs, which scores higher than a daemon with nothing.
MAX_EXPOSURE_ROOT_ONESHOT = 5.0


def tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if Path(p).exists()), None)
    assert path, f"{name} is missing: scripts/test.sh installs it from scripts/apt-packages.txt"
    return path


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value, in order (systemd keys repeat: DeviceAllow=, ExecStart=...)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    assert Path(LOCAL_STORELINK).exists(), LOCAL_STORELINK
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        text = text.replace(INSTALLED_STORELINK, LOCAL_STORELINK).replace(INSTALLED_PROVISION, LOCAL_PROVISION)
        (tmp_path / name).write_text(text)
    return tmp_path


def verify(directory: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", *[f"./{n}" for n in names]],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )


def test_units_verify_without_a_single_warning(unit_copy: Path) -> None:
    result = verify(unit_copy, UNITS)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


def test_units_link_no_man_pages() -> None:
    # `verify` runs man(1) for every man: link and warns where man-db is absent (a minimal Debian, the
    # appliance): the check above would then depend on what the machine has, not on the units.
    for name in UNITS:
        docs = " ".join(unit_entries(UNITS_DIR / name).get("Unit.Documentation", []))
        assert "man:" not in docs, f"{name}: Documentation= links a man page: {docs}"


def test_verify_check_catches_a_misspelt_key(unit_copy: Path) -> None:
    # The check above is only worth something if a typo makes it fail: systemd-analyze still exits 0 here.
    unit = unit_copy / "storelink.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchDogSec="))
    result = verify(unit_copy, ["storelink.service"])
    assert "WatchDogSec" in result.stdout + result.stderr


def test_verify_fails_when_execstart_is_missing(tmp_path: Path) -> None:
    shutil.copy(UNITS_DIR / "storelink.service", tmp_path)
    text = (tmp_path / "storelink.service").read_text()
    (tmp_path / "storelink.service").write_text(text.replace(INSTALLED_STORELINK, str(tmp_path / "nope")))
    assert verify(tmp_path, ["storelink.service"]).returncode != 0


@pytest.mark.parametrize("unit, limit", [
    ("storelink.service", MAX_EXPOSURE), ("storelink-recover.service", MAX_EXPOSURE),
    ("storelink-provision.service", MAX_EXPOSURE_ROOT_ONESHOT), ("storelink-update.service", MAX_EXPOSURE_ROOT_ONESHOT),
    ("storelink-mark-good.service", MAX_EXPOSURE_ROOT_ONESHOT),
])
def test_security_exposure(unit_copy: Path, unit: str, limit: float) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", f"./{unit}"],
        cwd=unit_copy, capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    exposure = float(m.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= limit, result.stdout


def test_service_contract() -> None:
    e = unit_entries(UNITS_DIR / "storelink.service")

    def one(key: str) -> str:
        values = e.get(key, [])
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.ExecStart") == f"{INSTALLED_STORELINK} run --config /etc/storelink/storelink.toml"
    assert one("Service.Restart") == "always"
    assert one("Service.WatchdogSec") == "30s"
    assert one("Service.User") == "storelink"
    assert one("Service.StateDirectory") == "storelink"
    assert one("Service.ConfigurationDirectory") == "storelink"
    assert one("Service.WorkingDirectory") == "/run/storelink"
    assert one("Service.RuntimeDirectory") == "storelink"
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.NoNewPrivileges") == "yes"
    assert one("Service.CapabilityBoundingSet") == ""
    assert one("Service.DevicePolicy") == "closed"
    assert set(e["Service.DeviceAllow"]) >= {"char-ttyUSB rw", "char-ttyACM rw", "char-input rw",
                                             "char-gpiochip rw", "char-usb rw"}
    assert e["Service.SystemCallFilter"][0] == "@system-service"
    assert "AF_PACKET" not in one("Service.RestrictAddressFamilies")
    assert one("Unit.StartLimitBurst") and one("Unit.StartLimitIntervalSec")
    assert one("Unit.OnFailure") == "storelink-recover.timer"
    assert one("Install.WantedBy") == "multi-user.target"
    assert "storelink-provision.service" in one("Unit.After"), "config is moved into place before the start"
    # Groups come from sysusers memberships; SupplementaryGroups= would fail the start where one is missing.
    assert "Service.SupplementaryGroups" not in e


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for src, dst in (("storelink.sysusers", "usr/lib/sysusers.d"), ("storelink.tmpfiles", "usr/lib/tmpfiles.d")):
        (tmp_path / dst).mkdir(parents=True)
        shutil.copy(UNITS_DIR / src, tmp_path / dst / "storelink.conf")
    for cmd in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        result = subprocess.run([tool(cmd[0]), *cmd[1:], f"--root={tmp_path}"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["storelink"]
    assert user[5:] == ["/var/lib/storelink", "/usr/sbin/nologin"]
    assert int(user[2]) < 1000, "a system user"
    member_of = sorted(name for name, g in groups.items() if "storelink" in g[3].split(","))
    assert member_of == ["dialout", "gpio", "input", "lp"]
    state = (tmp_path / "var/lib/storelink").stat()
    assert (state.st_uid, state.st_mode & 0o777) == (int(user[2]), 0o750)
    conf = (tmp_path / "etc/storelink").stat()
    assert (conf.st_uid, conf.st_gid, conf.st_mode & 0o777) == (0, int(groups["storelink"][2]), 0o750)


def test_udev_rules_parse_cleanly(tmp_path: Path) -> None:
    """udevadm (systemd 252 has no `udevadm verify`) parses every rules file in /etc/udev/rules.d when testing a
    device: run it in a private mount namespace where that directory holds only our file."""
    rules = tmp_path / "rules.d"
    rules.mkdir()
    shutil.copy(UNITS_DIR / "99-storelink.rules", rules)
    (rules / "98-canary.rules").write_text('SUBSYSTEM=="tty", BOGUS{x}=="y", GROUP="dialout"\n')
    script = f"mount --bind {rules} /etc/udev/rules.d && exec {tool('udevadm')} test /sys/class/tty/tty0"
    result = subprocess.run([tool("unshare"), "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert "Reading rules file: /etc/udev/rules.d/99-storelink.rules" in out, out[-3000:]
    assert "98-canary.rules:1 Invalid key 'BOGUS'" in out, "the canary proves parse errors are reported"
    problems = [
        line for line in out.splitlines()
        if "99-storelink.rules" in line and not line.startswith("Reading rules file")
        # The gpio group exists on Raspberry Pi OS (and sysusers creates it); a CI host may lack it.
        and not ("Unknown group 'gpio'" in line and not _group_exists("gpio"))
    ]
    assert not problems, problems


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [ROOT / "image/provision/storelink-provision", *sorted((ROOT / "image").glob("*.sh")),
               *sorted((ROOT / "scripts").glob("*.sh")),
               *sorted((ROOT / "image/stage-storelink").rglob("*.sh"))]
    result = subprocess.run([tool("shellcheck"), "--severity=warning", *map(str, scripts)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_root_oneshots_get_exactly_what_they_need() -> None:
    """Provisioning and the updater run as root: no network (loopback only for the updater, which reads the
    gateway's status API), no home, a syscall filter, and write access to the paths they change, nothing else."""
    prov = unit_entries(UNITS_DIR / "storelink-provision.service")
    assert prov["Service.PrivateNetwork"] == ["yes"] and prov["Service.IPAddressDeny"] == ["any"]
    assert prov["Service.RestrictAddressFamilies"] == ["AF_UNIX"]
    assert prov["Service.ProtectHome"] == ["yes"] and prov["Service.ProtectSystem"] == ["strict"]
    assert prov["Service.DevicePolicy"] == ["closed"]
    assert sorted(prov["Service.DeviceAllow"]) == ["block-blkext rw", "block-mmc rw", "block-sd rw"]
    assert prov["Service.ReadWritePaths"] == ["/etc/storelink /boot/firmware /var/lib/storelink -/media/root-ro -/data"]
    assert prov["Service.SystemCallFilter"][0].startswith("@system-service")
    caps = set(prov["Service.CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN",
                    "CAP_SYS_RESOURCE"}
    for name in ("storelink-update.service", "storelink-mark-good.service"):
        e = unit_entries(UNITS_DIR / name)
        assert e["Service.CapabilityBoundingSet"] == [""], name
        assert (e["Service.User"], e["Service.Group"]) == (["root"], ["storelink"]), name
        assert e["Service.IPAddressDeny"] == ["any"] and e["Service.IPAddressAllow"] == ["localhost"], name
        assert e["Service.PrivateDevices"] == ["yes"] and e["Service.ProtectHome"] == ["yes"], name
        assert e["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"], name
    upd = unit_entries(UNITS_DIR / "storelink-update.service")
    assert upd["Service.ReadWritePaths"] == ["/opt/storelink/releases /var/lib/storelink/update"]
    assert upd["Service.ExecStart"] == [f"{INSTALLED_STORELINK} update apply "
                                        "--config /etc/storelink/storelink.toml"]
    assert "ReadWritePaths" not in " ".join(unit_entries(UNITS_DIR / "storelink-mark-good.service"))
    path = unit_entries(UNITS_DIR / "storelink-update.path")
    assert path["Path.PathExists"] == ["/var/lib/storelink/update/pending.json",
                                       "/var/lib/storelink/update/trial.json"]
    assert path["Path.Unit"] == ["storelink-update.service"]
