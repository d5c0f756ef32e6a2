"""`semiseg-la segment IN -o OUT`: a label map on the input's exact grid."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError, RegionError
from ..inference.localise import Localiser, Region, check_plausible_volume, settle_region, whole_region
from ..inference.memory import Attempt, attempts_for, run_with_memory_fallback
from ..inference.predictor import Predictor, combine_networks
from ..io.atomic import atomic_write_json
from ..io.validate import validate_image
from ..io.volume import read_volume, write_volume
from ..metrics import dice
from ..preprocess.wide_fov import AUTO_WHOLE_MAX_MM, is_whole_scan, patch_mm
from ..progress import ProgressReporter
from .common import (
    add_device_flag,
    add_progress_flag,
    add_tta_flag,
    inference_spec,
    load_catalog_model,
    region_settler,
    reporter_for,
    tta_choice,
)

#: below this Dice between the label `segment` gives and the first pass that settled its region it warns (measured on
#: whole scans at simulated scanner sites: docs/results.md, "When the first pass and the result differ")
SCOUT_AGREEMENT_WARN = 0.85


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment the left atrium in a scan (NRRD, NIfTI, MHA, DICOM folder)")
    p.add_argument("input", help="image file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="label map to write (.nrrd, .nii.gz, .mha)")
    p.add_argument("--model", default=None, help="catalog id or model folder (default: the catalog's default)")
    add_device_flag(p)
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--mode", choices=("fast", "sliding"), default="fast",
                   help="fast: one whole-volume window when it fits (default); sliding: training-size windows")
    p.add_argument("--legacy", action="store_true",
                   help="the LA papers' procedure: stride 18/18/4 windows, uniform averaging (slow; comparison)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per network pass")
    p.add_argument("--region", nargs="+", default=["auto"], metavar="auto|whole|X0 Y0 Z0 X1 Y1 Z1",
                   help="where to segment: auto (default: a localiser finds the atrium in a whole scan; images no "
                        f"larger than an atrium crop, {AUTO_WHOLE_MAX_MM:g} mm a side, are segmented whole), whole "
                        "(the whole volume), or a voxel box of the input (upper bounds exclusive)")
    p.add_argument("--roi", type=int, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                   help="the same as --region X0 Y0 Z0 X1 Y1 Z1")
    p.add_argument("--roi-out", default=None, help="write the region used (voxel box, LPS corners) as JSON here")
    p.add_argument("--first-pass-out", default=None,
                   help="also write the label of the first pass that settled an automatic region (a site fine-tune's "
                        "ancestor's, else the model's own single pass with flips on), the one `scout_agreement` "
                        "compares with; nothing when there was none")
    p.add_argument("--localiser", default=None,
                   help="localiser model for --region auto (default: the catalog's, $SEMISEG_LA_LOCALISER)")
    add_tta_flag(p)
    p.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                   help="average the probabilities of these catalog models with --model's (same spacing)")
    p.add_argument("--probabilities", default=None, help="also write the foreground probability map here")
    p.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    add_progress_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    reporter = reporter_for(args)
    t0 = time.perf_counter()
    check_output_path(args.output)
    if args.first_pass_out:
        check_output_path(args.first_pass_out)
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap {args.overlap} must be in [0, 1)")
    reporter.start("load", 1)
    image = read_volume(args.input)
    validate_image(image)
    reporter.update(1)
    load_s = time.perf_counter() - t0
    plain, card, model_id = load_catalog_model(args.model)
    spec = inference_spec(card)
    network = with_ensemble_and_tta(plain, spec, args)
    region = choose_region(args, image, spec, reporter)

    def segment_in(chosen: Region, scout: bool = False):
        return predict_with_fallback(plain if scout else network, spec, image, args,
                                     None if chosen.source == "whole" else chosen.box, reporter)

    first_pass = None
    if region.source == "auto":
        scout_in, settler_id = region_scout(card, lambda net, net_spec, chosen: predict_with_fallback(
            net, net_spec, image, args, None if chosen.source == "whole" else chosen.box, reporter), reporter)
        if scout_in is None and network is not plain:
            scout_in = lambda chosen: segment_in(chosen, scout=True)  # noqa: E731
        if scout_in is not None and args.first_pass_out:
            scout_in = first_pass = LastLabel(scout_in)
        region, (prediction, device, fell_back) = segment_automatic(region, image, segment_in, reporter, scout_in)
        region.warnings.extend(filter(None, [scout_disagrees(region, settler_id)]))
        first_pass_record = write_first_pass(first_pass, region, args.first_pass_out, settler_id or model_id,
                                             reporter)
    else:
        prediction, device, fell_back = segment_in(region)
        first_pass_record = write_first_pass(None, region, args.first_pass_out, model_id, reporter)
    warnings = region.warnings + prediction.warnings
    for warning in warnings:
        reporter.log("warning: " + warning)
    region_record = region.to_dict(image)
    if args.roi_out:
        atomic_write_json(args.roi_out, {"input": str(Path(args.input).resolve()), "model": model_id,
                                         **region_record})
    t_write = time.perf_counter()
    reporter.start("write", 1)
    write_volume(prediction.label, args.output)
    if args.probabilities and prediction.probability is not None:
        write_volume(prediction.probability, args.probabilities)
    reporter.update(1)
    reporter.end()
    timings = {"load_s": round(load_s, 3), "localise_s": round(region.seconds, 3),
               "settle_s": round(region.settle_seconds, 3),
               **{k: round(v, 3) for k, v in prediction.timings.items()},
               "write_s": round(time.perf_counter() - t_write, 3), "total_s": round(time.perf_counter() - t0, 3)}
    reporter.log(f"wrote {args.output} ({int(prediction.label.array.sum())} LA voxels, {timings['total_s']} s)")
    reporter.done(output=str(Path(args.output).resolve()), model=model_id, device=device,
                  fell_back_to_cpu=fell_back, voxels=int(prediction.label.array.sum()), timings=timings,
                  region=region_record, warnings=warnings, first_pass=first_pass_record)
    return 0


class LastLabel:
    """A first-pass function (`scout_in`) that keeps the label of its last call: the pass that settled the region
    (`_settled` calls it once per region, the last time for the region kept)."""

    def __init__(self, segment) -> None:
        self.segment, self.label = segment, None

    def __call__(self, chosen: Region):
        result = self.segment(chosen)
        self.label = result[0].label
        return result


def write_first_pass(first_pass: Optional[LastLabel], region: Region, path: Optional[str], model: str,
                     reporter: ProgressReporter) -> Optional[Dict[str, object]]:
    """`--first-pass-out`: the first pass's label on the input's grid, and its record for the `done` line (the
    file, the model that made it, its agreement with the result and whether `segment` warned on it); None, said in
    the log, when no first pass settled the region (a region given, a crop, one pass without flips)."""
    if not path:
        return None
    if first_pass is None or first_pass.label is None or region.scout_agreement is None:
        reporter.log(f"--first-pass-out: nothing written: no first pass settled this region ({region.source})")
        return None
    try:
        write_volume(first_pass.label, path)
    except (OSError, RuntimeError) as exc:  # costs the first pass's file, not the result
        reporter.log(f"--first-pass-out: {path} not written: {exc}")
        return None
    reporter.log(f"wrote {path}: the first pass of {model} (Dice {region.scout_agreement:.2f} with the result)")
    return {"output": str(Path(path).resolve()), "model": model, "agreement": round(region.scout_agreement, 4),
            "uncertain": region.scout_agreement < SCOUT_AGREEMENT_WARN}


def predict_with_fallback(network, spec, image, args, roi, reporter: ProgressReporter):
    """Run on the chosen device, with the out-of-memory ladder of `inference.memory` (GPU, then GPU sliding
    windows accumulating on the CPU, then the CPU): (prediction, device used, whether it fell back to the CPU)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    mode = "legacy" if getattr(args, "legacy", False) else getattr(args, "mode", "fast")

    def attempt(where: Attempt):
        predictor = make_predictor(network, spec, args, where.device, where.accumulate_on_cpu, where.mode)
        return predictor.predict(image, roi=roi, want_probability=bool(args.probabilities), reporter=reporter)

    ladder = attempts_for(device, mode)
    prediction, index = run_with_memory_fallback(attempt, ladder, reporter.log)
    return prediction, prediction.device.split(":")[0], ladder[index].device == "cpu" and index > 0


