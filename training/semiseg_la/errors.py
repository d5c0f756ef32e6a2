"""User-facing errors: one line naming the file and the problem, turned into exit codes by the CLI."""

from __future__ import annotations


class SemiSegError(Exception):
    """Base of every error the CLI reports as one line (no traceback)."""

    kind = "error"
    exit_code = 1


class InputError(SemiSegError):
    """A bad input image, label, list or dataset folder."""

    kind = "input"
    exit_code = 2


class CheckpointError(SemiSegError):
    """An unreadable, unsafe, tampered or incompatible checkpoint or model card."""

    kind = "checkpoint"
    exit_code = 3


class ConfigError(SemiSegError):
    """An invalid configuration value or command-line override."""

    kind = "config"
    exit_code = 4


class StorageError(SemiSegError):
    """An output could not be written because its disk is full; what was there before is kept."""

    kind = "storage"
    exit_code = 6


class RegionError(SemiSegError):
    """No left atrium found where one was looked for (or an implausible one): the user must give a region.

    `reason` is what was found; `hint` (what a `segment` user can do about it) follows it in the message, and
    callers for whom the hint does not apply (a fine-tune leaving a scan out) report `reason` alone."""

    kind = "region"
    exit_code = 5

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason, self.hint = reason, hint
