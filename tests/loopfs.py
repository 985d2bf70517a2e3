"""An ext4 filesystem on a loop device: what really reaches a block device, and what a power cut leaves.

The loop device turns every block the filesystem above it writes into a write to a plain image file. Two things
follow, and both need root (losetup, mount):

- ``sectors_written()`` is the device's own counter (``/sys/block/loopN/stat``): data, filesystem metadata and
  the ext4 journal together, i.e. what an SD card in the same place would be asked to write.
- ``power_cut_image()`` copies the image file. Pages the filesystem still holds dirty in the page cache (written
  with ``write()`` but not yet fsync'd or written back) are not in it, so the copy is the disk as a power cut would
  leave it: everything fsync'd, some of what the kernel wrote back by itself, nothing else. ``commit=600`` keeps
  ext4 from committing its journal (and with ``data=ordered`` the data of new blocks) every 5 s on its own, so
  in practice un-fsync'd data of the last seconds is really dropped; ``canary()`` proves it for a given run.
  The copy is then mounted (ext4 replays its journal, as after a real cut) for the test to inspect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

CANARY = b"written, never fsync'd\n" * 200


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def require_loop_devices() -> None:
    """Fail (not skip) with the reason when this machine cannot do it: CI runs the tests as root."""
    assert os.geteuid() == 0, "loop devices need root (losetup, mount); CI runs the tests as root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        assert shutil.which(tool), f"{tool} is missing (util-linux, e2fsprogs)"


class LoopFs:
    """``with LoopFs(workdir) as fs:`` an empty ext4 of ``size_mb`` mounted at ``fs.mountpoint``."""

    def __init__(self, workdir: Path, size_mb: int = 64, name: str = "disk"):
        self.image = workdir / f"{name}.img"
        self.mountpoint = workdir / name
        self.size_mb = size_mb
        self.device: str | None = None

    def __enter__(self) -> LoopFs:
        require_loop_devices()
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb * 1024 * 1024)
        # 4 KiB blocks like an SD card's filesystem (mke2fs picks 1 KiB for small ones); inode tables and the
        # journal written now, not by ext4lazyinit in the background while a benchmark counts sectors.
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image))
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            _run("mount", "-t", "ext4", "-o", "commit=600", self.device, str(self.mountpoint))
        except BaseException:
            _run("losetup", "-d", self.device)
            raise
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.device is None:
            return
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
        self.device = None
        self.image.unlink(missing_ok=True)

    @property
    def stat_path(self) -> str:
        assert self.device is not None
        return f"/sys/block/{Path(self.device).name}/stat"

    def sectors_written(self) -> int:
        """512-byte sectors the filesystem has written to the device so far (field 7 of the block stat)."""
        return int(Path(self.stat_path).read_text().split()[6])

    def canary(self, name: str = "canary") -> Path:
        """A file written without fsync: a power-cut image that still holds its content did not drop un-fsync'd
        data. (Its name may survive: a journal commit for another file's fsync takes the new directory entry
        along, and ext4 then shows the file empty, its data never written.)"""
        path = self.mountpoint / name
        path.write_bytes(CANARY)
        return path

    def power_cut_image(self, dest: Path) -> MountedImage:
        """The device as a power cut now would leave it, mounted at ``dest`` (stop the writers first)."""
        copy = dest.with_suffix(".img")
        shutil.copyfile(self.image, copy)
        return MountedImage(copy, dest)


class MountedImage:
    """A power-cut copy, mounted read-write (ext4 replays its journal; SQLite then recovers its WAL)."""

    def __init__(self, image: Path, mountpoint: Path):
        self.image, self.mountpoint = image, mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.device = _run("losetup", "--find", "--show", str(image))
        try:
            _run("mount", "-t", "ext4", self.device, str(mountpoint))
        except BaseException:
            _run("losetup", "-d", self.device)
            raise

    def __enter__(self) -> MountedImage:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.device], check=False, capture_output=True)
        self.image.unlink(missing_ok=True)
