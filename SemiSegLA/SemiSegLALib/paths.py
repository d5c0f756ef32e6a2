"""Short, ASCII-only temporary folders for the files exchanged with the child, and the room they need.

Non-ASCII user names or dates and long Windows paths have broken other Slicer AI extensions; the first
candidate that is ASCII-only, short and writable is used. A job that would fill the disk is refused before it
writes anything, and a write that failed on a full disk says so.
"""

import os
import shutil
import tempfile
from typing import Optional, Sequence

MAX_ROOT_LENGTH = 100
# A write that failed with less than this free failed because the disk filled (the core's io/atomic.py
# judges its own writes the same way).
FULL_DISK_BYTES = 64 * 2**20
# What a fine-tune's run needs besides its dataset: checkpoints and the new model, about 0.4 GB for the default
# fine-tune. The core checks its own need exactly when it starts; this refuses a hopeless run before the
# scene's volumes are written out.
FINETUNE_RUN_BYTES = 512 * 2**20
SETTING_HINT = "Edit > Application Settings > Modules > Temporary directory"


def isAsciiPath(path: str) -> bool:
    try:
        str(path).encode("ascii")
    except UnicodeEncodeError:
        return False
    return True


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.mkdtemp(prefix="probe_", dir=folder)
        os.rmdir(probe)
        return True
    except OSError:
        return False


def fallbackRoots() -> Sequence[str]:
    if os.name == "nt":
        drive = os.environ.get("SYSTEMDRIVE", "C:")
        return (os.path.join(drive + os.sep, "SemiSegLA-tmp"),)
    return ("/tmp", "/var/tmp")


def shortAsciiTempRoot(candidates: Sequence[Optional[str]] = (), maxLength: int = MAX_ROOT_LENGTH) -> str:
    """The first candidate (then the system temp folder, then a fixed fallback) that is usable."""
    options = [c for c in candidates if c] + [tempfile.gettempdir()] + list(fallbackRoots())
    for folder in options:
        folder = os.path.abspath(folder)
        if isAsciiPath(folder) and len(folder) <= maxLength and _writable(folder):
            return folder
    raise OSError("No ASCII-only, writable temporary folder found; set one in the SemiSegLA settings.")


def newWorkDir(root: str, prefix: str) -> str:
    """A fresh folder such as <root>/ssla_seg_k3j2x/ (short names keep Windows paths short)."""
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"ssla_{prefix}_", dir=root)


def freeBytes(folder: str) -> Optional[int]:
    """Free bytes on the disk that holds ``folder``, or would hold it (its nearest existing parent); None when
    that cannot be asked."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def sizeText(count: float) -> str:
    return f"{count / 2**30:.1f} GB" if count >= 2**30 else f"{count / 2**20:.0f} MB"


def spaceShortage(folder: str, neededBytes: int, what: str) -> Optional[str]:
    """Why ``what`` cannot write its ``neededBytes`` of temporary files in ``folder``; None when there is room."""
    free = freeBytes(folder)
    if free is None or free >= neededBytes:
        return None
    return (f"{what} needs about {sizeText(neededBytes)} of temporary files in {folder}, and "
            f"{sizeText(free)} are free. Free some space, or choose another temporary directory "
            f"({SETTING_HINT}).")


def diskFullNote(path: str) -> str:
    """": the disk is full (...)" when a failed write of ``path`` left almost nothing free; "" otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    free = freeBytes(folder)
    if free is None or free >= FULL_DISK_BYTES:
        return ""
    return f": the disk is full ({sizeText(free)} free in {folder})"
