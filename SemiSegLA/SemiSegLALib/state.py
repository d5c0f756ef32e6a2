"""The run state machine and what the panel shows in each state (Apply becomes Cancel).

Idle -> Initializing -> Segmenting | FineTuning -> Importing -> Finished
                                   \\-> Cancelling -> Cancelled
                 any running state  -> Failed
"""

import enum
from typing import Dict, FrozenSet, Optional


class State(enum.Enum):
    IDLE = "Idle"
    INITIALIZING = "Initializing"
    SEGMENTING = "Segmenting"
    FINETUNING = "Fine-tuning"
    IMPORTING = "Importing"
    CANCELLING = "Cancelling"
    FINISHED = "Finished"
    CANCELLED = "Cancelled"
    FAILED = "Failed"


TRANSITIONS: Dict[State, FrozenSet[State]] = {
    State.IDLE: frozenset({State.INITIALIZING}),
    State.INITIALIZING: frozenset({State.SEGMENTING, State.FINETUNING, State.CANCELLING, State.FAILED}),
    # SEGMENTING -> SEGMENTING: the job restarts on the CPU after a GPU out-of-memory error
    State.SEGMENTING: frozenset({State.SEGMENTING, State.IMPORTING, State.CANCELLING, State.FAILED}),
    State.FINETUNING: frozenset({State.FINETUNING, State.IMPORTING, State.CANCELLING, State.FAILED}),
    State.IMPORTING: frozenset({State.FINISHED, State.FAILED}),
    State.CANCELLING: frozenset({State.CANCELLED, State.FAILED}),
    State.FINISHED: frozenset(),
    State.CANCELLED: frozenset(),
    State.FAILED: frozenset(),
}

BUSY_STATES = frozenset({State.INITIALIZING, State.SEGMENTING, State.FINETUNING, State.IMPORTING,
                         State.CANCELLING})
TERMINAL_STATES = frozenset({State.FINISHED, State.CANCELLED, State.FAILED})

SEGMENT_TEXT = "Segment atrium"
FINETUNE_TEXT = "Fine-tune semi-supervised"
CANCEL_TEXT = "Cancel"
CANCELLING_TEXT = "Cancelling..."


class IllegalTransition(RuntimeError):
    pass


def checkTransition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"SemiSegLA: no transition from {current.value} to {new.value}")


class UiState:
    """What the widget renders for a state: button texts, what is enabled, the progress-bar text."""

    def __init__(self, busy: bool, segmentText: str, segmentEnabled: bool, finetuneText: str,
                 finetuneEnabled: bool, inputsEnabled: bool, progressText: str) -> None:
        self.busy = busy
        self.segmentText = segmentText
        self.segmentEnabled = segmentEnabled
        self.finetuneText = finetuneText
        self.finetuneEnabled = finetuneEnabled
        self.inputsEnabled = inputsEnabled
        self.progressText = progressText

    def __repr__(self) -> str:
        return f"UiState({self.__dict__!r})"


def uiState(state: State, kind: Optional[str] = None) -> UiState:
    """``kind`` is the running job's kind, "segment" or "finetune" (None when idle)."""
    if state not in BUSY_STATES:
        return UiState(False, SEGMENT_TEXT, True, FINETUNE_TEXT, True, True,
                       "" if state is State.IDLE else state.value)
    own = CANCELLING_TEXT if state is State.CANCELLING else CANCEL_TEXT
    # a Cancel button is live while the child runs, and while a fine-tuning dataset is written case by case;
    # writing a segmentation input and importing the result are single main-thread steps
    ownEnabled = state in (State.SEGMENTING, State.FINETUNING) or (state is State.INITIALIZING and kind == "finetune")
    if kind == "finetune":
        return UiState(True, SEGMENT_TEXT, False, own, ownEnabled, False, state.value)
    return UiState(True, own, ownEnabled, FINETUNE_TEXT, False, False, state.value)
