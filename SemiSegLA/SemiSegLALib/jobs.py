"""One run of the core in a child process, as a state machine the GUI (or a script) drives by polling.

A ``Job`` gets everything from outside: the process runner, a command builder (device -> CommandSpec),
and three callables for the Slicer-facing parts: ``prepare`` (write the inputs to files), ``finalize``
(turn the result files into nodes) and ``cleanup`` (remove the temp folder). So the same class runs in
Slicer, under the test stand-in, and in scripts (``wait()``).

``prepare`` may return an iterator: the job then stays Initializing and writes one piece per ``poll()``
(one case of a fine-tuning dataset per QTimer tick), so the panel stays responsive and Cancel works while
the files are written. MRML nodes are only touched on the main thread.

Nothing is added to the scene before ``finalize``; a cancelled or failed run leaves the scene as it was.

``BackgroundCall`` runs a short blocking call (``models list``, ``remove``, ``import``) in a worker thread;
the main thread polls it and gets its result or error through ``finished``.
"""

import logging
import subprocess
import threading
import time
from typing import Any, Callable, Iterator, List, Optional

from .commands import CommandSpec, normalizeDevice
from .events import Signal
from .process import ChildProcess, ExitStatus, ProcessStartError
from .progress import ProgressTracker, oneLine
from .state import BUSY_STATES, TERMINAL_STATES, State, checkTransition

OOM_RETRY_NOTICE = "The GPU ran out of memory: running again on the CPU (slower)."
OOM_FALLBACK_NOTICE = "The GPU ran out of memory: the result was computed on the CPU instead."


