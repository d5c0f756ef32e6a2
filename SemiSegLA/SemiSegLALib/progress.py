"""The child's JSON-lines progress protocol, as the Slicer module reads it.

The core (``semiseg-la ... --progress json``) writes one JSON object per line on stdout:

* ``{"stage": "load"|"preprocess"|"predict"|"postprocess"|"write"|"train"|"validate"|"evaluate"|"compare",
  "step": i, "total": n, "eta_s": float|null, "message": str?, ...}``: progress of one stage (a stage not listed
  is shown by its name);
* ``{"stage": "log", "message": str}``: a message for the user (e.g. the CUDA out-of-memory fallback);
* ``{"stage": "done", ...}``: the final result record;
* ``{"stage": "error", "message": one line, "kind": "input"|"checkpoint"|"oom"|"config"|"region"|"storage"|
  "cancelled"|"internal"}``.

Any other line (warnings, tracebacks) is plain log text. This module never parses tqdm output.
"""

import json
import math
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

PROGRESS_STAGES = ("load", "preprocess", "predict", "postprocess", "write", "train", "validate")

# Share of the whole job each stage stands for, in percent, in the order the stages run.
SEGMENT_STAGE_WEIGHTS: Tuple[Tuple[str, float], ...] = (
    ("load", 5.0),
    ("preprocess", 10.0),
    ("predict", 70.0),
    ("postprocess", 10.0),
    ("write", 5.0),
)
FINETUNE_STAGE_WEIGHTS: Tuple[Tuple[str, float], ...] = (
    ("load", 3.0),
    ("preprocess", 2.0),
    ("train", 90.0),
    ("write", 5.0),
)
STAGE_WEIGHTS = {"segment": SEGMENT_STAGE_WEIGHTS, "finetune": FINETUNE_STAGE_WEIGHTS}

STAGE_LABELS = {
    "load": "Loading",
    "preprocess": "Preprocessing",
    "predict": "Predicting",
    "postprocess": "Post-processing",
    "write": "Writing",
    "train": "Training",
    "validate": "Validating",
    # after a fine-tune's training: the held-out check, then the comparison on unlabelled scans
    "evaluate": "Checking the new model",
    "compare": "Comparing with the parent",
}

MAX_REASON_CHARS = 300


class ProgressEvent:
    """One parsed JSON line."""

    def __init__(self, record: Dict[str, Any]) -> None:
        self.record = record
        self.stage = str(record.get("stage", ""))
        self.step = _as_int(record.get("step"))
        self.total = _as_int(record.get("total"))
        self.eta_s = _as_float(record.get("eta_s"))
        message = record.get("message")
        self.message = "" if message is None else str(message)

    @property
    def isProgress(self) -> bool:
        return self.stage not in ("log", "done", "error")

    @property
    def fraction(self) -> Optional[float]:
        """step/total clipped to [0, 1], or None when the line carries no usable counts."""
        if self.step is None or not self.total or self.total <= 0:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def get(self, key: str, default: Any = None) -> Any:
        return self.record.get(key, default)

    def __repr__(self) -> str:
        return f"ProgressEvent({self.record!r})"


def parseLine(line: str) -> Optional[ProgressEvent]:
    """The event a line carries, or None for plain text (including JSON that is not a stage record)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
        return None
    return ProgressEvent(record)


def formatEta(seconds: Optional[float]) -> str:
    """'' when unknown, else 'ETA 45 s', 'ETA 3 min 05 s' or 'ETA 1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    total = int(round(seconds))
    if total < 60:
        return f"ETA {total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"ETA {minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours} h {minutes:02d} min"


