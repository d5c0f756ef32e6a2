"""Helpers shared by the subcommands: progress flags, devices, model loading."""

from __future__ import annotations

import argparse
import time
from typing import Optional, Tuple

from ..progress import ProgressReporter, make_reporter

#: when this command began (this module is imported as the command line is parsed): time budgets count
#: the whole command from here
COMMAND_STARTED = time.monotonic()


def command_seconds() -> float:
    return time.monotonic() - COMMAND_STARTED


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=("tqdm", "json", "none"), default="tqdm",
                        help="tqdm bars for people, JSON lines for the Slicer module, or none: no bars (for a log "
                             "file; messages, warnings and errors still go to stderr)")


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


def trains_on_regions(config) -> bool:
    """Whether a training configuration (a TrainConfig or a card's `training.config`) teaches segmenting in
    regions of many sizes (whole-scan canvases, or several cuts of each labelled scan), so that the model can
    settle its own automatic region."""
    def get(key: str, default):
        value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
        return default if value is None else value

    return float(get("wide_fov_prob", 0.0)) > 0 or int(get("labelled_cuts", 1)) > 1


def trained_on_regions(card) -> bool:
    return trains_on_regions((card_get(card, "training") or {}).get("config") or {})


def region_settler(card):
    """(network, card, id) of the model whose first pass settles this model's `--region auto` region, or None
    when it settles its own. A site fine-tune learns a few scans cut in one region each and can settle regions
    worse than the model it came from (in its parent's settled region the fine-tunes of three simulated sites
    scored 0.31 Dice points more on whole scans on average, −0.9 to +1.6, and two unshifted scans they had
    over-segmented were segmented as the parent segments them; docs/results.md). So a model not trained on
    regions hands the settling to its nearest ancestor that was: the one its card names (`lineage.region_settler`,
    recorded at the fine-tune, so that removing a model between the two changes nothing), else the one a walk
    up its lineage finds (cards written before that record)."""
    if trained_on_regions(card):
        return None
    lineage = card_get(card, "lineage") or {}
    recorded = lineage.get("region_settler") or {}
    found = _installed(recorded.get("id"), recorded.get("sha256")) if recorded.get("id") else None
    if found is None or not trained_on_regions(found[1]):
        found = settler_folder(lineage.get("parent"), lineage.get("parent_sha256"))
    return _loaded(found) if found is not None else None


def ancestor_trained_on_regions(parent_id: Optional[str], recorded_sha256: Optional[str]):
    """(network, card, id) of the first model up a lineage, from `parent_id`, that was trained on regions; None
    when the walk meets a parent that is not installed, or whose weights are not the ones recorded."""
    found = settler_folder(parent_id, recorded_sha256)
    return _loaded(found) if found is not None else None


def settler_folder(parent_id: Optional[str], recorded_sha256: Optional[str], max_depth: int = 16):
    """(folder, card) of `ancestor_trained_on_regions`, without loading its weights (a fine-tune records which it
    is in its card)."""
    for _ in range(max_depth):
        found = _installed(parent_id, recorded_sha256) if parent_id else None
        if found is None:
            return None
        if trained_on_regions(found[1]):
            return found
        lineage = found[1].lineage or {}
        parent_id, recorded_sha256 = lineage.get("parent"), lineage.get("parent_sha256")
    return None


def _installed(model_id: str, recorded_sha256: Optional[str]):
    """(folder, card) of an installed model whose weights are the ones recorded (any, when none is); else None."""
    from ..checkpoints import ModelCard, resolve_model
    from ..checkpoints.card import weights_fingerprint
    from ..errors import CheckpointError

    try:
        folder = resolve_model(str(model_id))
        card = ModelCard.load(folder)
    except CheckpointError:
        return None
    if recorded_sha256 and weights_fingerprint(card) != recorded_sha256:
        return None
    return folder, card


def _loaded(found):
    from ..checkpoints import load_network

    network, card = load_network(found[0], device="cpu")
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
