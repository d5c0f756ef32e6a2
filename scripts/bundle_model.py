"""Copy a local catalog model into the package's bundled catalog as fp16 and make it the default.

    python scripts/bundle_model.py MODEL_ID --data ../shared/data/LA [--note TEXT] [--no-default]
                                   [--validation-from RUN_MODEL_ID]

A model whose card says role "localiser" becomes the bundled localiser (`default.json`'s "localiser") instead.

The validation figures on the card are re-measured with the fp16 weights that ship (same validation
split as the run: the card's `validation.cases`), so the card describes exactly what users get.

A final model trained on every labelled case has no validation split of its own. `--validation-from` names
the model of its validation run (the same recipe with the validation cases held out): that model's figures,
re-measured in fp16 as above, go on the card as a "validation run" figure that names where they come from.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from semiseg_la.checkpoints import ModelCard, load_model_weights, load_network, resolve_model, save_model
from semiseg_la.checkpoints.catalog import BUNDLED_DIR
from semiseg_la.cli.export import evaluate_records, with_card_inputs
from semiseg_la.engine.config import TrainConfig
from semiseg_la.io.atomic import atomic_write_json
from semiseg_la.io.datasets import open_dataset
from semiseg_la.progress import TqdmProgress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_id")
    parser.add_argument("--data", required=True, help="the LA root the model was validated on")
    parser.add_argument("--note", default=None, help="an honest note on how the model was made")
    parser.add_argument("--no-default", action="store_true")
    parser.add_argument("--validation-from", default=None,
                        help="for a model trained on every labelled case: the model of its validation run")
    args = parser.parse_args()
    weights, card = load_model_weights(resolve_model(args.model_id))
    card_dict = card.to_dict()
    target = Path(BUNDLED_DIR) / card.id
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / card.id
        save_model(staged, weights, ModelCard.coerce(card_dict), dtype="float16")
        network, staged_card = load_network(staged)
        if args.validation_from:
            validation = validation_run_figures(args.validation_from, args.data, tmp)
        else:
            validation = measure(network, staged_card, card, args.data)
        card_dict["validation"] = validation
        if args.note:
            card_dict.setdefault("training", {})["note"] = args.note
        save_model(target, weights, ModelCard.coerce(card_dict), dtype="float16")
    if not args.no_default:
        default_file = Path(BUNDLED_DIR) / "default.json"
        defaults = json.loads(default_file.read_text()) if default_file.is_file() else {}
        defaults["localiser" if card.extra.get("role") == "localiser" else "default"] = card.id
        atomic_write_json(default_file, defaults)
    print(json.dumps({k: validation.get(k) for k in ("dice", "jaccard", "hd95_mm", "asd_mm")}, indent=2))
    print(f"bundled {card.id} at {target}")


def measure(network, staged_card: ModelCard, card: ModelCard, data: str) -> dict:
    """The card's validation figures re-measured with the shipped (fp16) weights, on the card's own cases."""
    ids = list((card.validation or {}).get("cases", {}))
    records = [r for r in open_dataset(data, "train.list") if r.case_id in ids]
    config = with_card_inputs(TrainConfig(device="cpu"), staged_card)  # its normalisation too
    validation = evaluate_records(network, config, records, TqdmProgress())
    validation["checkpoint"] = (card.validation or {}).get("checkpoint")
    validation["weights"] = "float16 (as shipped)"
    return validation


def validation_run_figures(run_model_id: str, data: str, tmp: str) -> dict:
    """The validation run's figures (its model in fp16, on its validation cases), marked as such."""
    weights, run_card = load_model_weights(resolve_model(run_model_id))
    if not (run_card.validation or {}).get("cases"):
        raise SystemExit(f"{run_model_id} has no validation cases to take figures from")
    staged = Path(tmp) / f"validation-run-{run_card.id}"
    save_model(staged, weights, run_card, dtype="float16")
    network, staged_card = load_network(staged)
    validation = measure(network, staged_card, run_card, data)
    validation["figure"] = "validation run"
    validation["validation_run"] = run_card.id
    validation["from"] = (f"{run_card.id}: the same recipe with these cases held out; this model was trained on "
                          "every labelled case, these included, so its own figure on them would be a training fit")
    return validation


if __name__ == "__main__":
    main()
