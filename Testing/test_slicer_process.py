"""Slicer side, layer (a)/(b): the child-process runner with real processes, and the command lines."""

import os
import sys
import time

import numpy as np
import psutil
import pytest

import slicer_fake

# isort: split
from SemiSegLALib import process
from SemiSegLALib.commands import CommandFactory, normalizeDevice
from SemiSegLALib.process import ExitStatus, ProcessRunner, ProcessStartError


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_lines_stream_while_the_child_runs():
    script = "import time\nprint('first', flush=True)\ntime.sleep(2.0)\nprint('second', flush=True)\n"
    child = ProcessRunner().start([sys.executable, "-u", "-c", script])
    got = []
    assert _wait_for(lambda: got.extend(child.readLines()) or "first" in got, timeout=5)
    assert child.returncode is None, "the first line must arrive before the child exits"
    assert not child.finished()
    assert _wait_for(child.finished, timeout=10)
    got += child.readLines()
    assert got == ["first", "second"]
    assert child.exitStatus() is ExitStatus.SUCCESS


def test_stderr_is_merged_and_failure_is_reported():
    script = "import sys\nprint('out')\nsys.stderr.write('err line\\n')\nsys.exit(3)\n"
    child = ProcessRunner().start([sys.executable, "-c", script])
    assert child.wait(10) == 3
    assert _wait_for(child.finished)
    assert sorted(child.readLines()) == ["err line", "out"]
    assert child.exitStatus() is ExitStatus.FAILED


@pytest.mark.parametrize("with_psutil", [True, False], ids=["psutil", "process-group"])
def test_cancel_kills_child_and_grandchild(tmp_path, monkeypatch, with_psutil):
    if not with_psutil:
        monkeypatch.setattr(process, "_psutil", lambda: None)  # as without psutil: killpg / taskkill
    pidfile = tmp_path / "pids.txt"
    image = tmp_path / "in.nrrd"
    slicer_fake.writeNrrd(np.zeros((4, 5, 6), "float32"), slicer_fake.Geometry([1, 1, 1], [0, 0, 0], np.eye(3)),
                          str(image), compress=False)
    factory = slicer_fake.fakeCommandFactory("slow,grandchild", {"SEMISEG_FAKE_PIDFILE": str(pidfile)})
    spec = factory.segment(str(image), str(tmp_path / "out.nrrd"), "la-caml-v1.0.0", "cpu")
    child = ProcessRunner().start(spec.argv, spec.env)
    assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=15)
    pid, grandchild = (int(v) for v in pidfile.read_text().split())
    assert pid == child.pid
    assert not _gone(grandchild)
    start = time.monotonic()
    child.cancel(timeout=5)
    assert _wait_for(lambda: _gone(pid) and _gone(grandchild), timeout=3), "process tree still alive"
    assert time.monotonic() - start < 3.0
    assert child.exitStatus() is ExitStatus.CANCELLED
    assert child.finished()
    assert not (tmp_path / "out.nrrd").exists()


def test_run_separates_stdout_and_stderr_and_times_out():
    runner = ProcessRunner()
    result = runner.run([sys.executable, "-c", "import sys; print('[1]'); sys.stderr.write('warn\\n')"])
    assert result.ok and result.stdout.strip() == "[1]" and result.stderr.strip() == "warn"
    start = time.monotonic()
    slow = runner.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow.timedOut and not slow.ok
    assert time.monotonic() - start < 5


def test_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(ProcessStartError, match="Could not start"):
        ProcessRunner().start([str(tmp_path / "no-such-python")])


def test_segment_command_line_and_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    factory = CommandFactory("/opt/Slicer/bin/PythonSlicer", pythonPaths=["/src/training"])
    spec = factory.segment("/t/in.nrrd", "/t/out.nrrd", "la-caml-v1.0.0", "gpu", overlap=0.25)
    assert spec.argv == ["/opt/Slicer/bin/PythonSlicer", "-m", "semiseg_la.cli.main", "segment", "/t/in.nrrd",
                         "-o", "/t/out.nrrd", "--model", "la-caml-v1.0.0", "--device", "cuda", "--overlap",
                         "0.25", "--progress", "json"]
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0"  # the user's choice of GPU is kept
    assert spec.env["PYTHONUNBUFFERED"] == "1"
    assert spec.env["PYTHONPATH"].split(os.pathsep)[0] == "/src/training"
    cpu = factory.segment("/t/in.nrrd", "/t/out.nrrd", None, "cpu")
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == "-1"  # Force CPU hides every GPU
    assert "--model" not in cpu.argv and cpu.argv[-4:] == ["--device", "cpu", "--progress", "json"]


def test_finetune_and_models_command_lines():
    factory = CommandFactory("py", baseEnvironment=lambda: {"A": "1"}, extraEnvironment={"B": "2"})
    spec = factory.finetune("la-caml-v1.0.0", "/d/dataset", "mean_teacher", "/d/unlabeled", iterations=300,
                            timeBudgetSeconds=600, name="site-a", device="auto")
    assert spec.argv == ["py", "-m", "semiseg_la.cli.main", "finetune", "--from", "la-caml-v1.0.0", "--data",
                         "/d/dataset", "--unlabeled", "/d/unlabeled", "--method", "mean_teacher",
                         "--iterations", "300", "--time-budget", "600", "--name", "site-a", "--device", "auto",
                         "--progress", "json"]
    assert spec.env["A"] == "1" and spec.env["B"] == "2" and "CUDA_VISIBLE_DEVICES" not in spec.env
    minimal = factory.finetune("m", "/d", "supervised")
    assert "--unlabeled" not in minimal.argv and "--iterations" not in minimal.argv
    assert factory.modelsList().argv[-3:] == ["models", "list", "--json"]
    assert factory.modelsRemove("x").argv[-3:] == ["models", "remove", "x"]
    assert factory.modelsImport("/w/a.pth").argv[-3:] == ["models", "import", "/w/a.pth"]
    assert factory.modelsPresets().argv[-3:] == ["models", "presets", "--json"]
    with pytest.raises(ValueError):
        factory.finetune("", "/d", "supervised")


def test_device_names():
    assert [normalizeDevice(d) for d in ("auto", "GPU", "cuda", "CPU", "", "cuda:0")] == [
        "auto", "cuda", "cuda", "cpu", "auto", "cuda"]
    with pytest.raises(ValueError, match="Unknown device"):
        normalizeDevice("mps")
