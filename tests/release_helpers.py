"""Real releases for the update tests: wheels built from this tree with a bumped version, signed bundles, an
HTTPS file server with Range support (and a switch that cuts a download half-way), and the supervisor process
that plays systemd's role.

Building costs: the dependency wheelhouse is built once and cached across sessions in $STORELINK_TEST_CACHE
(default /var/cache/storelink-test; keyed by the dependencies, the lock and the interpreter); each storelink
wheel (one per test release) is built once per session, about 4 s each.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from storelink.hq.release import build_release
from storelink.remote.signing import KeyPair

REPO = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip"]
SOURCE_PARTS = ("README.md", "pyproject.toml", "gateway", "drivers", "scripts")
# A release whose outbox schema the previous release could not read (a rollback past it is impossible).
IRREVERSIBLE = {"gateway/system/schema.py": (
    '"outbox": Schema(version=1, readable_by=1, migrates_from=1)',
    '"outbox": Schema(version=2, readable_by=2, migrates_from=1)')}


def _cache_root() -> Path:
    root = Path(os.environ.get("STORELINK_TEST_CACHE", "/var/cache/storelink-test"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path("/tmp/storelink-test-cache")


def deps_wheelhouse() -> Path:
    """The runtime dependencies (no extras) as wheels, at the versions of image/requirements.lock."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = (REPO / "image/requirements.lock").read_text()
    key = hashlib.sha256(json.dumps([project["dependencies"], lock, sys.version, platform.machine()]).encode()
                         ).hexdigest()[:12]
    out = _cache_root() / f"release-deps-{key}"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    reqs = tmp / "requirements.txt"
    tmp.mkdir(parents=True)
    reqs.write_text("\n".join(project["dependencies"]) + "\n")
    subprocess.run([*PIP, "wheel", "--quiet", "--wheel-dir", str(tmp), "-c", str(REPO / "image/requirements.lock"),
                    "-r", str(reqs)], check=True, capture_output=True, timeout=600)
    reqs.unlink()
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def storelink_wheel(version: str, out: Path, patches: dict[str, tuple[str, str]] | None = None) -> Path:
    """A storelink wheel of this tree as release ``version``; ``patches`` {file: (old, new)} break it on purpose."""
    src = out / f"src-{version}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for part in SOURCE_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, src / part)
    for rel, name in (("pyproject.toml", "version"), ("gateway/__init__.py", "__version__")):
        text, n = re.subn(rf'(?m)^{name} = ".*"$', f'{name} = "{version}"', (src / rel).read_text())
        assert n == 1, rel
        (src / rel).write_text(text)
    for rel, (old, new) in (patches or {}).items():
        text = (src / rel).read_text()
        assert old in text, f"patch target not found in {rel}: {old!r}"
        (src / rel).write_text(text.replace(old, new, 1))
    wheels = out / f"wheel-{version}"
    subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src)], check=True,
                   capture_output=True, timeout=300)
    shutil.rmtree(src)
    return next(wheels.glob("storelink-*.whl"))


class ReleaseKit:
    """Signed bundles of test releases, built on first use and kept for the session."""

    def __init__(self, workdir: Path, key: KeyPair):
        self.workdir = workdir
        self.key = key
        self.deps = deps_wheelhouse()
        self.bundles: dict[str, Path] = {}

    def bundle(self, version: str, patches: dict[str, tuple[str, str]] | None = None, key: str | None = None) -> Path:
        name = f"{version}-{hashlib.sha256(repr((patches, key)).encode()).hexdigest()[:8]}"
        if name not in self.bundles:
            wheel = storelink_wheel(version, self.workdir, patches)
            house = self.workdir / f"house-{name}"
            house.mkdir()
            for w in self.deps.glob("*.whl"):
                os.link(w, house / w.name) if w.stat().st_dev == house.stat().st_dev else shutil.copy(w, house)
            shutil.copy(wheel, house)
            out = build_release(house, key or self.key.private_b64, self.workdir / f"dist-{name}", extras="")
            shutil.rmtree(house)
            self.bundles[name] = out
        return self.bundles[name]


# -- HTTPS ------------------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    server: HttpsFileServer

    def log_message(self, *_a: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range", "")
        self.server.requests.append({"path": self.path, "range": rng})
        if rng.startswith("bytes=") and self.server.ranges:
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut_after.pop(0) if self.server.cut_after else None
        if cut is not None:  # an interrupted transfer: part of the body, then the connection drops
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class HttpsFileServer(http.server.ThreadingHTTPServer):
    """Serves a directory over HTTPS on loopback with a test CA's certificate."""

    daemon_threads = True

    def __init__(self, root: Path, pki: dict[str, Path]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.ranges = True
        self.cut_after: list[int] = []  # one entry per request to cut: bytes of the body sent before the drop
        self.requests: list[dict[str, str]] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"https://localhost:{self.server_address[1]}/{name}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# -- the supervisor ---------------------------------------------------------------------------------------------
class Supervisor:
    """tests/service_supervisor.py as a real process: keeps the gateway running, starts the updater when the
    gateway leaves a pending.json (as storelink-update.path does), counts restarts in a state file."""

    def __init__(self, workdir: Path, gateway_cmd: list[str], watch: Path, updater_cmd: list[str]):
        self.state = workdir / "supervisor.json"
        self.log = workdir / "supervisor.log"
        cmd = [sys.executable, str(REPO / "tests/service_supervisor.py"), "--state", str(self.state),
               "--watch", str(watch), "--updater", json.dumps(updater_cmd), "--log", str(workdir / "gateway.log"),
               "--", *gateway_cmd]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    def data(self) -> dict[str, Any]:
        try:
            return json.loads(self.state.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
