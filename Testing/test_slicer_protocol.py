"""Slicer side, layer (b): the JSON-lines progress protocol, the run state machine, Apply <-> Cancel."""

import json

import pytest

import slicer_fake  # noqa: F401  (puts SemiSegLA/ on sys.path)

# isort: split
from SemiSegLALib.events import Signal
from SemiSegLALib.progress import ProgressTracker, formatEta, oneLine, parseLine
from SemiSegLALib.state import (
    CANCEL_TEXT,
    FINETUNE_TEXT,
    SEGMENT_TEXT,
    IllegalTransition,
    State,
    checkTransition,
    uiState,
)


def line(**record):
    return json.dumps(record)


def test_parse_line_accepts_only_stage_records():
    event = parseLine(line(stage="predict", step=3, total=12, eta_s=4.5, message="tile"))
    assert (event.stage, event.step, event.total, event.eta_s, event.message) == ("predict", 3, 12, 4.5, "tile")
    assert event.fraction == pytest.approx(0.25)
    assert event.isProgress
    for text in ("plain text", "", "{broken json", "[1, 2]", '{"no_stage": 1}', '{"stage": 3}',
                 "Traceback (most recent call last):"):
        assert parseLine(text) is None, text
    # robust to odd numbers: booleans, NaN-free nulls, floats for ints
    odd = parseLine(line(stage="train", step=2.0, total=True, eta_s=None))
    assert odd.step == 2 and odd.total is None and odd.eta_s is None and odd.fraction is None


def test_eta_text():
    assert formatEta(None) == ""
    assert formatEta(float("nan")) == ""
    assert formatEta(-1) == ""
    assert formatEta(9.4) == "ETA 9 s"
    assert formatEta(185) == "ETA 3 min 05 s"
    assert formatEta(3725) == "ETA 1 h 02 min"


def test_segment_tracker_percent_stage_and_eta():
    tracker = ProgressTracker("segment")
    tracker.feed(line(stage="load", step=1, total=1, eta_s=0))
    assert tracker.percent == pytest.approx(5.0)
    tracker.feed(line(stage="preprocess", step=1, total=1, eta_s=0))
    tracker.feed(line(stage="predict", step=12, total=48, eta_s=9.5))
    assert tracker.percent == pytest.approx(15.0 + 70.0 * 12 / 48)
    assert tracker.statusText() == "Predicting 12/48 - ETA 10 s"
    tracker.feed("some warning from a library")  # plain text: kept for the log, no progress change
    assert tracker.percent == pytest.approx(32.5)
    tracker.feed(line(stage="mystery", step=1, total=2, eta_s=None))  # unknown stage: shown, percent kept
    assert tracker.percent == pytest.approx(32.5) and tracker.stage == "mystery"
    tracker.feed(line(stage="done", output="/x.nrrd", device="cuda", fell_back_to_cpu=False, timings={}))
    assert tracker.percent == 100.0 and tracker.doneRecord["output"] == "/x.nrrd"
    assert not tracker.fellBackToCpu


def test_finetune_tracker_keeps_training_progress_during_validation():
    tracker = ProgressTracker("finetune")
    tracker.feed(line(stage="train", step=50, total=100, eta_s=60, loss=0.4))
    before = tracker.percent
    tracker.feed(line(stage="validate", step=50, total=100, dice=0.8123))
    assert tracker.percent == before and tracker.stage == "train"
    assert tracker.lastDice == pytest.approx(0.8123)
    assert tracker.statusText() == "Training 50/100 loss 0.4 val. Dice 0.812 - ETA 1 min 00 s"
    # after training the core checks the new model, then compares it with its parent on unlabelled scans: the
    # percent stays where training left it, the stage says what is running
    tracker.feed(line(stage="train", step=100, total=100, eta_s=0, loss=0.3))
    tracker.feed(line(stage="compare", step=3, total=12, eta_s=None))
    assert tracker.percent == pytest.approx(3.0 + 2.0 + 90.0)
    assert tracker.statusText().startswith("Comparing with the parent 3/12")


