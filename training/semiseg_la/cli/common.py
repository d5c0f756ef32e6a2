"""Helpers shared by the subcommands: progress flags, devices, model loading."""

from __future__ import annotations

import argparse
import time
from typing import Tuple

from ..progress import ProgressReporter, make_reporter

#: when this command began (this module is imported as the command line is parsed): time budgets count
#: the whole command from here
COMMAND_STARTED = time.monotonic()


def command_seconds() -> float:
    return time.monotonic() - COMMAND_STARTED


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=("tqdm", "json", "none"), default="tqdm",
                        help="tqdm bars for people, JSON lines for the Slicer module, or nothing")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = the GPU when one is visible, else the CPU")


def add_tta_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tta", choices=("auto", "none", "mirror", "flip"), default="auto",
                        help="test-time augmentation. flip: average the 4 in-plane flips (4 network passes; "
                             "+2.8 Dice points on the validation split, docs/results.md); mirror: the left-right "
                             "flip alone (2 passes; +2.6 points); none: one pass, for speed. auto (default): "
                             "flip, or none with --legacy (the papers' procedure)")


def tta_choice(args: argparse.Namespace) -> str:
    """The test-time augmentation to run: --tta, with auto resolved (the papers' legacy inference has none)."""
    chosen = getattr(args, "tta", "auto")
    if chosen != "auto":
        return chosen
    return "none" if getattr(args, "legacy", False) else "flip"


def reporter_for(args: argparse.Namespace) -> ProgressReporter:
    return make_reporter(getattr(args, "progress", "tqdm"))


def load_catalog_model(model: str | None, device: str = "cpu") -> Tuple[object, object, str]:
    """(network, card, model_id) for a catalog id, a model folder, or the default model."""
    from ..checkpoints import load_network, resolve_model

    folder = resolve_model(model)
    network, card = load_network(folder, device="cpu")
    return network, card, card_get(card, "id")


def card_get(card, key: str, default=None):
    """Cards are dataclasses or mappings; read a top-level field either way."""
    if isinstance(card, dict):
        return card.get(key, default)
    return getattr(card, key, default)


def inference_spec(card):
    from ..inference.predictor import InferenceSpec

    info = card_get(card, "inference") or {}
    reference = info.get("intensity_reference")
    return InferenceSpec(tuple(int(p) for p in info["patch_size"]), tuple(float(s) for s in info["spacing"]),
                         normalization=info.get("normalization", "zscore-volume"),
                         intensity_reference=tuple(float(v) for v in reference) if reference is not None else None)
