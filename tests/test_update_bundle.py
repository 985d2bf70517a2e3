"""Release bundles: built from this tree, signed, refused for every kind of tampering before anything is
installed; downloaded over real HTTPS (a test CA on loopback) with an interrupted transfer resumed."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.remote.signing import KeyPair, keygen, sign
from storelink.system.schema import SCHEMAS, Schema, SchemaTooNew, ensure_schema, rollback_problems, schemas_as_dict
from storelink.update.download import DownloadError, download
from storelink.update.manifest import MANIFEST, BundleError, file_sha256, verify_bundle
from tests.release_helpers import HttpsFileServer, ReleaseKit
from tests.tls_certs import make_pki


def rewrite(bundle: Path, out: Path, *, manifest: dict | None = None, wheel_edit: str | None = None,
            extra: tuple[str, bytes] | None = None, drop: str | None = None) -> Path:
    """A copy of ``bundle`` with one thing changed (the tampering a hostile server or a broken build does)."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == MANIFEST and manifest is not None:
                data = json.dumps(manifest).encode()
            if member.name == f"wheels/{wheel_edit}":
                data = data[:-10] + b"x" * 10
            if member.name == f"wheels/{drop}":
                continue
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        if extra:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            dst.addfile(info, io.BytesIO(extra[1]))
    return out


def signed_manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as tar:
        return json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]


def test_bundle_is_signed_complete_and_installable_by_pip(release_kit: ReleaseKit, hq_key: KeyPair,
                                                          tmp_path: Path) -> None:
    bundle = release_kit.bundle("1.0.0")
    verified = verify_bundle(bundle, [hq_key.public_b64], expected_version="1.0.0", extract_to=tmp_path / "x")
    m = verified.manifest
    assert m.version == "1.0.0" and m.requirement == "storelink==1.0.0"
    assert {w.file.split("-")[0] for w in m.wheels} >= {"storelink", "paho_mqtt", "pydantic", "cryptography"}
    assert m.schemas["outbox"].version == SCHEMAS["outbox"].version
    for w in m.wheels:
        assert hashlib.sha256((tmp_path / "x/wheels" / w.file).read_bytes()).hexdigest() == w.sha256


@pytest.mark.parametrize("tamper, reason", [
    ("wheel", "sha256"),
    ("signature", "bad signature"),
    ("unknown_key", "unknown key_id"),
    ("unsigned", "not signed"),
    ("extra_file", "unexpected file"),
    ("missing_wheel", "missing"),
    ("path_trick", "unexpected file"),
])
def test_tampered_bundles_are_refused_and_leave_nothing(release_kit: ReleaseKit, hq_key: KeyPair, tmp_path: Path,
                                                        tamper: str, reason: str) -> None:
    bundle = release_kit.bundle("1.0.0")
    env = signed_manifest(bundle)
    wheel = next(w["file"] for w in env["payload"]["wheels"] if w["file"].startswith("paho"))
    out = tmp_path / "bad.bundle"
    if tamper == "wheel":
        rewrite(bundle, out, wheel_edit=wheel)
    elif tamper == "signature":
        rewrite(bundle, out, manifest={**env, "payload": {**env["payload"], "notes": "changed after signing"}})
    elif tamper == "unknown_key":
        rewrite(bundle, out, manifest=sign(env["payload"], keygen().private_b64))
    elif tamper == "unsigned":
        rewrite(bundle, out, manifest=env["payload"])
    elif tamper == "extra_file":
        rewrite(bundle, out, extra=("wheels/evil-1.0-py3-none-any.whl", b"PK"))
    elif tamper == "missing_wheel":
        rewrite(bundle, out, drop=wheel)
    else:
        rewrite(bundle, out, extra=("wheels/../../etc/cron.d/x", b"* * * * * root id\n"))
    target = tmp_path / "extract"
    with pytest.raises(BundleError) as err:
        verify_bundle(out, [hq_key.public_b64], extract_to=target)
    assert reason in err.value.reason, err.value.reason
    assert not target.exists(), "a refused bundle leaves nothing behind"
    assert not (tmp_path.parent / "etc").exists()


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[HttpsFileServer, dict[str, Path]]]:
    pki = make_pki(tmp_path)
    (tmp_path / "www").mkdir()
    server = HttpsFileServer(tmp_path / "www", pki)
    yield server, pki
    server.close()


