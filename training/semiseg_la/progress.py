"""Progress reporting shared by segmentation and training.

Two renderings of the same events: tqdm bars for people, and JSON lines on stdout for the Slicer
module (`--progress json`): one object per line with `stage`, `step`, `total`, `eta_s`, `message`,
ending with a `done` or an `error` record (protocol: docs/slicer.md 4.4).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional, TextIO


class ProgressReporter:
    """Reports stage progress; the base class is silent (library use, tests)."""

    #: whether `log` reaches the person at the terminal (stderr); a warning they must see is printed there otherwise
    logs_to_stderr = False

    def start(self, stage: str, total: int, message: str = "") -> None:  # noqa: B027
        pass

    def update(self, step: int, **fields: Any) -> None:  # noqa: B027
        pass

    def end(self) -> None:  # noqa: B027
        pass

    def log(self, message: str) -> None:  # noqa: B027
        pass

    def done(self, **fields: Any) -> None:  # noqa: B027
        pass

    def error(self, message: str, kind: str) -> None:  # noqa: B027
        pass


class JsonLinesProgress(ProgressReporter):
    """Machine-readable progress, one JSON object per line, flushed at once."""

    def __init__(self, stream: Optional[TextIO] = None, min_interval_s: float = 0.2) -> None:
        self.stream = stream or sys.stdout
        self.min_interval_s = min_interval_s
        self._stage = ""
        self._total = 0
        self._t0 = 0.0
        self._last_emit = 0.0

    def _emit(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, default=_json_default) + "\n")
        self.stream.flush()

    def start(self, stage: str, total: int, message: str = "") -> None:
        self._stage, self._total, self._t0 = stage, int(total), time.monotonic()
        self._last_emit = 0.0
        self._emit({"stage": stage, "step": 0, "total": self._total, "eta_s": None, "message": message})

    def update(self, step: int, **fields: Any) -> None:
        now = time.monotonic()
        final = step >= self._total
        if not final and now - self._last_emit < self.min_interval_s:
            return
        self._last_emit = now
        elapsed = now - self._t0
        eta = elapsed / step * (self._total - step) if step > 0 else None
        record = {"stage": self._stage, "step": int(step), "total": self._total,
                  "eta_s": None if eta is None else round(eta, 2)}
        record.update(fields)
        self._emit(record)

    def log(self, message: str) -> None:
        self._emit({"stage": "log", "message": message})

    def done(self, **fields: Any) -> None:
        self._emit({"stage": "done", **fields})

    def error(self, message: str, kind: str) -> None:
        self._emit({"stage": "error", "message": message, "kind": kind})


class TqdmProgress(ProgressReporter):
    """Human progress bars on stderr, and the command's messages there. `bars=False` (`--progress none`, e.g. a
    detached run logging to a file) drops the bars only: the model exported, the guard rail's verdict and every
    warning are what such a log is read for."""

    logs_to_stderr = True

    def __init__(self, bars: bool = True) -> None:
        self.bars = bars
        self._bar = None

    def start(self, stage: str, total: int, message: str = "") -> None:
        from tqdm import tqdm

        self.end()
        self._bar = tqdm(total=total, desc=stage, disable=not self.bars, dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, **fields: Any) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if fields:
            self._bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
        self._bar.refresh()

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)  # above an open bar, not through it


_ACTIVE: list = []


def make_reporter(mode: str) -> ProgressReporter:
    """`json`, `tqdm` (default for people) or `none`; remembered so an error can close its bar first."""
    if mode == "json":
        reporter: ProgressReporter = JsonLinesProgress()
    else:
        reporter = TqdmProgress(bars=(mode != "none"))
    _ACTIVE.append(reporter)
    return reporter


def close_active_reporters() -> None:
    """End open progress bars so an error message starts on a line of its own."""
    while _ACTIVE:
        _ACTIVE.pop().end()


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