def make_predictor(network, spec, args, device: str, accumulate_on_cpu: bool, mode: str = "fast") -> Predictor:
    return Predictor(network, spec, device=device, overlap=args.overlap, mode=mode,
                     sw_batch_size=args.sw_batch_size, largest_component=not args.no_largest_component,
                     accumulate_on_cpu=accumulate_on_cpu)


def with_ensemble_and_tta(network, spec, args):
    """The network, averaged with --ensemble members (checked to share the spacing) and --tta flips."""
    members = []
    for model in getattr(args, "ensemble", None) or []:
        member, card, member_id = load_catalog_model(model)
        member_spec = inference_spec(card)
        if tuple(member_spec.spacing) != tuple(spec.spacing):
            raise InputError(f"--ensemble {member_id} works at {member_spec.spacing} mm, the model at "
                             f"{spec.spacing} mm; ensemble members must share the spacing")
        members.append(member)
    return combine_networks(network, members, tta_choice(args))


def check_output_path(path: str) -> None:
    suffixes = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
    if not str(path).lower().endswith(suffixes):
        raise InputError(f"{path}: unknown output format; use one of {', '.join(suffixes)}")


def check_roi(roi, shape) -> List[int]:
    lower, upper = roi[:3], roi[3:]
    if any(lo < 0 or hi > s or lo >= hi for lo, hi, s in zip(lower, upper, shape)):
        raise InputError(f"region {list(roi)} is outside the image of size {tuple(shape)} or empty")
    return [int(v) for v in roi]


