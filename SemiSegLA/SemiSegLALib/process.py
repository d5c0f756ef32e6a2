"""Child-process runner: start the core, stream its output without blocking, cancel its whole tree.

* ``subprocess.Popen`` with stdout piped and stderr merged into it; a reader *thread* puts every line into
  a ``queue.Queue``; the GUI's main thread drains the queue (``ChildProcess.readLines``) from a QTimer
  callback, so Qt is never touched from the reader thread.
* Cancel kills the process tree, the children first (psutil when it is importable), then the process
  group on POSIX (the child is started in its own session) or ``taskkill /T`` on Windows without psutil.
  Slicer does not ship psutil (not in 5.6, 5.8 or 5.10), so the fallback is the normal path inside Slicer.
  This matters inside Slicer, where ``PythonSlicer`` is a launcher whose child is the real Python.
* Exit status: SUCCESS, FAILED or CANCELLED (RUNNING while it runs).

No Qt and no Slicer here: tests drive this with real processes.
"""

import contextlib
import enum
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence

_EOF = object()

# Windows process-creation flags (the constants exist only in Windows' subprocess module)
_CREATE_NEW_PROCESS_GROUP = 0x00000200
_CREATE_NO_WINDOW = 0x08000000


class ExitStatus(enum.Enum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ProcessStartError(RuntimeError):
    """The child could not be started (missing interpreter, bad working folder...)."""


class RunResult:
    """Outcome of a short synchronous command (``models list`` and friends)."""

    def __init__(self, returncode: int, stdout: str, stderr: str, timedOut: bool = False) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timedOut = timedOut

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timedOut

    def __repr__(self) -> str:
        return f"RunResult(returncode={self.returncode}, timedOut={self.timedOut})"


def _popen_kwargs() -> Dict[str, object]:
    if os.name == "nt":
        return {"creationflags": _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _psutil():
    """psutil when the user installed it (Slicer does not ship it), else None: the fallback needs nothing."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _waitGone(psutil, procs, timeout: float) -> None:
    """Wait until every process is gone or a zombie (without reaping: Popen reaps its own child, and a
    container's init may never reap orphans)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        alive = []
        for proc in pending:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        pending = alive
        if pending:
            time.sleep(0.02)


def killProcessTree(pid: int, processGroup: bool = True, timeout: float = 3.0) -> None:
    """Kill ``pid`` and everything it started: children first, then the process, then its group."""
    psutil = _psutil()
    if psutil is not None:
        procs = []
        try:
            parent = psutil.Process(pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            parent, children = None, []
        for child in children:
            try:
                child.kill()
                procs.append(child)
            except psutil.NoSuchProcess:
                pass
        if parent is not None:
            try:
                parent.kill()
                procs.append(parent)
            except psutil.NoSuchProcess:
                pass
        _waitGone(psutil, procs, timeout)
    if os.name == "posix":
        if processGroup:
            # the child leads its own session/group: this also reaches grandchildren that were re-parented
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
    elif psutil is None:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=_CREATE_NO_WINDOW, check=False)


class ChildProcess:
    """A started child; all methods are for the main thread except the private reader."""

    # after the process exits, wait this long for the end of its output (a grandchild may hold the pipe)
    EOF_GRACE_S = 2.0

    def __init__(self, popen: subprocess.Popen, argv: Sequence[str]) -> None:
        self._popen = popen
        self.argv = list(argv)
        self._queue: queue.Queue = queue.Queue()
        self._eof = False
        self._cancelled = False
        self._exitSeenAt: Optional[float] = None
        self._reader = threading.Thread(target=self._read, name=f"SemiSegLA-reader-{popen.pid}", daemon=True)
        self._reader.start()

    # -- reader thread -------------------------------------------------------------------------------------
    def _read(self) -> None:
        stream = self._popen.stdout
        try:
            for line in iter(stream.readline, ""):
                self._queue.put(line)
        except (ValueError, OSError):  # the pipe was closed under us (cancel)
            pass
        finally:
            self._queue.put(_EOF)

    # -- main thread -----------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._popen.poll()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def readLines(self, maxLines: Optional[int] = None) -> List[str]:
        """Every line queued so far (without waiting), newline stripped."""
        lines: List[str] = []
        while maxLines is None or len(lines) < maxLines:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._eof = True
                continue
            lines.append(item.rstrip("\r\n"))
        return lines

    def finished(self) -> bool:
        """True once the process has exited and the reader reached the end of its output (or a grandchild
        still holds the pipe ``EOF_GRACE_S`` after the exit); call ``readLines()`` once more after it."""
        if self._popen.poll() is None:
            return False
        if self._exitSeenAt is None:
            self._exitSeenAt = time.monotonic()
        if not self._reader.is_alive():
            return True  # all output is in the queue; readLines() returns the rest
        return time.monotonic() - self._exitSeenAt > self.EOF_GRACE_S

    def exitStatus(self) -> ExitStatus:
        if self._cancelled:
            return ExitStatus.CANCELLED
        code = self._popen.poll()
        if code is None:
            return ExitStatus.RUNNING
        return ExitStatus.SUCCESS if code == 0 else ExitStatus.FAILED

    def cancel(self, timeout: float = 5.0) -> None:
        """Kill the whole tree and wait (at most ``timeout`` s) for the process to be gone."""
        self._cancelled = True
        if self._popen.poll() is None:
            killProcessTree(self._popen.pid, processGroup=True, timeout=timeout)
        else:
            killProcessTree(self._popen.pid, processGroup=True, timeout=0.5)  # leftovers of an exited child
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=timeout)
        self._reader.join(timeout=1.0)
        with contextlib.suppress(OSError, ValueError):
            self._popen.stdout.close()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until exit (for scripts and tests); returns the exit code, None on timeout."""
        try:
            code = self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=self.EOF_GRACE_S)
        return code


class ProcessRunner:
    """Starts children. Injected into the logic so that tests can use a real or a scripted runner."""

    def start(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None) -> ChildProcess:
        try:
            popen = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
                **_popen_kwargs())
        except OSError as exc:
            raise ProcessStartError(f"Could not start {argv[0]}: {exc.strerror or exc}") from exc
        return ChildProcess(popen, argv)

    def run(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
            timeout: float = 120.0) -> RunResult:
        """Run a short command to completion; stdout and stderr apart (stdout may be JSON)."""
        try:
            popen = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", **_popen_kwargs())
        except OSError as exc:
            raise ProcessStartError(f"Could not start {argv[0]}: {exc.strerror or exc}") from exc
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            killProcessTree(popen.pid)
            out, err = popen.communicate()
            return RunResult(popen.returncode if popen.returncode is not None else -9, out or "", err or "",
                             timedOut=True)
        return RunResult(popen.returncode, out or "", err or "")
