"""Installed releases: one venv per version under ``<root>/opt/storelink/releases/``, and the ``current`` switch.

    <root>/opt/storelink/releases/0.2.0/        a venv, created at its final path (scripts' #! lines point here)
    <root>/opt/storelink/releases/0.2.0/.storelink-release.json   written last: the install is complete
    <root>/opt/storelink/releases/current -> 0.2.0       the one switch (a relative symlink, replaced atomically)
    <root>/opt/storelink/current -> releases/current     what the units run (fixed, made by the image)

The switch is a new symlink renamed over the old one (``rename(2)`` is atomic) followed by an fsync of the
directory: after a power cut ``current`` names the old or the new release, never nothing. On the appliance
``releases/`` is on the data partition (image/README.md), so an application update survives a reboot.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from storelink.system.files import fsync_dir, write_atomically
from storelink.update.manifest import BundleError, Manifest, requirements_text

log = logging.getLogger(__name__)
MARKER = ".storelink-release.json"


class InstallError(Exception):
    pass


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.replace("+", ".").split("."))


class Releases:
    def __init__(self, root: Path = Path("/")):
        self.root = root
        self.base = root / "opt/storelink"
        self.dir = self.base / "releases"
        self.switch = self.dir / "current"

    # -- reading ------------------------------------------------------------------------------------------
    def current(self) -> str | None:
        try:
            return os.readlink(self.switch)
        except OSError:
            return None

    def path(self, version: str) -> Path:
        if "/" in version or version in ("", ".", "..", "current"):
            raise InstallError(f"not a release version: {version!r}")
        return self.dir / version

    def is_installed(self, version: str) -> bool:
        return (self.path(version) / MARKER).is_file()

    def info(self, version: str) -> dict[str, object]:
        try:
            data = json.loads((self.path(version) / MARKER).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def installed(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted((p.name for p in self.dir.iterdir() if (p / MARKER).is_file()), key=_version_key)

    def storelink(self, version: str | None = None) -> Path:
        """The console script of a release (default: the current one, through the switch)."""
        return (self.path(version) if version else self.switch) / "bin/storelink"

    # -- installing ---------------------------------------------------------------------------------------
    def install(self, manifest: Manifest, manifest_sha256: str, wheels: Path, *, python: str = "/usr/bin/python3",
                pip_python: str | None = None) -> Path:
        """A new venv for the release, from exactly the verified wheels (``pip --no-index --require-hashes``)."""
        target = self.path(manifest.version)
        if self.is_installed(manifest.version):
            if self.info(manifest.version).get("manifest_sha256") == manifest_sha256:
                return target
            raise InstallError(f"release {manifest.version} is installed from a different bundle; refusing to mix")
        if self.current() == manifest.version:
            raise InstallError(f"release {manifest.version} is running but incomplete on disk")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.rmtree(target, ignore_errors=True)  # an earlier, interrupted attempt
        started = time.monotonic()
        try:
            self._run([python, "-m", "venv", "--without-pip", str(target)], "venv")
            reqs = wheels.parent / "requirements.txt"
            reqs.write_text(requirements_text(manifest))
            # pip of the updater's own release installs into the new venv (pip >= 22.3: --python). No config
            # file, no index, no cache: exactly the wheels head office signed, each checked against its hash.
            self._run([pip_python or sys.executable, "-m", "pip", "--python", str(target / "bin/python"),
                       "install", "--quiet", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
                       "--require-hashes", "--only-binary", ":all:", "--find-links", str(wheels),
                       "-r", str(reqs)], "pip install")
            self._check_version(target, manifest.version)
            write_atomically(target / MARKER, json.dumps({
                "version": manifest.version, "manifest_sha256": manifest_sha256, "installed_at": time.time(),
                "requirement": manifest.requirement,
                "schemas": {k: v.model_dump() for k, v in manifest.schemas.items()}}, indent=1).encode(), 0o644)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        log.info("release %s installed in %s (%.1f s)", manifest.version, target, time.monotonic() - started)
        return target

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PIP_CONFIG_FILE": os.devnull, "LANG": "C.UTF-8",
               "PYTHONNOUSERSITE": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise InstallError(f"{what} failed ({result.returncode}): {' | '.join(tail)[:400]}")

    @staticmethod
    def _check_version(target: Path, version: str) -> None:
        result = subprocess.run([str(target / "bin/storelink"), "--version"], capture_output=True, text=True,
                                timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        if result.returncode != 0 or result.stdout.strip() != f"storelink {version}":
            raise BundleError(f"the installed release reports {result.stdout.strip() or result.stderr[-200:]!r}, "
                              f"not storelink {version}")

    # -- switching ----------------------------------------------------------------------------------------
    def switch_to(self, version: str) -> str | None:
        """Point ``current`` at an installed release; returns the one it pointed at before."""
        if not self.is_installed(version):
            raise InstallError(f"release {version} is not installed")
        before = self.current()
        tmp = self.dir / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(version, tmp)
        os.replace(tmp, self.switch)
        fsync_dir(self.dir)
        log.info("current release: %s (was %s)", version, before)
        return before

    def remove_old(self, keep: int, protect: set[str]) -> list[str]:
        """Delete the oldest installed releases beyond ``keep``, never the current one or ``protect``."""
        current = self.current()
        removable = [v for v in self.installed() if v != current and v not in protect]
        extra = len(self.installed()) - keep
        gone = removable[:max(0, extra)]
        for version in gone:
            shutil.rmtree(self.path(version), ignore_errors=True)
        return gone