def parse_region(args: argparse.Namespace) -> Tuple[str, Optional[List[int]]]:
    """("auto" | "whole" | "box", the box or None) from --region / --roi."""
    words = list(args.region or ["auto"])
    if args.roi:
        if words != ["auto"]:
            raise InputError("give the region once: --region or --roi, not both")
        return "box", list(args.roi)
    if len(words) == 1 and words[0] in ("auto", "whole"):
        return words[0], None
    try:
        box = [int(w) for w in words]
    except ValueError:
        box = []
    if len(box) != 6:
        raise InputError(f"--region {' '.join(words)}: expected auto, whole, or six integers X0 Y0 Z0 X1 Y1 Z1")
    return "box", box


def choose_region(args: argparse.Namespace, image, spec, reporter: ProgressReporter) -> Region:
    """The region to segment; for "auto", the localiser's (see inference/localise.py)."""
    kind, box = parse_region(args)
    if kind == "box":
        box = check_roi(box, image.shape)
        return Region(tuple(box[:3]), tuple(box[3:]), "box")
    if kind == "whole":
        return whole_region(image.shape)
    return auto_region(image, spec, reporter, args.localiser, args.device)


def auto_region(image, spec, reporter: ProgressReporter, localiser_id: Optional[str] = None, device: str = "auto",
                localisers: Optional[Dict[str, Tuple[Localiser, str]]] = None) -> Region:
    """`--region auto`'s first region: the whole image when it is no larger than an atrium crop, else where the
    localiser (`localiser_id`, default the catalog's) finds the atrium, else a whole-scan search.
    `localisers` keeps the loaded localisers across calls (one load for many scans)."""
    extent = physical_extent_mm(image)
    if not is_whole_scan(image.shape, image.spacing):
        region = whole_region(image.shape)
        reporter.log(f"region: the whole image ({' x '.join(f'{e:.0f}' for e in extent)} mm is no larger than "
                     "an atrium crop)")
        return region
    from ..checkpoints.catalog import default_localiser_id

    localiser_id = localiser_id or default_localiser_id()
    if localiser_id is None:
        return search_whole(image, "no localiser model installed")
    reporter.start("localise", 1)
    localisers = {} if localisers is None else localisers
    if localiser_id not in localisers:
        localisers[localiser_id] = load_localiser(localiser_id, device)
    localiser, used = localisers[localiser_id]
    try:
        region = localiser.find(image, min_size_mm=patch_mm(spec.patch_size, spec.spacing))
    except RegionError as exc:
        reporter.log(f"localiser {used}: {exc}")
        return search_whole(image, "the localiser found no atrium")
    reporter.update(1)
    reporter.log(f"region (auto, localiser {used}): voxels {region.box}, found atrium "
                 f"{region.found_volume_ml:.0f} mL, {region.seconds:.2f} s")
    return region


