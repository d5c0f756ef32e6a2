"""Atomic file writes: write a temporary file in the same folder, fsync, then rename.

A reader (or a 'skip existing' check) can therefore never see a half-written output, and an
interrupted run leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import StorageError

# Free space below this after a failed write means the disk filled: torch.save reports a full disk as
# "iostream error" / "unexpected pos", without the errno, so the space left is what tells.
FULL_DISK_BYTES = 64 * 2**20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    The temporary name keeps the final extension (SimpleITK picks the format from it).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ext = suffix if suffix is not None else "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{ext}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; outputs get the usual mode
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except (OSError, RuntimeError) as exc:
        _raise_if_disk_full(exc, target)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _raise_if_disk_full(exc: BaseException, target: Path) -> None:
    """A write that failed on a full disk becomes one line that says so (and that `target` is unchanged)."""
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return
    if getattr(exc, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and free >= FULL_DISK_BYTES:
        return
    kept = "the previous file is kept" if target.exists() else "nothing was written"
    raise StorageError(f"{target}: could not be written, the disk is full ({free / 2**20:.0f} MiB free in "
                       f"{target.parent}); {kept}. Free some space and run the command again") from exc


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