def oneLine(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The first non-empty line of a message, shortened to ``limit`` characters."""
    for line in str(text).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "\u2026"
    return ""


class ProgressTracker:
    """Folds the child's output into what the GUI shows: percent, stage, ETA, notices, result, error."""

    def __init__(self, kind: str = "segment", textLinesKept: int = 40) -> None:
        self.kind = kind
        self.weights = STAGE_WEIGHTS.get(kind, SEGMENT_STAGE_WEIGHTS)
        self.notices: List[str] = []
        self.textLines: Deque[str] = deque(maxlen=textLinesKept)
        self.reset()

    def reset(self) -> None:
        """Forget the progress (a new attempt starts); notices and log text stay."""
        self.stage = ""
        self.step: Optional[int] = None
        self.total: Optional[int] = None
        self.etaSeconds: Optional[float] = None
        self.percent = 0.0
        self.stageMessage = ""
        self.doneRecord: Optional[Dict[str, Any]] = None
        self.errorMessage: Optional[str] = None
        self.errorKind: Optional[str] = None
        self.lastLoss: Optional[float] = None
        self.lastDice: Optional[float] = None

    # -- feeding -------------------------------------------------------------------------------------------
    def feed(self, line: str) -> Optional[ProgressEvent]:
        """Take one line of child output; returns its event, or None for plain text."""
        event = parseLine(line)
        if event is None:
            if line.strip():
                self.textLines.append(line.rstrip("\r\n"))
            return None
        if event.stage == "log":
            if event.message:
                self.notices.append(oneLine(event.message))
        elif event.stage == "done":
            self.doneRecord = dict(event.record)
            self.percent = 100.0
            self.etaSeconds = None
        elif event.stage == "error":
            self.errorMessage = oneLine(event.message) or "the core reported an error without a message"
            kind = event.get("kind")
            self.errorKind = str(kind) if kind else "internal"
        else:
            self._progress(event)
        return event

    def _progress(self, event: ProgressEvent) -> None:
        if event.stage == "validate":
            dice = _as_float(event.get("dice"))
            if dice is not None:
                self.lastDice = dice
            # validation is interleaved with training: keep the training percent and ETA
            self.stageMessage = event.message
            return
        self.stage = event.stage
        self.step, self.total = event.step, event.total
        self.etaSeconds = event.eta_s
        self.stageMessage = event.message
        loss = _as_float(event.get("loss"))
        if loss is not None:
            self.lastLoss = loss
        fraction = event.fraction
        if fraction is None:
            return
        before = 0.0
        for name, weight in self.weights:
            if name == event.stage:
                self.percent = before + weight * fraction
                return
            before += weight
        # a stage the table does not know: show it, keep the percent where it was

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def fellBackToCpu(self) -> bool:
        return bool(self.doneRecord and self.doneRecord.get("fell_back_to_cpu"))

    @property
    def etaText(self) -> str:
        return formatEta(self.etaSeconds)

    def statusText(self) -> str:
        """E.g. 'Predicting 12/48 - ETA 9 s' (the stage, its counts and the ETA)."""
        if not self.stage:
            return ""
        parts = [STAGE_LABELS.get(self.stage, self.stage.capitalize())]
        if self.step is not None and self.total:
            parts.append(f"{self.step}/{self.total}")
        if self.lastLoss is not None and self.stage == "train":
            parts.append(f"loss {self.lastLoss:.3g}")
        if self.lastDice is not None and self.kind == "finetune":
            parts.append(f"val. Dice {self.lastDice:.3f}")
        text = " ".join(parts)
        eta = self.etaText
        return f"{text} - {eta}" if eta else text

    def failureReason(self, returnCode: Optional[int] = None) -> str:
        """One line: the last ``error`` record, else the last text line with a hint, else the exit code."""
        if self.errorMessage:
            return self.errorMessage
        for line in reversed(self.textLines):
            hint = _hint_for(line)
            if hint:
                return hint
        if self.textLines:
            last = oneLine(self.textLines[-1])
            return f"The SemiSegLA core stopped: {last}"
        if returnCode is not None:
            return f"The SemiSegLA core exited with code {returnCode} without a message (see the log)."
        return "The SemiSegLA core stopped without a message (see the log)."


def _hint_for(line: str) -> Optional[str]:
    if "No module named 'semiseg_la'" in line or 'No module named "semiseg_la"' in line:
        return ("The SemiSegLA core is not installed in Slicer's Python: use 'Install dependencies' "
                "in the Advanced section, then try again.")
    if "No module named 'torch'" in line:
        return "PyTorch is not installed: install it with the PyTorch Utils module, then try again."
    return None


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None
