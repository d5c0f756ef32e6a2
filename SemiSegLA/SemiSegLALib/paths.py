"""Short, ASCII-only temporary folders for the files exchanged with the child.

Non-ASCII user names or dates and long Windows paths have broken other Slicer AI extensions; the first
candidate that is ASCII-only, short and writable is used.
"""

import os
import tempfile
from typing import Optional, Sequence

MAX_ROOT_LENGTH = 100


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