class Job:
    def __init__(self, kind: str, runner, buildCommand: Callable[[str], CommandSpec], device: str = "auto",
                 prepare: Optional[Callable[["Job"], None]] = None,
                 finalize: Optional[Callable[["Job", dict], Any]] = None,
                 cleanup: Optional[Callable[["Job"], None]] = None,
                 retryOnOutOfMemory: bool = True, description: str = "",
                 reword: Optional[Callable[[str], str]] = None) -> None:
        if kind not in ("segment", "finetune"):
            raise ValueError(f"Unknown job kind {kind!r}")
        self.kind = kind
        self.description = description or kind
        self.runner = runner
        self.buildCommand = buildCommand
        self.device = normalizeDevice(device)
        self.effectiveDevice: Optional[str] = None
        self.prepare, self.finalize, self.cleanup = prepare, finalize, cleanup
        self.retryOnOutOfMemory = retryOnOutOfMemory
        self.retriedOnCpu = False
        # how the core's messages read for the user (notices and the failure reason; the log keeps them as is)
        self.reword: Callable[[str], str] = reword or (lambda text: text)

        self.state = State.IDLE
        self.tracker = ProgressTracker(kind)
        self.child: Optional[ChildProcess] = None
        self.returnCode: Optional[int] = None
        self.doneRecord: Optional[dict] = None
        self.result: Any = None
        self.errorMessage: Optional[str] = None
        self.errorKind: Optional[str] = None
        self.notices: List[str] = []
        self.warnings: List[str] = []  # what the user must check in the result (finalize fills it)
        self.logLines: List[str] = []
        self.startedAt: Optional[float] = None
        self.finishedAt: Optional[float] = None
        self._preparing: Optional[Iterator] = None  # the remaining steps of an incremental prepare

        self.stateChanged = Signal("stateChanged")  # (job, state)
        self.progress = Signal("progress")  # (job, ProgressEvent)
        self.logLine = Signal("logLine")  # (job, text)
        self.notice = Signal("notice")  # (job, text): things the user must read (e.g. CPU fallback)
        self.finished = Signal("finished")  # (job)

    # -- properties ------------------------------------------------------------------------------------
    @property
    def runningState(self) -> State:
        return State.SEGMENTING if self.kind == "segment" else State.FINETUNING

    @property
    def isBusy(self) -> bool:
        return self.state in BUSY_STATES

    @property
    def isDone(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def elapsedSeconds(self) -> float:
        if self.startedAt is None:
            return 0.0
        return (self.finishedAt or time.monotonic()) - self.startedAt

    @property
    def logText(self) -> str:
        return "\n".join(self.logLines)

    def summary(self) -> str:
        """One line for the status label."""
        if self.state is State.FINISHED:
            text = f"Finished in {self.elapsedSeconds:.0f} s."
            return " ".join([text] + self.notices)
        if self.state is State.FAILED:
            return f"Failed: {self.errorMessage}"
        if self.state is State.CANCELLED:
            return "Cancelled; the scene is unchanged."
        status = self.tracker.statusText()
        return f"{self.state.value}: {status}" if status else self.state.value

    # -- driving ------------------------------------------------------------------------------------------
    def start(self) -> "Job":
        if self.state is not State.IDLE:
            raise RuntimeError("A job can be started only once")
        self.startedAt = time.monotonic()
        self._setState(State.INITIALIZING)
        try:
            steps = self.prepare(self) if self.prepare is not None else None
        except Exception as exc:
            logging.debug("SemiSegLA: prepare failed", exc_info=True)
            self._fail(_reason(exc))
            return self
        if steps is not None and hasattr(steps, "__next__"):
            self._preparing = steps  # advanced by poll(), one step at a time
            return self
        self._launch(self.device)
        return self

    @property
    def isPreparing(self) -> bool:
        return self.state is State.INITIALIZING and self._preparing is not None

    def _prepareStep(self) -> None:
        try:
            next(self._preparing)
            return
        except StopIteration:
            self._preparing = None
        except Exception as exc:
            self._preparing = None
            logging.debug("SemiSegLA: prepare failed", exc_info=True)
            self._fail(_reason(exc))
            return
        self._launch(self.device)

    def _launch(self, device: str) -> None:
        try:
            spec = self.buildCommand(device)
            self.log("Running: " + subprocess.list2cmdline(spec.argv))
            self.child = self.runner.start(spec.argv, spec.env, getattr(spec, "cwd", None))
        except (ProcessStartError, ValueError, OSError) as exc:
            self._fail(_reason(exc))
            return
        self.effectiveDevice = device
        self._setState(self.runningState)

    def poll(self) -> bool:
        """Write the next input piece, or read what the child wrote; advance the state; True while busy."""
        if self.isPreparing:
            self._prepareStep()
            return self.isBusy
        if self.state is not self.runningState or self.child is None:
            return self.isBusy
        for line in self.child.readLines():
            self._handleLine(line)
        if self.child.finished():
            for line in self.child.readLines():
                self._handleLine(line)
            self._onExit()
        return self.isBusy

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> State:
        """Poll until the job ends (scripts, tests, ``waitForCompletion``); cancel it on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.addNotice(f"Stopped after the {timeout:g} s time limit.")
                self.cancel()
                break
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Kill the child's process tree; the job ends Cancelled and the scene stays as it was."""
        if self.isPreparing:  # the core has not started: stop writing the inputs
            self._setState(State.CANCELLING)
            steps, self._preparing = self._preparing, None
            if hasattr(steps, "close"):
                steps.close()
            self._end(State.CANCELLED)
            return
        if self.state is not self.runningState:
            return
        self._setState(State.CANCELLING)
        try:
            self.child.cancel()
        except Exception as exc:  # the kill itself failed: say so, do not hang
            self._fail(f"Could not stop the SemiSegLA core: {_reason(exc)}")
            return
        for line in self.child.readLines():
            self.log(line)
        self.returnCode = self.child.returncode
        self._end(State.CANCELLED)

    # -- internals --------------------------------------------------------------------------------------
    def _handleLine(self, line: str) -> None:
        self.log(line)
        event = self.tracker.feed(line)
        if event is None:
            return
        if event.stage == "log" and event.message:
            self.addNotice(oneLine(event.message))  # kept in ``notices`` too (e.g. the core's time estimate)
        self.progress.emit(self, event)

    def _onExit(self) -> None:
        self.returnCode = self.child.returncode
        status = self.child.exitStatus()
        tracker = self.tracker
        if status is ExitStatus.SUCCESS and tracker.doneRecord is not None and tracker.errorMessage is None:
            self.doneRecord = tracker.doneRecord
            if tracker.fellBackToCpu:
                self.addNotice(OOM_FALLBACK_NOTICE)
            self._setState(State.IMPORTING)
            try:
                self.result = self.finalize(self, self.doneRecord) if self.finalize else self.doneRecord
            except Exception as exc:
                logging.debug("SemiSegLA: finalize failed", exc_info=True)
                self._fail(_reason(exc))
                return
            self._end(State.FINISHED)
            return
        if (tracker.errorKind == "oom" and self.retryOnOutOfMemory and not self.retriedOnCpu
                and self.effectiveDevice != "cpu"):
            self.retriedOnCpu = True
            self.log(f"GPU out of memory: {tracker.errorMessage}")
            self.addNotice(OOM_RETRY_NOTICE)
            tracker.reset()
            self._launch("cpu")
            return
        if status is ExitStatus.SUCCESS and tracker.errorMessage is None:
            reason = "The SemiSegLA core ended without a result record (see the log)."
        else:
            reason = tracker.failureReason(self.returnCode)
        self.errorKind = tracker.errorKind
        if tracker.errorKind == "oom":
            reason = f"{reason} (out of memory; try Device: CPU or close other programs)"
        self._fail(reason)

    def _setState(self, state: State) -> None:
        checkTransition(self.state, state)
        self.state = state
        self.stateChanged.emit(self, state)

    def _fail(self, reason: str) -> None:
        self.errorMessage = oneLine(self.reword(reason)) or "unknown error"
        self.log(f"Error: {self.errorMessage}")
        self._end(State.FAILED)

    def _end(self, state: State) -> None:
        self.finishedAt = time.monotonic()
        self._setState(state)
        if self.cleanup is not None:
            try:
                self.cleanup(self)
            except Exception:
                logging.warning("SemiSegLA: cleanup failed", exc_info=True)
        self.finished.emit(self)

    def log(self, text: str) -> None:
        self.logLines.append(text)
        self.logLine.emit(self, text)

    def addNotice(self, text: str) -> None:
        text = self.reword(text)
        if text not in self.notices:
            self.notices.append(text)
            self.notice.emit(self, text)


def _reason(exc: BaseException) -> str:
    text = oneLine(str(exc))
    return text or type(exc).__name__


class BackgroundCall:
    """A short blocking call (a ``models`` command) in a worker thread, so the panel never freezes.

    The worker only runs ``function`` (child processes and JSON; no Qt, no MRML); the main thread calls
    ``poll()`` (from a QTimer) and ``finished`` is emitted there, once, with ``result`` or ``error`` set.
    """

    def __init__(self, description: str, function: Callable[[], Any]) -> None:
        self.description = description
        self.function = function
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.finished = Signal("finished")  # (call), on the thread that polls
        self._done = threading.Event()
        self._reported = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "BackgroundCall":
        self._thread = threading.Thread(target=self._work, name=f"SemiSegLA-{self.description}", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            self.result = self.function()
        except BaseException as exc:  # reported on the main thread
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def busy(self) -> bool:
        return not self._reported

    def poll(self) -> bool:
        """True while the call runs; emits ``finished`` once when it is over."""
        if not self._done.is_set():
            return True
        if not self._reported:
            self._reported = True
            self.finished.emit(self)
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block (scripts and tests) until it ends, then report; False on timeout."""
        if not self._done.wait(timeout):
            return False
        self.poll()
        return True