def test_download_resumes_after_the_connection_drops(https: tuple[HttpsFileServer, dict[str, Path]],
                                                     release_kit: ReleaseKit, tmp_path: Path) -> None:
    server, pki = https
    bundle = release_kit.bundle("1.0.0")
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    size, digest = bundle.stat().st_size, file_sha256(bundle)
    server.cut_after = [size // 3, size // 3]  # two interrupted transfers, then a whole one
    seen: list[int] = []
    dest = download(server.url(bundle.name), tmp_path / "dl" / bundle.name, sha256=digest, size=size,
                    ca=pki["ca"], progress=lambda have, _size: seen.append(have), backoff=0.05)
    assert file_sha256(dest) == digest
    ranges = [r["range"] for r in server.requests]
    assert ranges[0] == "" and ranges[1] == f"bytes={size // 3}-" and ranges[2] == f"bytes={2 * (size // 3)}-"
    assert len(server.requests) == 3, "each retry continued where the last stopped"
    assert not list(dest.parent.glob("*.part*"))


def test_download_refuses_untrusted_tls_wrong_content_and_plain_http(
        https: tuple[HttpsFileServer, dict[str, Path]], release_kit: ReleaseKit, tmp_path: Path) -> None:
    server, pki = https
    bundle = release_kit.bundle("1.0.0")
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    size, digest = bundle.stat().st_size, file_sha256(bundle)
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):  # the system CAs do not know the test CA
        download(server.url(bundle.name), tmp_path / "a.bundle", sha256=digest, size=size, attempts=1)
    with pytest.raises(DownloadError, match="expected"):  # the announced hash is of another file
        download(server.url(bundle.name), tmp_path / "b.bundle", sha256="0" * 64, size=size, ca=pki["ca"],
                 attempts=2, backoff=0.01)
    assert not (tmp_path / "b.bundle").exists() and not (tmp_path / "b.bundle.part").exists()
    with pytest.raises(DownloadError, match="https"):
        download("http://localhost/x", tmp_path / "c.bundle", sha256=digest, size=size)
    server.ranges = False  # a server without Range support: the download starts over and still completes
    server.cut_after = [size // 2]
    dest = download(server.url(bundle.name), tmp_path / "d.bundle", sha256=digest, size=size, ca=pki["ca"],
                    backoff=0.01)
    assert file_sha256(dest) == digest


def test_schema_versions_migrate_forward_and_refuse_what_an_old_release_cannot_read(tmp_path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)

    def create(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE IF NOT EXISTS t(a INTEGER)")

    assert ensure_schema(conn, "outbox", create) == 1
    v2 = {"outbox": Schema(version=2, readable_by=1, migrates_from=1)}
    migrations = {2: lambda c: c.execute("ALTER TABLE t ADD COLUMN b TEXT")}
    assert ensure_schema(conn, "outbox", create, migrations, schemas=v2) == 2
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["a", "b"]
    assert ensure_schema(conn, "outbox", create) == 2, "release 1 still opens what release 2 wrote (readable_by 1)"
    v3 = {"outbox": Schema(version=3, readable_by=3, migrates_from=2)}
    assert ensure_schema(conn, "outbox", create, {3: lambda c: c.execute("ALTER TABLE t RENAME a TO c")},
                         schemas=v3) == 3
    with pytest.raises(SchemaTooNew, match="readable only by schema 3"):
        ensure_schema(conn, "outbox", create)
    assert rollback_problems(schemas_as_dict(), schemas_as_dict(v3)) == [
        "outbox: schema 3 is readable only by schema 3+, the running release has 1"]
    assert rollback_problems(schemas_as_dict(), schemas_as_dict(v2)) == []


def test_a_partial_download_is_resumed_by_the_next_process(https: tuple[HttpsFileServer, dict[str, Path]],
                                                           release_kit: ReleaseKit, tmp_path: Path) -> None:
    server, pki = https
    bundle = release_kit.bundle("1.0.0")
    (server.root / bundle.name).write_bytes(bundle.read_bytes())
    size, digest = bundle.stat().st_size, file_sha256(bundle)
    dest = tmp_path / "dl" / bundle.name
    server.cut_after = [size // 2]
    with pytest.raises(DownloadError, match="connection closed"):  # the gateway stops here (a restart, a kill)
        download(server.url(bundle.name), dest, sha256=digest, size=size, ca=pki["ca"], attempts=1)
    assert dest.with_name(dest.name + ".part").stat().st_size == size // 2
    download(server.url(bundle.name), dest, sha256=digest, size=size, ca=pki["ca"])
    assert server.requests[-1]["range"] == f"bytes={size // 2}-" and file_sha256(dest) == digest