def segment_as_auto(image, spec, predict, reporter: ProgressReporter, device: str = "auto",
                    localisers: Optional[Dict[str, Tuple[Localiser, str]]] = None, scout_predict=None):
    """(region, prediction) of one network as `segment --region auto` gives them: `predict(box or None)` is
    the network's prediction in a voxel box of `image` (None: the whole image); `scout_predict`, when given,
    the first pass that settles the region (a site fine-tune's `region_settler`, as `segment` runs it). How a
    fine-tune's guard rail scores a held-out whole scan, so that it judges the label the user will get.
    RegionError when no plausible atrium is found."""
    region = auto_region(image, spec, reporter, None, device, localisers)
    if region.source != "auto":
        return region, predict(None)

    def segment_in(chosen: Region):
        return (predict(chosen.box),)

    scout_in = (lambda chosen: (scout_predict(chosen.box),)) if scout_predict is not None else None
    region, (prediction,) = segment_automatic(region, image, segment_in, reporter, scout_in)
    return region, prediction


def label_as_segment_gives(image, spec, predict, device: str, localisers: Dict[str, Tuple[Localiser, str]],
                           case_id: str, reporter: ProgressReporter, scout_predict=None):
    """(label array, region) that `segment --region auto` gives (`segment_as_auto`), for scoring it against a
    reference: a fine-tune's guard rail and `evaluate` judge what the user will get, in the region `segment`
    finds, not in one drawn from the reference label (on a shifted site the two differed by up to 17 Dice points
    a case, docs/results.md). No plausible atrium found: an empty label and no region, as the user gets none."""
    try:
        region, prediction = segment_as_auto(image, spec, predict, ProgressReporter(), device, localisers,
                                             scout_predict)
    except RegionError as exc:
        reporter.log(f"{case_id}: no plausible atrium found ({exc.reason}); scored as an empty segmentation")
        return np.zeros(image.shape, np.uint8), None
    return prediction.label.array, region


def region_scout(card, predict_with, reporter: ProgressReporter):
    """(scout, its model id): the first pass that settles a site fine-tune's automatic region, the one-pass
    prediction of the model `common.region_settler` names, as `scout_in` of `segment_automatic`; (None, None) for
    a model that settles its own. `predict_with(network, spec, region)` runs a network in a region."""
    settler = region_settler(card)
    if settler is None:
        return None, None
    network, settler_card, settler_id = settler
    settler_spec = inference_spec(settler_card)
    reporter.log(f"region: settled on the first pass of {settler_id}, the model this one was fine-tuned from")
    return (lambda chosen: predict_with(network, settler_spec, chosen)), settler_id


