"""A config that uses a driver whose extra is not installed is refused with one line naming the extra and the pip
command, by `storelink check-config` and by `storelink run`.

The device libraries are made unimportable in the subprocess the way a store without the extra has them: a
sitecustomize on PYTHONPATH wraps the path finder so it finds no `evdev`, `gpiozero`, `escpos` or `serial`
(importlib.util.find_spec returns None, `import evdev` raises ModuleNotFoundError), while the same config passes in
this venv, which has every extra.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers import STORELINK, write_config

BLOCKER = '''
import os, sys
from importlib.machinery import PathFinder

BLOCKED = set(os.environ.get("STORELINK_TEST_MISSING", "").split(","))


class _WithoutExtras(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_WithoutExtras if f is PathFinder else f for f in sys.meta_path]
'''

DEVICES = '''
[[devices]]
id = "scanner-1"
driver = "serial_scanner"
port = "/dev/ttyUSB0"
[[devices]]
id = "till-1"
driver = "till_tcp"
[[devices]]
id = "scanner-2"
driver = "hid_scanner"
name = "Honeywell*"
[[devices]]
id = "mat-1"
driver = "kiosk_mat"
pin = 17
[[devices]]
id = "receipt-1"
driver = "escpos_printer"
host = "192.0.2.7"
[[devices]]
id = "labels-1"
driver = "zpl_printer"
connection = "serial"
serial_port = "/dev/ttyUSB1"
[[devices]]
id = "labels-2"
driver = "zpl_printer"
host = "192.0.2.8"
'''


def _without(tmp_path: Path, modules: str) -> dict[str, str]:
    site = tmp_path / "without-extras"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(site), "STORELINK_TEST_MISSING": modules}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORELINK, *args], capture_output=True, text=True, timeout=60, env=env)


def test_check_config_names_the_missing_extra_and_the_pip_command(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "store.toml", "store-0042", 1883, 8080, DEVICES)
    assert _run(["check-config", str(cfg)]).returncode == 0  # every extra is installed here

    env = _without(tmp_path, "evdev,gpiozero,escpos,serial")
    probe = subprocess.run([str(Path(STORELINK).parent / "python"), "-c", "import evdev"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert "ModuleNotFoundError: No module named 'evdev'" in probe.stderr  # the extra really is missing
    res = _run(["check-config", str(cfg)], env)
    assert res.returncode == 1, res
    problems = [line.strip() for line in res.stderr.splitlines()[1:]]
    assert problems == [
        "- devices[0] (id='scanner-1').driver: serial_scanner needs the extra storelink[scanners] "
        "(pip install 'storelink[scanners]'): module serial is not installed",
        "- devices[2] (id='scanner-2').driver: hid_scanner needs the extra storelink[hid] "
        "(pip install 'storelink[hid]'): module evdev is not installed",
        "- devices[3] (id='mat-1').driver: kiosk_mat needs the extra storelink[gpio] "
        "(pip install 'storelink[gpio]'): module gpiozero is not installed",
        "- devices[4] (id='receipt-1').driver: escpos_printer needs the extra storelink[escpos] "
        "(pip install 'storelink[escpos]'): module escpos is not installed",
        "- devices[5] (id='labels-1').driver: zpl_printer needs the extra storelink[scanners] "
        "(pip install 'storelink[scanners]'): module serial is not installed",
    ], res.stderr  # till_tcp and the zpl printer on TCP need no extra


def test_run_refuses_the_config_in_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "store.toml", "store-0042", 1883, 8080,
                       '[[devices]]\nid = "scanner-2"\ndriver = "hid_scanner"\nname = "Honeywell*"\n'
                       'keymap_overrides = { KEY_102ND = ["<", ">"] }\n')
    res = _run(["run", "--config", str(cfg)], _without(tmp_path, "evdev"))
    assert res.returncode == 2, res
    assert ("devices[0] (id='scanner-2').driver: hid_scanner needs the extra storelink[hid] "
            "(pip install 'storelink[hid]'): module evdev is not installed") in res.stderr
    assert "Traceback" not in res.stderr
