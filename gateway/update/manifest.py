"""The release bundle: one tar file with a signed manifest and a wheelhouse, checked before anything is installed.

Layout of ``storelink-<version>.bundle`` (an uncompressed tar: wheels are zip files already)::

    manifest.json        the head-office signing envelope (storelink.remote.signing) around a Manifest
    wheels/<file>.whl    every wheel the release needs, for the appliance's platform, nothing else

``verify_bundle`` reads the manifest first, checks its signature against ``[trust] public_keys`` and then reads
every other member, refusing anything the manifest does not list, anything missing, any size or SHA-256 that
differs, links, devices and path tricks. With ``extract_to`` it writes the wheels while hashing them, into a
directory that is deleted again when any check fails, so a refused bundle leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storelink.remote.signing import SignatureError, TrustedKeys, verify
from storelink.update.models import SHA256_RE, VERSION_RE

MANIFEST = "manifest.json"
MAX_MANIFEST = 1024 * 1024
# dist-version(-build)?-python-abi-platform.whl (PEP 427); dist names in wheel file names use underscores.
WHEEL_RE = re.compile(r"^(?P<dist>[A-Za-z0-9_.]+)-(?P<ver>[A-Za-z0-9_.!+]+)(-[0-9][^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


class BundleError(Exception):
    """The bundle must not be installed. ``reason`` is short and safe to report to head office."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class WheelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(pattern=WHEEL_RE.pattern)
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(gt=0)


class SchemaEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    readable_by: int = Field(ge=1)
    migrates_from: int = Field(ge=1)


class Manifest(BaseModel):
    """What head office signs. ``schemas`` is the release's storelink.system.schema.SCHEMAS."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["storelink.release"]
    format: Literal[1]
    version: str = Field(pattern=VERSION_RE)
    created_at: str
    python: str = Field(pattern=r"^3\.[0-9]+$", description="major.minor the wheels are built for")
    machine: str = Field(description="platform.machine() of the appliance: aarch64, x86_64")
    requirement: str = Field(description='what is installed, e.g. "storelink[all]==0.2.0"')
    wheels: list[WheelEntry] = Field(min_length=1)
    schemas: dict[str, SchemaEntry]
    notes: str = ""

    def wheel_map(self) -> dict[str, WheelEntry]:
        return {w.file: w for w in self.wheels}


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_sha256: str  # of the signed manifest document: identifies exactly what was installed
    wheels_dir: Path | None  # where the wheels were extracted (None: verified only)


def requirements_text(manifest: Manifest) -> str:
    """A pip requirements file pinning every wheel by version and hash (for ``--require-hashes``)."""
    pins: dict[tuple[str, str], list[str]] = {}
    for w in manifest.wheels:
        m = WHEEL_RE.match(w.file)
        assert m is not None  # the model's pattern checked it
        pins.setdefault((m["dist"], m["ver"]), []).append(w.sha256)
    lines = [f"{dist}=={ver} " + " ".join(f"--hash=sha256:{h}" for h in hashes)
             for (dist, ver), hashes in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def check_platform(manifest: Manifest, python: str | None = None, machine: str | None = None) -> None:
    want_py = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    want_machine = machine or platform.machine()
    if manifest.python != want_py or manifest.machine != want_machine:
        raise BundleError(f"release {manifest.version} is built for Python {manifest.python} on {manifest.machine}; "
                          f"this store has Python {want_py} on {want_machine}")


def _read_manifest(tar: tarfile.TarFile, trusted: TrustedKeys) -> tuple[Manifest, str]:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise BundleError(f"no {MANIFEST} in the bundle") from None
    if not member.isfile() or member.size > MAX_MANIFEST:
        raise BundleError(f"{MANIFEST} is not a regular file under {MAX_MANIFEST} bytes")
    f = tar.extractfile(member)
    assert f is not None
    raw = f.read()
    try:
        payload = verify(raw, trusted)
    except SignatureError as err:
        raise BundleError(f"manifest signature: {err.reason}") from None
    try:
        manifest = Manifest.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        raise BundleError(f"manifest: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return manifest, hashlib.sha256(raw).hexdigest()


def _copy_hashed(src: IO[bytes], dest: IO[bytes] | None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
        if dest is not None:
            dest.write(chunk)
    return digest.hexdigest(), size


def verify_bundle(path: Path, trusted: TrustedKeys, *, expected_version: str | None = None,
                  extract_to: Path | None = None) -> VerifiedBundle:
    """Check the signature and every hash; optionally extract the wheels into ``extract_to/wheels``.

    Blocking (reads the whole file). Raises BundleError with the first problem found.
    """
    if extract_to is not None:
        shutil.rmtree(extract_to, ignore_errors=True)
        (extract_to / "wheels").mkdir(parents=True, mode=0o755)
    try:
        try:
            tar = tarfile.open(path, "r:")
        except (OSError, tarfile.TarError) as err:
            raise BundleError(f"not a readable bundle: {err}") from None
        with tar:
            manifest, manifest_sha = _read_manifest(tar, trusted)
            if expected_version is not None and manifest.version != expected_version:
                raise BundleError(f"the bundle is release {manifest.version}, announced as {expected_version}")
            expected = manifest.wheel_map()
            seen: set[str] = set()
            for member in tar:
                if member.name == MANIFEST:
                    continue
                name = member.name.removeprefix("wheels/")
                if not member.name.startswith("wheels/") or "/" in name or name not in expected:
                    raise BundleError(f"unexpected file in the bundle: {member.name[:100]!r}")
                if not member.isfile() or name in seen:
                    raise BundleError(f"{member.name} is not a single regular file")
                seen.add(name)
                src = tar.extractfile(member)
                assert src is not None
                out = (extract_to / "wheels" / name).open("wb") if extract_to is not None else None
                try:
                    digest, size = _copy_hashed(src, out)
                finally:
                    if out is not None:
                        out.close()
                want = expected[name]
                if size != want.size or digest != want.sha256:
                    raise BundleError(f"{name}: sha256 {digest[:16]}... size {size} does not match the signed "
                                      f"manifest ({want.sha256[:16]}... size {want.size})")
            missing = sorted(set(expected) - seen)
            if missing:
                raise BundleError(f"wheels listed in the manifest are missing: {', '.join(missing[:5])}")
    except BaseException:
        if extract_to is not None:
            shutil.rmtree(extract_to, ignore_errors=True)
        raise
    return VerifiedBundle(manifest, manifest_sha, extract_to / "wheels" if extract_to is not None else None)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return _copy_hashed(f, None)[0]


def write_bundle(out: Path, signed_manifest: dict[str, Any], wheels: list[Path]) -> None:
    """Write a bundle (head office's side: storelink.hq.release). Members in a fixed order, fixed metadata."""
    raw = json.dumps(signed_manifest, indent=1, sort_keys=True).encode()
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(raw), 0o644, 0
        tar.addfile(info, io.BytesIO(raw))
        for wheel in sorted(wheels, key=lambda p: p.name):
            info = tar.gettarinfo(str(wheel), arcname=f"wheels/{wheel.name}")
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            with wheel.open("rb") as f:
                tar.addfile(info, f)
    tmp.replace(out)