def scout_disagrees(region: Region, settler_id: Optional[str] = None) -> Optional[str]:
    """A warning when the label given differs from the first pass that settled its region by more than
    SCOUT_AGREEMENT_WARN: a site fine-tune's ancestor (`settler_id`), else the model's own single pass (with
    test-time flips). Of 72 whole-scan results at simulated scanner sites and unshifted, 14 of the 15 this far
    from their first pass scored 0.83 Dice or less against the reference, the other 0.86; on two site draws held out
    from choosing it, all 27 flagged there scored 0.81 or less (docs/results.md). Where a fine-tune's result is
    flagged, its parent's was better about as often as worse: the warning says where to look, not which to keep.
    None when they agree, or when nothing settled the region first."""
    agreement = region.scout_agreement
    if agreement is None or agreement >= SCOUT_AGREEMENT_WARN:
        return None
    if settler_id is not None:
        return (f"this model's result and the first pass of {settler_id}, the model it was fine-tuned from, differ "
                f"on this scan (Dice {agreement:.2f} between the two): check the result where they differ (either "
                f"may be the better one), or segment the scan with {settler_id} as well")
    return (f"the result is uncertain on this scan: a single pass of the model and its result with test-time flips "
            f"differ (Dice {agreement:.2f} between the two), and such results were poor at simulated sites; check it "
            "before use")


def segment_automatic(region: Region, image, segment_in, reporter: ProgressReporter, scout_in=None):
    """The fine pass over an automatic region, settled around what it finds (see `settle_region`). When the
    localiser's region holds no plausible atrium (it may have taken something else for one), the fine model
    searches the whole scan instead; when that finds none either, RegionError says so. `scout_in`, when
    given, is the one-pass network (no flips, no ensemble) that settles the region first."""
    try:
        return _settled(region, image, segment_in, reporter, scout_in)
    except RegionError as exc:
        if region.searched_whole:
            raise
        reporter.log(f"the localiser's region held no plausible atrium ({exc})")
    return _settled(search_whole(image, "the localiser's region held no plausible atrium"), image, segment_in,
                    reporter, scout_in)


def _settled(region: Region, image, segment_in, reporter: ProgressReporter, scout_in=None):
    """Settle the region on a first pass, then segment it. With flips (4 network passes) the first pass is a
    one-pass scout: a box the atrium reaches then costs 1 + 4 passes instead of 4 + 4, and one it does not
    reach 1 + 4 instead of 4."""
    started = time.perf_counter()
    first = (scout_in or segment_in)(region)
    region, again = settle_region(region, first[0].label.array, image)
    region.settle_seconds = time.perf_counter() - started
    if again:  # a whole-scan search narrowed to its atrium, or a box the atrium reached: once more
        reporter.log(f"region settled around the segmented atrium: voxels {region.box}")
    result = segment_in(region) if again or scout_in is not None else first
    check_plausible_volume(result[0].label.array, image)
    # the two labels are at hand: how far the label given moved from the first pass that settled its region
    region.scout_agreement = float(dice(first[0].label.array, result[0].label.array)) if scout_in else None
    return region, result


def load_localiser(localiser_id: str, device: str) -> Tuple[Localiser, str]:
    """(the localiser, its catalog id) on the CUDA device unless `device` is cpu or there is none."""
    network, card, used = load_catalog_model(localiser_id)
    device = "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"
    return Localiser(network, inference_spec(card), device=device), used


def search_whole(image, why: str) -> Region:
    """An automatic region that lets the fine model search the whole scan (then narrowed to what it finds)."""
    region = Region((0, 0, 0), tuple(int(s) for s in image.shape[:3]), "auto", searched_whole=True)
    region.warnings.append(f"{why}: the fine model searched the whole scan (slower, and other bright structures "
                           "may be taken for the atrium); check the result, or give a region with --region")
    return region


def physical_extent_mm(image) -> List[float]:
    """Size of the image along each index axis, in mm."""
    return [float(n) * float(s) for n, s in zip(image.shape[:3], image.spacing)]
