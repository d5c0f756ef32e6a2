"""A tiny pure-Python signal: PythonQt crashes on ``qt.Signal`` subclasses defined in Python."""

import logging
from typing import Callable, List


class Signal:
    """Connect callables, emit to all of them in order; a failing slot is logged, never fatal."""

    def __init__(self, name: str = "signal") -> None:
        self.name = name
        self._slots: List[Callable] = []

    def connect(self, slot: Callable) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot: Callable) -> None:
        if slot in self._slots:
            self._slots.remove(slot)

    def disconnectAll(self) -> None:
        self._slots.clear()

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            try:
                slot(*args)
            except Exception:  # a broken GUI slot must not break the job's state machine
                logging.exception("SemiSegLA: slot of %s failed", self.name)
