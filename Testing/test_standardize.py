"""Intensity standardisation as a model's normalisation (`standardized-zscore`): each scan matched by its own
percentiles onto the model's reference landmarks, then z-scored, in training, fine-tuning and `segment`; the
reference travels in the model card and a fine-tune keeps its parent's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import nnunet_dataset, run_cli
from semiseg_la.checkpoints.card import ModelCard
from semiseg_la.engine.config import build_config, load_config_file
from semiseg_la.engine.data import normalize_volume
from semiseg_la.errors import CheckpointError, ConfigError, InputError
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.io.volume import Volume, read_volume, write_volume
from semiseg_la.preprocess.normalize import (
    check_reference,
    landmarks,
    match_quantiles,
    reference_landmarks,
    standardize,
    zscore,
)
from semiseg_la.preprocess.site_shift import SiteShift
from test_reproduction import _Threshold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scan(seed: int = 0) -> np.ndarray:
    """Smooth tissue, a bright blob and noise: a histogram with a body and a tail, like an LGE crop."""
    rng = np.random.default_rng(seed)
    grid = np.indices((40, 36, 32), dtype=np.float32)
    blob = np.exp(-(((grid - np.array([20, 18, 16])[:, None, None, None]) ** 2).sum(0)) / 60.0)
    return (0.5 * np.sin(grid[0] / 5.0) + 2.0 * blob + rng.normal(0, 0.2, grid.shape[1:])).astype(np.float32)


REFERENCE = reference_landmarks([_scan(1), _scan(2)])


def test_a_standardised_scan_takes_the_reference_landmarks():
    out = standardize(_scan(3) * 40.0 + 300.0, REFERENCE)  # another scanner's gain and offset
    np.testing.assert_allclose(landmarks(out, len(REFERENCE)), REFERENCE, atol=1e-3)
    assert out.dtype == np.float32 and out.shape == (40, 36, 32)


def test_standardisation_undoes_a_sites_contrast_curve_that_a_z_score_keeps():
    scan = Volume(_scan(4), (1.0, 1.0, 1.0))
    curved = SiteShift("piecewise", 1.0, seed=0).apply(scan, 0).array  # a monotone contrast curve only
    assert not np.allclose(zscore(curved), zscore(scan.array), atol=0.1)
    z_error = np.abs(zscore(curved) - zscore(scan.array)).mean()
    standardized_error = np.abs(zscore(standardize(curved, REFERENCE)) - zscore(standardize(scan.array, REFERENCE)))
    assert standardized_error.mean() < 0.3 * z_error


def test_matching_undoes_a_monotone_contrast_curve():
    original = np.random.default_rng(0).gamma(2.0, 1.0, size=(24, 24, 16)).astype(np.float32)
    curved = original ** 0.4 * 3.0 + 1.0  # another site's contrast: monotone, non-linear
    restored = match_quantiles(curved, landmarks(curved, 100), landmarks(original, 100))
    assert np.abs(curved - original).mean() > 0.5
    assert np.abs(restored - original).mean() < 0.02


def test_tied_landmarks_of_an_8_bit_scan_still_map_monotonically():
    scan = np.random.default_rng(1).integers(0, 6, size=(16, 16, 8)).astype(np.float32)  # 6 values, 100 landmarks
    out = match_quantiles(scan, landmarks(scan, 100), np.linspace(-2.0, 2.0, 100))
    order = np.argsort(scan.ravel(), kind="stable")
    assert np.isfinite(out).all() and np.all(np.diff(out.ravel()[order]) >= 0)


def test_standardisation_needs_a_usable_reference():
    with pytest.raises(InputError, match="intensity_reference"):
        normalize_volume(_scan(), "standardized-zscore")
    for bad in ([0.0, 1.0], [2.0, 1.0, 3.0], [0.0, float("nan"), 1.0], [1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match="intensity_reference"):
            check_reference(bad)
        with pytest.raises(ConfigError, match="intensity_reference"):
            build_config({"data": "x", "normalization": "standardized-zscore", "intensity_reference": bad})
    with pytest.raises(ConfigError, match="single-channel"):
        build_config({"data": "x", "normalization": "standardized-zscore", "in_channels": 2})
    build_config({"data": "x", "normalization": "standardized-zscore", "wide_fov_prob": 0.5})  # canvases z-scored


def test_the_predictor_standardises_as_the_card_says():
    """A network that thresholds its input: with standardisation the same voxels are foreground whatever
    monotone curve a scanner applied; with the z-score alone they are not."""
    scan = Volume(_scan(5), (1.0, 1.0, 1.0))
    curved = scan.with_array(SiteShift("piecewise", 1.0, seed=0).apply(scan, 0).array)
    masks = {}
    for mode, reference in (("standardized-zscore", tuple(REFERENCE)), ("zscore-volume", None)):
        spec = InferenceSpec((16, 16, 16), (1.0, 1.0, 1.0), normalization=mode, intensity_reference=reference)
        predictor = Predictor(_Threshold(), spec, device="cpu", largest_component=False)
        masks[mode] = [predictor.predict(v).label.array.astype(bool) for v in (scan, curved)]
        expected = normalize_volume(scan.array, mode, reference) > 0.5
        assert np.array_equal(masks[mode][0], expected), mode

    def disagreement(pair):
        return np.logical_xor(*pair).sum() / max(1, np.logical_or(*pair).sum())

    assert disagreement(masks["standardized-zscore"]) < 0.5 * disagreement(masks["zscore-volume"])


def _card(**inference):
    return {"format_version": 1, "id": "m-v0.1.0", "name": "m", "version": "0.1.0", "method": "supervised",
            "architecture": {"name": "vnet", "config": {}},
            "inference": {"patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], **inference},
            "classes": {"1": {"name": "left atrium"}}}


def test_a_card_must_carry_the_reference_it_standardises_onto():
    ModelCard.from_dict(_card(normalization="standardized-zscore", intensity_reference=list(REFERENCE)),
                        require_weights=False)
    for inference, what in (({"normalization": "standardized-zscore"}, "intensity_reference"),
                            ({"normalization": "standardized-zscore", "intensity_reference": [3.0, 2.0, 1.0]},
                             "intensity_reference"),
                            ({"normalization": "standardized-zscore", "intensity_reference": "0 1 2"},
                             "intensity_reference"),
                            ({"normalization": "histogram"}, "inference.normalization")):
        with pytest.raises(CheckpointError, match=what):
            ModelCard.from_dict(_card(**inference), require_weights=False)


def test_train_fine_tune_and_segment_with_standardisation(tmp_path):
    """`train --set normalization=standardized-zscore` takes the reference from its labelled cases and writes it
    into the card; a fine-tune keeps the parent's reference and normalisation; `segment` applies it."""
    data = tmp_path / "Dataset001_Tiny"
    nnunet_dataset(data, n_labeled=3, n_unlabeled=1)
    env = {"SEMISEG_LA_HOME": str(tmp_path / "home")}
    common = ["--data", str(data), "--val", "1", "--iterations", "2", "--validate-every", "2", "--device", "cpu",
              "--progress", "json"]
    result = run_cli(["train", "--method", "supervised", "--labeled", "2", "--patch", "32", "32", "32",
                      "--spacing", "1", "1", "1", "--set", "normalization=standardized-zscore",
                      "--output", str(tmp_path / "parent"), "--name", "std-parent", *common], env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference landmarks from the 2 labelled cases" in result.stdout  # the run's log says what it took
    parent = json.loads(next((tmp_path / "home" / "models").glob("std-parent-*/card.json")).read_text())
    labelled = [read_volume(data / "imagesTr" / f"case{i:02d}_0000.nrrd").array for i in range(2)]
    np.testing.assert_allclose(parent["inference"]["intensity_reference"], reference_landmarks(labelled), rtol=1e-6)
    assert parent["inference"]["normalization"] == "standardized-zscore"

    result = run_cli(["finetune", "--from", parent["id"], "--preset", "finetune-supervised", "--set",
                      "fit_to_budget=false", "--output", str(tmp_path / "child"), "--name", "std-child", *common],
                     env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    child = json.loads(next((tmp_path / "home" / "models").glob("std-child-*/card.json")).read_text())
    assert child["inference"]["normalization"] == "standardized-zscore"
    assert child["inference"]["intensity_reference"] == parent["inference"]["intensity_reference"]

    output = tmp_path / "mask.nrrd"
    result = run_cli(["segment", str(data / "imagesTr" / "case02_0000.nrrd"), "-o", str(output), "--model",
                      child["id"], "--region", "whole", "--device", "cpu", "--progress", "none"], env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_volume(output).shape == (40, 36, 36)


def test_a_resumed_run_keeps_the_reference_its_weights_were_trained_with(tmp_path):
    """The data folder changes between the run and `--resume` (a training case rescanned with another contrast):
    the resumed run keeps standardising onto its saved reference, not one taken again from the new files."""
    data = tmp_path / "Dataset001_Tiny"
    nnunet_dataset(data, n_labeled=3, n_unlabeled=0)
    env = {"SEMISEG_LA_HOME": str(tmp_path / "home")}
    command = ["train", "--method", "supervised", "--data", str(data), "--labeled", "2", "--val", "1", "--patch",
               "32", "32", "32", "--spacing", "1", "1", "1", "--validate-every", "1", "--device", "cpu",
               "--progress", "none", "--set", "normalization=standardized-zscore", "--output", str(tmp_path / "run"),
               "--no-export"]
    assert run_cli(command + ["--iterations", "2"], env_extra=env).returncode == 0
    saved = load_config_file(tmp_path / "run" / "config.yaml")["intensity_reference"]
    first = data / "imagesTr" / "case00_0000.nrrd"
    image = read_volume(first)
    write_volume(image.with_array(np.exp(image.array / image.array.max() * 3.0)), first)
    result = run_cli(command[:-1] + ["--iterations", "3", "--resume", "--name", "resumed"], env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads(next((tmp_path / "home" / "models").glob("resumed-*/card.json")).read_text())
    assert card["inference"]["intensity_reference"] == saved  # what its cases were standardised onto
    fresh = run_cli(command[:-3] + ["--output", str(tmp_path / "fresh"), "--no-export", "--iterations", "1"],
                    env_extra=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert load_config_file(tmp_path / "fresh" / "config.yaml")["intensity_reference"] != saved  # it would differ


def _is_affine_image_of(values: np.ndarray, reference: np.ndarray) -> bool:
    """`values` = a * reference + b for some a > 0 (a z-score of a scan standardised onto `reference`)."""
    slope, offset = np.polyfit(reference, values, 1)
    return slope > 0 and np.allclose(values, slope * reference + offset, atol=0.02 * (values[-1] - values[0]))


def test_whole_scan_canvases_are_standardised_as_segment_standardises_a_region():
    """Training canvases and the validation canvases are normalised over themselves with the model's own
    normalisation, as `segment` normalises the region it cuts, not z-scored alone."""
    from conftest import sphere_volume
    from semiseg_la.engine.data import TrainCase, WideFieldOfView, wide_validation_cases

    cases = [TrainCase(f"c{i}", np.exp(sphere_volume((40, 36, 24), radius=7, seed=i)[0])[None],
                       sphere_volume((40, 36, 24), radius=7, seed=i)[1]) for i in range(3)]
    for region_mm in (None, (5.0, 20.0)):
        widen = WideFieldOfView(cases, (2.5, 2.5, 2.5), prob=1.0, region_mm=region_mm, min_size=(16, 16, 8),
                                normalization="standardized-zscore", reference=REFERENCE)
        image, _ = widen(cases[0].image, cases[0].label, 0, np.random.default_rng(0))
        assert _is_affine_image_of(landmarks(image[0], len(REFERENCE)), REFERENCE)
        plain, _ = WideFieldOfView(cases, (2.5, 2.5, 2.5), prob=1.0, region_mm=region_mm, min_size=(16, 16, 8))(
            cases[0].image, cases[0].label, 0, np.random.default_rng(0))
        assert not _is_affine_image_of(landmarks(plain[0], len(REFERENCE)), REFERENCE)
    canvases = wide_validation_cases(cases[:1], cases[1:], (2.5, 2.5, 2.5), max_mm=250.0, region=True,
                                     min_size=(16, 16, 8), normalization="standardized-zscore", reference=REFERENCE)
    for canvas in canvases[1:]:
        assert _is_affine_image_of(landmarks(canvas.image[0], len(REFERENCE)), REFERENCE)


def test_the_guard_rail_scores_the_parent_with_the_parents_own_normalisation(tmp_path):
    """A fine-tune that switches to standardisation: the held-out case is segmented by the parent as the
    parent's card says (z-score), not as the child's config says."""
    from semiseg_la.checkpoints import load_network, resolve_model
    from semiseg_la.cli.common import inference_spec
    from semiseg_la.metrics import dice

    data = tmp_path / "Dataset001_Tiny"
    nnunet_dataset(data, n_labeled=3, n_unlabeled=0)
    env = {"SEMISEG_LA_HOME": str(tmp_path / "home")}
    common = ["--data", str(data), "--iterations", "2", "--device", "cpu", "--progress", "none"]
    result = run_cli(["train", "--method", "supervised", "--labeled", "2", "--val", "1", "--patch", "32", "32", "32",
                      "--spacing", "1", "1", "1", "--output", str(tmp_path / "parent"), "--name", "z-parent",
                      *common], env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    parent_dir = next((tmp_path / "home" / "models").glob("z-parent-*"))
    result = run_cli(["finetune", "--from", str(parent_dir), "--preset", "finetune-supervised", "--set",
                      "fit_to_budget=false", "--set", "normalization=standardized-zscore", "--set", "parent_blend=0",
                      "--output", str(tmp_path / "child"), "--name", "std-child", *common], env_extra=env)
    assert result.returncode == 0, result.stderr[-2000:]
    child = json.loads(next((tmp_path / "home" / "models").glob("std-child-*/card.json")).read_text())
    holdout = child["finetune"]["site_holdout"]
    assert holdout["cases"] == ["case02"]
    network, card = load_network(resolve_model(str(parent_dir)))
    image, label = read_volume(data / "imagesTr" / "case02_0000.nrrd"), read_volume(data / "labelsTr" / "case02.nrrd")
    spec = inference_spec(card)
    assert spec.normalization == "zscore-volume"
    expected = dice(Predictor(network, spec, device="cpu").predict(image).label.array, label.array)
    assert holdout["parent_dice"] == pytest.approx(expected, abs=1e-6)
