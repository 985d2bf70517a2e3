"""A filesystem with a power switch, for tests: what was written but not fsync'd is lost when the power is cut.

``python -m tests.powercut_fs BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT through FUSE (libfuse3, mfusepy).
File contents written through the mount stay in this process's memory, like a disk's page cache, until the
file is fsync'd (or fdatasync'd): only then are they written to BACKING. Killing this process with SIGKILL is the
power cut: everything not yet synced is gone, exactly what a real power loss does to a program that returned from
``write()`` but not from ``fsync()``. Mount it again over the same BACKING and the survivor sees the state of its
last syncs.

Simplifications (stated, so a reader knows what a green test proves): metadata (create, rename, unlink, mkdir) is
durable at once, as on a journalling filesystem that commits it synchronously; a sync writes the whole file's
dirty data; BACKING itself is not fsync'd (the host's page cache survives the simulated cut). Locks and mmap go
through the kernel as for any FUSE filesystem.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers import end_process

BLOCK = 4096


class _Unsynced:
    """One file's writes since its last sync: dirty blocks, its size, and where a truncation cut it."""

    def __init__(self, size: int):
        self.blocks: dict[int, bytes] = {}
        self.size = size
        self.cut_at = size  # bytes of the backing file at or past this offset are gone (truncated, unsynced)


def _operations() -> Any:
    import mfusepy as fuse

    class PowerCutFS(fuse.Operations):  # type: ignore[misc]
        def __init__(self, root: str):
            self.root = root
            self.guard = threading.Lock()
            self.unsynced: dict[str, _Unsynced] = {}

        def _p(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _state(self, path: str) -> _Unsynced:
            st = self.unsynced.get(path)
            if st is None:
                st = self.unsynced[path] = _Unsynced(os.stat(self._p(path)).st_size)
            return st

        def _block(self, fh: int, st: _Unsynced, index: int) -> bytearray:
            """Block ``index`` as the file holds it now (dirty data over the backing, zeros past a cut)."""
            if index in st.blocks:
                return bytearray(st.blocks[index])
            start = index * BLOCK
            keep = max(0, min(BLOCK, st.cut_at - start, st.size - start))
            data = os.pread(fh, keep, start) if keep else b""
            return bytearray(data.ljust(BLOCK, b"\0"))

        # -- files -----------------------------------------------------------------------------------------------
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            try:
                s = os.lstat(self._p(path))
            except OSError as err:
                raise fuse.FuseOSError(err.errno) from None
            out = {k: getattr(s, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime",
                                              "st_mtime", "st_ctime")}
            with self.guard:
                if path in self.unsynced:
                    out["st_size"] = self.unsynced[path].size
            return out

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._p(path), os.O_RDWR if os.path.isfile(self._p(path)) else os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self.guard:
                st = self.unsynced.get(path)
                if st is None:
                    return os.pread(fh, size, offset)
                end = min(offset + size, st.size)
                if end <= offset:
                    return b""
                first, last = offset // BLOCK, (end - 1) // BLOCK
                data = b"".join(bytes(self._block(fh, st, b)) for b in range(first, last + 1))
                start = offset - first * BLOCK
                return data[start:start + end - offset]

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self.guard:
                st = self._state(path)
                pos = 0
                while pos < len(data):
                    index, within = divmod(offset + pos, BLOCK)
                    n = min(BLOCK - within, len(data) - pos)
                    block = self._block(fh, st, index)
                    block[within:within + n] = data[pos:pos + n]
                    st.blocks[index] = bytes(block)
                    pos += n
                st.size = max(st.size, offset + len(data))
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            with self.guard:
                st = self._state(path)
                if fh is None:
                    fd = os.open(self._p(path), os.O_RDONLY)
                    try:
                        tail = self._block(fd, st, length // BLOCK) if length % BLOCK else None
                    finally:
                        os.close(fd)
                else:
                    tail = self._block(fh, st, length // BLOCK) if length % BLOCK else None
                st.blocks = {b: d for b, d in st.blocks.items() if b * BLOCK < length}
                if tail is not None:
                    tail[length % BLOCK:] = bytes(BLOCK - length % BLOCK)
                    st.blocks[length // BLOCK] = bytes(tail)
                st.size = length
                st.cut_at = min(st.cut_at, length)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            with self.guard:
                st = self.unsynced.pop(path, None)
                if st is None:
                    return
                os.ftruncate(fh, min(st.cut_at, os.fstat(fh).st_size))
                for index, block in sorted(st.blocks.items()):
                    start = index * BLOCK
                    os.pwrite(fh, block[:max(0, min(BLOCK, st.size - start))], start)
                os.ftruncate(fh, st.size)

        def flush(self, path: str, fh: int) -> None:
            pass  # close() does not make data durable; only fsync does

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def unlink(self, path: str) -> None:
            with self.guard:
                os.unlink(self._p(path))
                self.unsynced.pop(path, None)

        def rename(self, old: str, new: str) -> None:
            with self.guard:
                os.rename(self._p(old), self._p(new))
                self.unsynced.pop(new, None)
                if old in self.unsynced:
                    self.unsynced[new] = self.unsynced.pop(old)

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._p(path), uid, gid)

        def utimens(self, path: str, times: Any = None) -> None:
            pass

        def access(self, path: str, amode: int) -> None:
            if not os.access(self._p(path), amode):
                raise fuse.FuseOSError(errno.EACCES)

        # -- directories ------------------------------------------------------------------------------------------
        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._p(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._p(path))

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
            pass  # metadata is durable at once here

        def statfs(self, path: str) -> dict[str, int]:
            s = os.statvfs(self._p(path))
            return {k: getattr(s, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                               "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    return PowerCutFS


def fuse_available() -> str | None:
    """Why a power-cut mount cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: libfuse3 itself is missing
        return f"mfusepy/libfuse3 not usable: {err}"
    return None


class PowerCutDisk:
    """A mount of ``backing`` at ``mountpoint`` whose power a test can cut."""

    def __init__(self, backing: Path, mountpoint: Path):
        self.backing, self.mountpoint = backing, mountpoint
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = backing.parent / f"{mountpoint.name}-fuse.log"

    def mount(self) -> PowerCutDisk:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.powercut_fs", str(self.backing),
                                          str(self.mountpoint)], stdout=log, stderr=log,
                                         cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"power-cut filesystem did not mount:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def cut(self) -> None:
        """The power goes: the filesystem process dies with its unsynced data; the mount is detached."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        self._detach()

    def unmount(self) -> None:
        if self.proc is not None:
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            end_process(self.proc)
            self.proc = None
        self._detach()

    def _detach(self) -> None:
        if os.path.ismount(self.mountpoint) or _is_dead_mount(self.mountpoint):
            tool = shutil.which("fusermount3")
            cmd = [tool, "-u", "-z", str(self.mountpoint)] if tool else ["umount", "-l", str(self.mountpoint)]
            subprocess.run(cmd, capture_output=True)


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def main() -> None:
    import mfusepy as fuse

    backing, mountpoint = sys.argv[1], sys.argv[2]
    fuse.FUSE(_operations()(os.path.abspath(backing)), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
