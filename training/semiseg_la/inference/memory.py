"""GPU out-of-memory fallback shared by `segment`, training-time validation and the export's evaluation.

On CUDA out-of-memory the same work is tried again with less on the GPU: first training-size sliding windows
with the accumulation on the CPU (the whole-volume window is what most often does not fit), then the CPU.
The failed attempt's tensors are released (its traceback dropped) before the CUDA cache is emptied.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Callable, List, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Attempt:
    """Where and how one inference try runs (the arguments of a Predictor that differ between tries)."""

    device: str
    accumulate_on_cpu: bool
    mode: str

    def describe(self) -> str:
        if self.device == "cpu":
            return "on the CPU"
        return "on the GPU with training-size windows, accumulating on the CPU" if self.accumulate_on_cpu else \
            "on the GPU"


def attempts_for(device: str, mode: str) -> List[Attempt]:
    """The ladder for a requested device and mode; a CPU run has nothing to fall back to."""
    first = Attempt(device, False, mode)
    if device == "cpu" or not torch.cuda.is_available():
        return [first]
    return [first, Attempt("cuda", True, "legacy" if mode == "legacy" else "sliding"), Attempt("cpu", False, mode)]


def run_with_memory_fallback(work: Callable[[Attempt], T], ladder: List[Attempt],
                             log: Optional[Callable[[str], None]] = None) -> Tuple[T, int]:
    """(result, index of the attempt that worked) of `work` on the first attempt of `ladder` that fits; the
    last attempt's out-of-memory error propagates."""
    for index, attempt in enumerate(ladder):
        out_of_memory = False
        try:
            return work(attempt), index
        except torch.cuda.OutOfMemoryError:
            if index + 1 == len(ladder):
                raise
            out_of_memory = True
        if out_of_memory:  # outside the handler: the traceback (and the tensors its frames hold) is gone
            gc.collect()
            torch.cuda.empty_cache()
            if log is not None:
                log(f"CUDA out of memory: retrying {ladder[index + 1].describe()}")
    raise AssertionError("unreachable")


class StickyFallback:
    """Runs many cases through the ladder, starting each where the previous one fitted: after one case had to
    move to the CPU, the next does not fail on the GPU again first."""

    def __init__(self, device: str, mode: str = "fast", log: Optional[Callable[[str], None]] = None) -> None:
        self.ladder = attempts_for(device, mode)
        self.log = log

    def __call__(self, work: Callable[[Attempt], T]) -> T:
        result, index = run_with_memory_fallback(work, self.ladder, self.log)
        self.ladder = self.ladder[index:]
        return result
