"""`semiseg-la models [list] | show | import | remove | lineage | presets`."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model catalog: bundled and local models (alone: `models list`)")
    p.set_defaults(handler=run_list, json=False)  # what a user typing `semiseg-la models` wants to see
    msub = p.add_subparsers(dest="models_command")
    ls = msub.add_parser("list", help="list bundled, site and local models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=run_list)
    show = msub.add_parser("show", help="print a model's card")
    show.add_argument("model_id")
    show.set_defaults(handler=run_show)
    imp = msub.add_parser("import", help="import official V-Net weights (.pth, loaded with weights_only=True)")
    imp.add_argument("file")
    imp.add_argument("--id", dest="model_id", default=None)
    imp.add_argument("--method", default="supervised")
    imp.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80))
    imp.add_argument("--spacing", type=float, nargs=3, default=(0.625, 0.625, 0.625))
    imp.set_defaults(handler=run_import)
    rm = msub.add_parser("remove", help="delete a local model (bundled models are immutable)")
    rm.add_argument("model_id")
    rm.set_defaults(handler=run_remove)
    lin = msub.add_parser("lineage", help="the chain from a model to its root ancestor")
    lin.add_argument("model_id")
    lin.set_defaults(handler=run_lineage)
    pre = msub.add_parser("presets", help="training presets")
    pre.add_argument("--json", action="store_true")
    pre.set_defaults(handler=run_presets)


def run_list(args: argparse.Namespace) -> int:
    from ..checkpoints import default_model_id, list_models

    entries = list_models()
    try:
        default = default_model_id()
    except Exception:  # noqa: BLE001 - listing works with no default installed
        default = None
    rows = [dict(_entry_dict(e), default=(_get(e, "id") == default)) for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models installed")
        return 0
    print(f"{'id':40s} {'source':8s} {'method':14s} {'labels':>6s} {'dice':>6s} {'measured on':14s}  parent")
    for r in rows:
        dice = f"{r['dice']:.3f}" if isinstance(r.get("dice"), (int, float)) else "-"
        kind = r.get("dice_kind") if dice != "-" else "-"
        mark = " *" if r["default"] else " (localiser)" if r.get("role") == "localiser" else ""
        line = (f"{r['id'] + mark:40s} {r['source']:8s} {str(r.get('method') or '-'):14s} "
                f"{str(r.get('labeled_cases') or '-'):>6s} {dice:>6s} {str(kind or '-'):14s}  {r.get('parent') or '-'}")
        print(line + (f"  BROKEN: {r['error']}" if r.get("error") else ""))
    return 0


def _get(entry, key):
    return entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)


def _entry_dict(entry) -> dict:
    if isinstance(entry, dict):
        return dict(entry)
    if hasattr(entry, "to_dict"):
        return entry.to_dict()
    import dataclasses

    out = dataclasses.asdict(entry)
    return {k: (str(v) if k == "path" else v) for k, v in out.items()}


def run_show(args: argparse.Namespace) -> int:
    from ..checkpoints import ModelCard, resolve_model

    print(ModelCard.load(resolve_model(args.model_id)).to_json(), end="")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..checkpoints import import_pth

    folder = import_pth(args.file, dest_id=args.model_id, method=args.method, patch_size=tuple(args.patch),
                        spacing=tuple(args.spacing))
    print(folder.name)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ..checkpoints import remove_local_model

    remove_local_model(args.model_id)
    print(f"removed {args.model_id}", file=sys.stderr)
    return 0


def run_lineage(args: argparse.Namespace) -> int:
    from ..checkpoints import lineage
    from ..checkpoints.catalog import find_model

    chain = lineage(args.model_id)
    # the chain stops at an ancestor that is not installed (a card names its parent, the parent may be gone)
    named = chain[:1] + [f"{m} (not installed)" if find_model(m) is None else m for m in chain[1:]]
    print(" <- ".join(named))
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from ..engine.config import load_preset, preset_names

    rows = [{"name": n, "method": load_preset(n).get("method")} for n in preset_names()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:24s} {r['method']}")
    return 0
