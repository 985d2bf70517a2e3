"""Fetching a release bundle over HTTPS, resuming where an interrupted download stopped.

Why HTTPS and not chunks over MQTT (docs/operations.md): a bundle is tens of megabytes (cryptography, pydantic-core,
aiohttp wheels); over MQTT every store's copy would pass through the broker's queues (500 stores x 30 MB in the
broker's memory, for offline stores until they return), whereas any static web server or CDN serves files with
``Range`` requests, and a store that reaches the broker over TCP reaches an HTTPS server too. The download is not
trusted: the size and SHA-256 come from the signed command, the wheels are checked against the signed manifest.

Blocking (urllib in a worker thread): the gateway calls ``download`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from storelink.system.files import write_atomically

log = logging.getLogger(__name__)
CHUNK = 256 * 1024


class DownloadError(Exception):
    pass


def ssl_context(ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _hash_file(path: Path) -> tuple[hashlib._Hash, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return digest, size


def download(url: str, dest: Path, *, sha256: str, size: int, ca: Path | None = None,
             progress: Callable[[int, int], None] | None = None, stop: threading.Event | None = None,
             attempts: int = 8, timeout: float = 30.0, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest``; returns ``dest`` once its size and SHA-256 match. Resumes a ``.part``.

    A partial file from an earlier attempt (even an earlier process) is continued with ``Range: bytes=N-``
    when it was for the same SHA-256; a server that ignores ranges (200) restarts it from zero.
    """
    if not url.startswith("https://"):
        raise DownloadError("only https:// release URLs are accepted")
    part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and _hash_file(dest)[0].hexdigest() == sha256:
        return dest
    try:
        same = json.loads(meta.read_text()).get("sha256") == sha256
    except (OSError, ValueError):
        same = False
    if not same:
        part.unlink(missing_ok=True)
        write_atomically(meta, json.dumps({"url": url, "sha256": sha256, "size": size}).encode(), 0o640)
    ctx = ssl_context(ca)
    last_error = "no attempt made"
    restarted = False
    for attempt in range(1, attempts + 1):
        if stop is not None and stop.is_set():
            raise DownloadError("stopped")
        digest, have = _hash_file(part) if part.exists() else (hashlib.sha256(), 0)
        if have > size:
            part.unlink()
            digest, have = hashlib.sha256(), 0
        try:
            if have < size:
                digest, have = _fetch(url, part, digest, have, size, ctx, timeout, progress, stop)
        except (urllib.error.URLError, OSError, TimeoutError, DownloadError) as err:
            last_error = str(getattr(err, "reason", None) or err)
            log.warning("release download interrupted at %d of %d bytes (attempt %d): %s", part.stat().st_size
                        if part.exists() else 0, size, attempt, last_error)
            if stop is not None and stop.wait(backoff * min(2 ** (attempt - 1), 30)):
                raise DownloadError("stopped") from None
            elif stop is None:
                time.sleep(backoff * min(2 ** (attempt - 1), 30))
            continue
        if have == size and digest.hexdigest() == sha256:
            part.replace(dest)
            meta.unlink(missing_ok=True)
            return dest
        # Complete but wrong: the server's file changed or was corrupted. Start over once, then give up.
        part.unlink(missing_ok=True)
        last_error = f"downloaded {have} bytes with sha256 {digest.hexdigest()[:16]}..., expected {sha256[:16]}..."
        if restarted:
            meta.unlink(missing_ok=True)
            break
        restarted = True
    raise DownloadError(f"{url}: {last_error}")


def _fetch(url: str, part: Path, digest: hashlib._Hash, have: int, size: int, ctx: ssl.SSLContext,
           timeout: float, progress: Callable[[int, int], None] | None,
           stop: threading.Event | None) -> tuple[hashlib._Hash, int]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout, context=ctx)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts past the end: what we have is all there is
            return digest, have
        raise DownloadError(f"HTTP {err.code} {err.reason}") from None
    with resp:
        if have and resp.status == 206:
            first = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if first != str(have):
                raise DownloadError(f"server resumed at {first!r}, not at byte {have}")
            mode = "ab"
        else:  # 200: the whole file again (no range support); start from zero
            digest, have, mode = hashlib.sha256(), 0, "wb"
        with part.open(mode) as f:
            while chunk := resp.read(CHUNK):
                if stop is not None and stop.is_set():
                    raise DownloadError("stopped")
                have += len(chunk)
                if have > size:
                    raise DownloadError(f"the server sends more than the announced {size} bytes")
                f.write(chunk)
                digest.update(chunk)
                if progress is not None:
                    progress(have, size)
            f.flush()
    if have < size:
        raise DownloadError(f"connection closed at {have} of {size} bytes")
    return digest, have
