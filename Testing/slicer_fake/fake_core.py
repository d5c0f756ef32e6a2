"""A stand-in for the core's CLI (``python -m semiseg_la.cli.main``) that speaks its protocol.

Used by the Slicer-side tests until (and besides) the real core: same sub-commands, same arguments, same
JSON-lines progress. Behaviour switches come from the environment:

``SEMISEG_FAKE_MODE`` (comma-separated):
  slow            many slow steps (for cancel tests)
  grandchild      start a sleeping grandchild process; pids go to ``SEMISEG_FAKE_PIDFILE``
  fail-input      an ``error`` record of kind "input", exit 2
  crash           a Python traceback on stderr and exit 1, no ``error`` record
  oom-fallback    on a GPU device: a ``log`` record about CUDA OOM, then ``done`` with fell_back_to_cpu
  oom-error       on a GPU device (CUDA_VISIBLE_DEVICES != -1): ``error`` kind "oom", exit 3
  no-done         exit 0 without a ``done`` record
  bad-geometry    write the label with another spacing
  empty           write an all-zero label
  noise           interleave warnings and non-JSON text
  no-presets      ``models presets`` is an unknown command (as in an older core)
  guard-worse     ``finetune`` ends with the core's parent/child check saying the child is worse
  bad-agreement-grid  ``finetune`` keeps the parent's label of a compared scan on another spacing
  left-out        ``finetune`` leaves the first unlabelled scan out as unusable (a 2D image), as the core does
  slow-list       ``models list`` takes a second (for the background-call tests)
  localiser       ``--region auto`` finds a box (the middle half of each axis), as the core's localiser does
                  on a whole scan; without it, auto segments the whole image, as the core does for an image no
                  larger than an atrium crop
  no-atrium       ``--region auto``: the core's RegionError (a ``region`` error record, exit 5)
  two-candidates  ``--region auto``: the core's warning that two atrium-like regions were found
  uncertain       ``--region auto`` with a box found: the result and the first pass that settled its region differ
                  (Dice 0.62): the core's warning, and with ``--first-pass-out`` that pass's label (half the
                  result's box, a parent's id when the model records one)
  bad-first-pass-grid  ``--first-pass-out`` written with another spacing
``SEMISEG_FAKE_CALLS``: a file where every invocation appends {"argv", "cuda_visible_devices"}.
``SEMISEG_LA_HOME``: where local models live (``models/<id>/card.json``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone

MODES = set(filter(None, os.environ.get("SEMISEG_FAKE_MODE", "").split(",")))

BUNDLED = [
    {"id": "la-caml-v1.0.0", "source": "bundled", "path": "/bundled/la-caml-v1.0.0", "method": "caml",
     "labeled_cases": 16, "dice": 0.912, "parent": None, "created": "2025-01-01"},
    {"id": "la-meanteacher-v1.0.0", "source": "bundled", "path": "/bundled/la-meanteacher-v1.0.0",
     "method": "mean_teacher", "labeled_cases": 8, "dice": 0.87, "parent": None, "created": "2025-01-01"},
]


def emit(record):
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def home():
    root = os.environ.get("SEMISEG_LA_HOME") or os.path.join(os.path.expanduser("~"), ".semiseg_la")
    return os.path.join(root, "models")


def local_models():
    entries = []
    if os.path.isdir(home()):
        for name in sorted(os.listdir(home())):
            card = os.path.join(home(), name, "card.json")
            if os.path.isfile(card):
                with open(card, encoding="utf-8") as f:
                    entry = json.load(f)
                entry.update({"source": "local", "path": os.path.join(home(), name)})
                entries.append(entry)
    return entries


def record_call():
    path = os.environ.get("SEMISEG_FAKE_CALLS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": sys.argv[1:],
                                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")


def on_gpu(device):
    return device != "cpu" and os.environ.get("CUDA_VISIBLE_DEVICES") != "-1"


def common_failures(device):
    if "grandchild" in MODES:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        pidfile = os.environ.get("SEMISEG_FAKE_PIDFILE")
        if pidfile:
            with open(pidfile, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {child.pid}\n")
    if "noise" in MODES:
        print("UserWarning: this is a plain warning line")
        print("{not json at all")
    if "fail-input" in MODES:
        emit({"stage": "error", "message": "Input volume is not 3D: size (64, 64)\nsecond line", "kind": "input"})
        sys.exit(2)
    if "crash" in MODES:
        sys.stderr.write("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                         "RuntimeError: something deep broke\n")
        sys.exit(1)
    if "oom-error" in MODES and on_gpu(device):
        emit({"stage": "error", "message": "CUDA out of memory. Tried to allocate 2.00 GiB", "kind": "oom"})
        sys.exit(3)


NOT_FOUND_HINT = "give a region with --region"  # semiseg_la.inference.localise.NOT_FOUND_HINT


def choose_region(args, image):
    """(source, box, warnings, found mL) as semiseg_la.cli.segment.choose_region decides them."""
    size = list(image.GetSize())  # i, j, k
    words = args.region or ["auto"]
    if words == ["whole"]:
        return "whole", [0, 0, 0] + size, [], None
    if words != ["auto"]:
        box = [int(w) for w in words]  # the core: six integers, upper bounds exclusive, inside the image
        if len(box) != 6 or any(lo < 0 or hi > n or lo >= hi for lo, hi, n in zip(box[:3], box[3:], size)):
            emit({"stage": "error", "message": f"region {box} is outside the image of size {tuple(size)} or empty",
                  "kind": "input"})
            sys.exit(2)
        return "box", box, [], None
    if "no-atrium" in MODES:
        emit({"stage": "error", "message": f"{args.input}: no left atrium found; {NOT_FOUND_HINT}", "kind": "region"})
        sys.exit(5)
    if "localiser" not in MODES and "two-candidates" not in MODES:
        emit({"stage": "log", "message": "region: the whole image (15 x 16 x 30 mm is no larger than an atrium crop)"})
        return "whole", [0, 0, 0] + size, [], None
    box = [n // 4 for n in size] + [n - n // 4 for n in size]
    warnings = []
    if "two-candidates" in MODES:
        warnings.append("2 atrium-like regions found; segmented the largest. If it is not the left atrium, "
                        + NOT_FOUND_HINT)
    emit({"stage": "log", "message": f"region (auto, localiser fake-localiser-v0.0.1): voxels {box}, found atrium "
                                     "52 mL, 0.31 s"})
    return "auto", box, warnings, 52.0


def cmd_segment(args):
    import numpy as np
    import SimpleITK as sitk

    common_failures(args.device)
    steps = 200 if "slow" in MODES else 4
    delay = 0.05 if "slow" in MODES else 0.0
    emit({"stage": "load", "step": 0, "total": 1, "eta_s": None, "message": os.path.basename(args.input)})
    image = sitk.ReadImage(args.input)
    emit({"stage": "load", "step": 1, "total": 1, "eta_s": 0.0})
    source, box, warnings, found_ml = choose_region(args, image)
    emit({"stage": "preprocess", "step": 1, "total": 1, "eta_s": 0.0})
    fell_back = False
    device = "cuda" if on_gpu(args.device) else "cpu"
    if "oom-fallback" in MODES and device == "cuda":
        emit({"stage": "log", "message": "CUDA out of memory: retrying on the CPU"})
        device, fell_back = "cpu", True
    for step in range(1, steps + 1):
        time.sleep(delay)
        emit({"stage": "predict", "step": step, "total": steps, "eta_s": round((steps - step) * delay, 2)})
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    label = (array > array.mean() + array.std()).astype(np.uint8)
    if "empty" in MODES:
        label[:] = 0
    inside = np.zeros_like(label)  # the core segments inside the region only (array order k, j, i)
    inside[box[2]:box[5], box[1]:box[4], box[0]:box[3]] = 1
    label *= inside
    out = sitk.GetImageFromArray(label)
    out.CopyInformation(image)
    if "bad-geometry" in MODES:
        out.SetSpacing([s * 2 for s in image.GetSpacing()])
    emit({"stage": "postprocess", "step": 1, "total": 1, "eta_s": 0.0})
    sitk.WriteImage(out, args.output, useCompression=False)
    first_pass = None
    if source == "auto" and box != [0, 0, 0] + list(image.GetSize()):  # a box found: settled on a first pass
        agreement = 0.62 if "uncertain" in MODES else 0.95
        if "uncertain" in MODES:
            warnings.append(f"the result is uncertain on this scan: a single pass of the model and its result with "
                            f"test-time flips differ (Dice {agreement:.2f} between the two), and such results were "
                            "poor at simulated sites; check it before use")
        if args.first_pass_out:
            first_pass = write_first_pass(args.first_pass_out, label, image, box, args.model, agreement)
    emit({"stage": "write", "step": 1, "total": 1, "eta_s": 0.0})
    if "no-done" in MODES:
        return 0
    for warning in warnings:
        emit({"stage": "log", "message": "warning: " + warning})
    region = {"source": source, "box": box, "candidates": 2 if warnings else 1, "warnings": warnings,
              # the LPS positions of the first and last voxel centres (semiseg_la.inference.localise.Region.to_dict)
              "corners_lps_mm": [list(image.TransformIndexToPhysicalPoint(box[:3])),
                                 list(image.TransformIndexToPhysicalPoint([v - 1 for v in box[3:]]))]}
    if found_ml is not None:
        region["found_volume_ml"] = found_ml
    if args.roi_out:
        with open(args.roi_out, "w", encoding="utf-8") as f:
            json.dump({"input": args.input, **region}, f)
    emit({"stage": "done", "output": args.output, "device": device, "fell_back_to_cpu": fell_back,
          "timings": {"total_s": 0.1}, "region": region, "warnings": warnings, "first_pass": first_pass})
    return 0


def write_first_pass(path, label, image, box, model, agreement):
    """The core's ``--first-pass-out`` (cli/segment.py write_first_pass): the first pass's label on the input's grid
    (here the result in the first half of the box along i), and its ``done`` record."""
    import SimpleITK as sitk

    first = label.copy()
    first[:, :, (box[0] + box[3]) // 2:] = 0
    out = sitk.GetImageFromArray(first)
    out.CopyInformation(image)
    if "bad-first-pass-grid" in MODES:
        out.SetSpacing([s * 2 for s in image.GetSpacing()])
    sitk.WriteImage(out, path, useCompression=False)
    parent = next((entry.get("parent") for entry in local_models() if entry.get("id") == model), None)
    return {"output": os.path.abspath(path), "model": parent or model or "fake-default", "agreement": agreement,
            "uncertain": agreement < 0.85}


def check_dataset(data_dir, unlabeled_dir):
    import numpy as np
    import SimpleITK as sitk

    with open(os.path.join(data_dir, "dataset.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["channel_names"] == {"0": "LGE-MRI"}, meta
    assert meta["labels"] == {"background": 0, "left_atrium": 1}, meta
    assert meta["file_ending"] == ".nrrd", meta
    images = sorted(os.listdir(os.path.join(data_dir, "imagesTr")))
    assert len(images) == meta["numTraining"], (images, meta)
    for name in images:
        assert name.endswith("_0000.nrrd"), name
        case = name[: -len("_0000.nrrd")]
        image = sitk.ReadImage(os.path.join(data_dir, "imagesTr", name))
        label = sitk.ReadImage(os.path.join(data_dir, "labelsTr", case + ".nrrd"))
        if label.GetPixelID() != sitk.sitkUInt8:
            raise ValueError(f"{case}: label is {label.GetPixelIDTypeAsString()}, not uint8")
        if (label.GetSize() != image.GetSize()
                or not np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-6)
                or not np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-6)
                or not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)):
            raise ValueError(f"{case}: label grid differs from the image grid")
        values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
        if not values <= {0, 1} or 1 not in values:
            raise ValueError(f"{case}: label values {sorted(values)}")
    unlabeled = sorted(os.listdir(unlabeled_dir)) if unlabeled_dir else []
    return len(images), len(unlabeled)


def cmd_finetune(args):
    common_failures(args.device)
    try:
        labeled, unlabeled = check_dataset(args.data, args.unlabeled)
    except (OSError, ValueError, AssertionError, KeyError) as exc:
        emit({"stage": "error", "message": f"Bad dataset: {exc}", "kind": "input"})
        return 2
    known = {e["id"] for e in BUNDLED + local_models()}
    if args.base not in known:
        emit({"stage": "error", "message": f"Unknown model '{args.base}'", "kind": "checkpoint"})
        return 3
    total = args.iterations or 6
    delay = 0.05 if "slow" in MODES else 0.0
    if "slow" in MODES:
        total = max(total, 200)
    # the core's budget plan, logged before training (semiseg_la.engine.budget)
    emit({"stage": "log", "message": f"time estimate on CPU, 2 threads: 0.01 s per iteration; "
                                     f"{total} iterations fit in the 600 s budget"})
    for step in range(1, total + 1):
        time.sleep(delay)
        emit({"stage": "train", "step": step, "total": total, "eta_s": (total - step) * delay,
              "loss": 1.0 / step})
        if step % 3 == 0:
            emit({"stage": "validate", "step": step, "total": total, "dice": 0.5 + step / (10.0 * total)})
    os.makedirs(os.path.join("runs", "finetune"), exist_ok=True)  # relative to the cwd, as the core does
    model_id = f"{args.name or 'finetuned'}-v0.0.{len(local_models()) + 1}"
    folder = os.path.join(home(), model_id)
    os.makedirs(folder, exist_ok=True)
    held_out = 1 if labeled >= 3 else 0  # the core holds one labelled case out from 3 on
    card = {"id": model_id, "method": args.method, "labeled_cases": labeled - held_out,
            "unlabeled_cases": unlabeled, "dice": 0.8, "dice_kind": "site hold-out" if held_out else "training fit",
            "parent": args.base, "created": datetime.now(timezone.utc).isoformat()}
    with open(os.path.join(folder, "card.json"), "w", encoding="utf-8") as f:
        json.dump(card, f)
    if "no-done" in MODES:
        return 0
    worse = "guard-worse" in MODES
    guard = {"verdict": "worse" if worse else ("better or equal" if held_out else "unchecked: fewer than 3"),
             "parent": args.base, "parent_dice": 0.85 if held_out or worse else None,
             "child_dice": (0.61 if worse else 0.88) if held_out or worse else None,
             "held_out_cases": held_out}
    # the core's comparison of the new model with its parent on the unlabelled scans (cli/export.py), by file stem
    stems = sorted(os.path.splitext(n)[0] for n in os.listdir(args.unlabeled)) if args.unlabeled else []
    if stems:
        guard["agreement"] = {"cases": [[stem, round(0.60 + 0.15 * i, 2)] for i, stem in enumerate(stems)],
                              "compared": len(stems), "not_compared": 0, "unreadable": {}, "summary": "...",
                              "labels": agreement_labels(args.unlabeled, stems[:3])}
    # the unlabelled scans read and not trained on, and why (cli/train.py load_split): the core's own file first
    left_out = {}
    if stems and "left-out" in MODES:
        left_out[stems[0]] = (f"{os.path.abspath(os.path.join(args.unlabeled, stems[0]))}.nrrd: invalid image: image "
                              "is 2D (shape (256, 256)); a 3D scalar image is required")
    emit({"stage": "done", "model_id": model_id, "model_dir": folder, "validation": {"dice": 0.8}, "guard": guard,
          "left_out_unlabeled": left_out})
    return 0


def agreement_labels(unlabeled_dir, stems):
    """Both models' labels of the scans of lowest agreement, as the core keeps them (cli/export.py AgreementLabels):
    absolute paths in the run folder, on each scan's grid (mode bad-agreement-grid: the parent's on another)."""
    import numpy as np
    import SimpleITK as sitk

    folder = os.path.abspath(os.path.join("runs", "finetune", "agreement"))
    os.makedirs(folder, exist_ok=True)
    labels = {}
    for stem in stems:
        image = sitk.ReadImage(os.path.join(unlabeled_dir, stem + ".nrrd"))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        labels[stem] = {}
        for which, cut in (("new", array.mean() + array.std()), ("parent", array.mean() + 2 * array.std())):
            label = sitk.GetImageFromArray((array > cut).astype(np.uint8))
            label.CopyInformation(image)
            if which == "parent" and "bad-agreement-grid" in MODES:
                label.SetSpacing([s * 2 for s in image.GetSpacing()])
            labels[stem][which] = os.path.join(folder, f"{stem}_{which}.nrrd")
            sitk.WriteImage(label, labels[stem][which], useCompression=True)
    return labels


def cmd_models(args):
    if args.action == "list":
        if "slow-list" in MODES:
            time.sleep(1.0)
        print(json.dumps(BUNDLED + local_models()))
        return 0
    if args.action == "presets":
        if "no-presets" in MODES:
            sys.stderr.write("semiseg-la models: error: invalid choice: 'presets'\n")
            return 2
        print(json.dumps([{"name": "caml-la-16", "method": "caml"}, {"name": "finetune", "method": "mean_teacher"},
                          {"name": "crln-la-8", "method": "crln"}], indent=2))
        return 0
    if args.action == "remove":
        if any(e["id"] == args.target for e in BUNDLED):
            sys.stderr.write(f"error: {args.target} is a bundled model and cannot be removed\n")
            return 2
        folder = os.path.join(home(), args.target)
        if not os.path.isdir(folder):
            sys.stderr.write(f"error: no local model '{args.target}'\n")
            return 2
        shutil.rmtree(folder)
        return 0
    if args.action == "import":
        if not os.path.isfile(args.target):
            sys.stderr.write(f"error: {args.target}: no such file\n")
            return 2
        stem = os.path.splitext(os.path.basename(args.target))[0]
        model_id = f"imported-{stem}-v0.0.1"
        os.makedirs(os.path.join(home(), model_id), exist_ok=True)
        with open(os.path.join(home(), model_id, "card.json"), "w", encoding="utf-8") as f:
            json.dump({"id": model_id, "method": "caml", "labeled_cases": None, "dice": None, "parent": None,
                       "created": "2025-06-01"}, f)
        print("Imported checkpoint (weights_only)")
        print(model_id)
        return 0
    return 2


def main(argv=None):
    record_call()
    parser = argparse.ArgumentParser(prog="semiseg-la")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment")
    seg.add_argument("input")
    seg.add_argument("-o", "--output", required=True)
    seg.add_argument("--model")
    seg.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    seg.add_argument("--overlap", type=float)
    seg.add_argument("--region", nargs="+", default=["auto"])
    seg.add_argument("--roi-out")
    seg.add_argument("--first-pass-out")
    seg.add_argument("--progress", default="tqdm")
    ft = sub.add_parser("finetune")
    ft.add_argument("--from", dest="base", required=True)
    ft.add_argument("--data", required=True)
    ft.add_argument("--unlabeled")
    ft.add_argument("--method", required=True, choices=["supervised", "mean_teacher", "caml", "crln", "semicml"])
    ft.add_argument("--iterations", type=int)
    ft.add_argument("--time-budget", type=float)
    ft.add_argument("--name")
    ft.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ft.add_argument("--progress", default="tqdm")
    models = sub.add_parser("models")
    models.add_argument("action", choices=["list", "remove", "import", "presets"])
    models.add_argument("target", nargs="?")
    models.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "segment":
        return cmd_segment(args)
    if args.command == "finetune":
        return cmd_finetune(args)
    return cmd_models(args)


if __name__ == "__main__":
    sys.exit(main())