def test_error_record_is_the_failure_reason_on_one_line():
    tracker = ProgressTracker()
    tracker.feed("Traceback (most recent call last):")
    tracker.feed(line(stage="error", message="Input volume is not 3D\nextra detail", kind="input"))
    assert tracker.errorMessage == "Input volume is not 3D"
    assert tracker.errorKind == "input"
    assert tracker.failureReason(2) == "Input volume is not 3D"


def test_failure_reason_without_error_record():
    tracker = ProgressTracker()
    assert "exited with code 7" in tracker.failureReason(7)
    tracker.feed("Traceback (most recent call last):")
    tracker.feed("ModuleNotFoundError: No module named 'semiseg_la'")
    assert "not installed" in tracker.failureReason(1)
    other = ProgressTracker()
    other.feed("RuntimeError: boom")
    assert other.failureReason(1) == "The SemiSegLA core stopped: RuntimeError: boom"
    torchless = ProgressTracker()
    torchless.feed("ModuleNotFoundError: No module named 'torch'")
    assert "PyTorch Utils" in torchless.failureReason(1)


def test_log_records_are_notices_and_cpu_fallback_is_flagged():
    tracker = ProgressTracker()
    tracker.feed(line(stage="log", message="CUDA out of memory: retrying on the CPU"))
    tracker.feed(line(stage="done", output="o.nrrd", device="cpu", fell_back_to_cpu=True, timings={}))
    assert tracker.notices == ["CUDA out of memory: retrying on the CPU"]
    assert tracker.fellBackToCpu


def test_one_line():
    assert oneLine("\n\n  first  \nsecond") == "first"
    assert len(oneLine("x" * 1000)) == 300


def test_state_machine_transitions():
    path = [State.IDLE, State.INITIALIZING, State.SEGMENTING, State.IMPORTING, State.FINISHED]
    for a, b in zip(path, path[1:]):
        checkTransition(a, b)
    checkTransition(State.SEGMENTING, State.SEGMENTING)  # CPU retry after GPU OOM
    checkTransition(State.FINETUNING, State.CANCELLING)
    checkTransition(State.CANCELLING, State.CANCELLED)
    for a, b in [(State.IDLE, State.SEGMENTING), (State.FINISHED, State.IDLE), (State.CANCELLED, State.FAILED),
                 (State.IMPORTING, State.CANCELLING), (State.SEGMENTING, State.FINETUNING)]:
        with pytest.raises(IllegalTransition):
            checkTransition(a, b)


def test_apply_becomes_cancel_and_inputs_are_disabled_while_busy():
    idle = uiState(State.IDLE)
    assert (idle.busy, idle.segmentText, idle.finetuneText, idle.inputsEnabled) == (
        False, SEGMENT_TEXT, FINETUNE_TEXT, True)
    seg = uiState(State.SEGMENTING, "segment")
    assert seg.busy and seg.segmentText == CANCEL_TEXT and seg.segmentEnabled
    assert not seg.finetuneEnabled and not seg.inputsEnabled and seg.progressText == "Segmenting"
    ft = uiState(State.FINETUNING, "finetune")
    assert ft.finetuneText == CANCEL_TEXT and ft.finetuneEnabled and not ft.segmentEnabled
    init = uiState(State.INITIALIZING, "segment")
    assert init.segmentText == CANCEL_TEXT and not init.segmentEnabled  # nothing to kill yet
    cancelling = uiState(State.CANCELLING, "segment")
    assert cancelling.segmentText == "Cancelling..." and not cancelling.segmentEnabled
    for end in (State.FINISHED, State.FAILED, State.CANCELLED):
        view = uiState(end, "segment")
        assert not view.busy and view.segmentText == SEGMENT_TEXT and view.inputsEnabled
        assert view.progressText == end.value


def test_signal_isolates_failing_slots():
    seen = []
    signal = Signal("test")
    signal.connect(lambda x: 1 / 0)
    signal.connect(seen.append)
    signal.connect(seen.append)  # connected once only
    signal.emit(5)
    assert seen == [5]
    signal.disconnect(seen.append)
    signal.emit(6)
    assert seen == [5]
