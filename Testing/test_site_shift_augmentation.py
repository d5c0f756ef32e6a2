"""Site-shift augmentation: training patches seen through random simulated sites, the teacher on the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import sphere_volume, synthetic_cases
from semiseg_la.engine.config import build_config
from semiseg_la.engine.data import SiteShiftAugmentation, TrainCase
from semiseg_la.engine.loop import Trainer
from semiseg_la.errors import ConfigError
from semiseg_la.preprocess.normalize import zscore
from semiseg_la.preprocess.site_shift import AUGMENTATION_FAMILIES, FAMILIES, random_site_shifts


def tiny_config(tmp_path, **overrides):
    base = {"method": "mean_teacher", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
            "max_iterations": 6, "batch_size": 2, "labeled_bs": 1, "labeled_num": 2, "val_num": 0,
            "base_lr": 0.01, "checkpoint_every": 3, "validate_every": 0, "seed": 3, "output": str(tmp_path / "run"),
            "device": "cpu", "site_shift_prob": 0.5}
    base.update(overrides)
    return build_config(base)


def test_random_sites_are_drawn_from_the_pool_within_the_strength():
    rng = np.random.default_rng(0)
    drawn = [random_site_shifts(rng, ("gamma", "bias", "blur"), max_strength=0.4) for _ in range(50)]
    assert all(1 <= len(site) <= 3 for site in drawn)
    assert {s.family for site in drawn for s in site} == {"gamma", "bias", "blur"}
    assert all(0.0 <= s.strength <= 0.4 for site in drawn for s in site)
    assert all(len({s.family for s in site}) == len(site) for site in drawn)  # no family twice in one site
    again = random_site_shifts(np.random.default_rng(0), ("gamma", "bias", "blur"), max_strength=0.4)
    assert again == drawn[0]
    assert set(AUGMENTATION_FAMILIES) <= set(FAMILIES) and "inversion" not in AUGMENTATION_FAMILIES


def test_a_training_site_can_combine_as_many_families_as_configured(tmp_path):
    """`site_shift_max_families` reaches the draw: 4 families at once (as `scanner` combines) only when allowed."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    for allowed in (3, 4):
        trainer = Trainer(tiny_config(tmp_path / str(allowed), site_shift_max_families=allowed), labeled, unlabeled)
        rng = np.random.default_rng(5)
        sizes = set()
        for _ in range(200):
            sizes.add(len(random_site_shifts(rng, trainer.site_shift.families, 1.0, trainer.site_shift.max_families)))
        assert max(sizes) == allowed


def test_the_augmentation_changes_appearance_only_and_keeps_the_patch_shape():
    patch = synthetic_cases(1, True)[0].image[:, :32, :32, :32].copy()
    always = SiteShiftAugmentation((1.25, 1.25, 1.25), 1.0, 1.0, AUGMENTATION_FAMILIES)
    rng = np.random.default_rng(1)
    shifted = [always(patch, rng) for _ in range(8)]
    assert all(s.shape == patch.shape and s.dtype == np.float32 and np.isfinite(s).all() for s in shifted)
    assert sum(not np.allclose(s, patch, atol=1e-3) for s in shifted) >= 6
    never = SiteShiftAugmentation((1.25, 1.25, 1.25), 0.0, 1.0, AUGMENTATION_FAMILIES)
    assert never(patch, rng) is None


def test_the_teacher_sees_the_patch_as_acquired_and_the_student_the_shifted_one(tmp_path):
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    trainer = Trainer(tiny_config(tmp_path, site_shift_prob=1.0, method_params={"consistency_on": "unlabeled"}),
                      labeled, unlabeled)
    batch = trainer.next_batch()
    assert batch.clean_image is not None and batch.clean_image.shape == batch.image.shape
    assert not torch.allclose(batch.clean_image, batch.image, atol=1e-3)
    seen = []
    teacher = trainer.method.teacher
    handle = teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    trainer.method.training_step(batch, 0)
    handle.remove()
    rows = slice(batch.labeled_bs, None)  # as in the fine-tune preset: the teacher on the unlabelled half
    noise = seen[0] - batch.clean_image[rows]
    assert float(noise.abs().max()) <= trainer.method.params["noise_clip"] + 1e-6  # clean view + clipped noise
    plain = Trainer(tiny_config(tmp_path / "off", site_shift_prob=0.0), labeled, unlabeled).next_batch()
    assert plain.clean_image is None


def test_a_site_met_before_the_normalisation_is_normalised_as_segment_would_and_cut_like_its_clean_twin(tmp_path):
    """`site_shift_before_normalization`: the whole case passes through the site and is normalised again (a
    z-scored sample stays z-scored, where a shifted patch does not), and the clean and the shifted patch share
    one rotation and crop (a monotone site keeps every voxel's rank)."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    small = [sphere_volume((26, 26, 26), radius=6, seed=i) for i in range(5)]  # padded into each 32³ patch whole
    small = [TrainCase(f"s{i}", zscore(image)[None], label if i < 2 else None)
             for i, (image, label) in enumerate(small)]
    whole = {"site_shift_prob": 1.0, "site_shift_families": ["gamma", "bias"], "intensity_prob": 0.0}

    def moments(flag, folder):
        batch = Trainer(tiny_config(tmp_path / folder, site_shift_before_normalization=flag, **whole),
                        small[:2], small[2:]).next_batch()
        inside = batch.clean_image != 0  # the case, not the padding
        assert int(inside.sum()) == 2 * 26 ** 3
        return [(float(x[m].mean()), float(x[m].std(unbiased=False))) for x, m in zip(batch.image, inside)]

    assert all(abs(mean) < 1e-3 and abs(std - 1) < 1e-3 for mean, std in moments(True, "before"))
    assert any(abs(mean) > 0.05 or abs(std - 1) > 0.05 for mean, std in moments(False, "after"))

    config = tiny_config(tmp_path / "cut", site_shift_before_normalization=True, site_shift_prob=1.0,
                         site_shift_families=["gamma"], site_shift_strength=2.0, patch_size=[16, 16, 16])
    trainer = Trainer(config, labeled, unlabeled)
    for _ in range(3):
        batch = trainer.next_batch()
        for clean, shifted in zip(batch.clean_image[:, 0], batch.image[:, 0]):
            assert not torch.allclose(clean, shifted, atol=1e-3)
            ranked = shifted.flatten()[torch.argsort(clean.flatten())]
            assert float(torch.diff(ranked).min()) >= -1e-4


def test_a_canvas_meets_its_site_whole_before_its_region_is_cut_and_is_not_shifted_again(tmp_path, monkeypatch):
    """`site_shift_on_canvas`: a labelled sample placed in a whole-scan canvas passes through its site over the
    whole canvas (the acquisition sees the canvas, larger than the region the network gets) and its patch is not
    shifted again, so the teacher sees it as the site acquired it; an unlabelled crop is shifted as before. Off,
    every sample meets its site as a patch."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    common = {"site_shift_prob": 1.0, "wide_fov_prob": 1.0, "wide_fov_max_mm": 80.0, "wide_fov_region_mm": [2, 4],
              "patch_size": [16, 16, 16], "intensity_prob": 0.0}

    def acquisitions(on: bool, folder: str):
        trainer = Trainer(tiny_config(tmp_path / folder, site_shift_on_canvas=on, **common), labeled, unlabeled)
        seen, draw = [], trainer.site_shift.draw

        def recorded(rng):
            acquire = draw(rng)
            return lambda channel: seen.append(channel.shape) or acquire(channel)
        monkeypatch.setattr(trainer.site_shift, "draw", recorded)
        batch = trainer.next_batch()  # one labelled sample (a canvas), then one unlabelled crop
        return seen, batch

    seen, batch = acquisitions(True, "on")
    assert len(seen) == 2 and seen[0][0] >= 60 and seen[0][1] >= 60 and seen[1] == (16, 16, 16)
    assert torch.equal(batch.clean_image[0], batch.image[0])  # met its site on the canvas: one version
    assert not torch.allclose(batch.clean_image[1], batch.image[1], atol=1e-3)
    seen, batch = acquisitions(False, "off")
    assert seen == [(16, 16, 16), (16, 16, 16)]
    assert not torch.allclose(batch.clean_image[0], batch.image[0], atol=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ({"site_shift_prob": 1.5}, "site_shift_prob"),
    ({"site_shift_families": ["gamma", "x-ray"]}, "x-ray"),
    ({"site_shift_families": []}, "site_shift_families"),
    ({"in_channels": 2}, "single-channel"),
    ({"site_shift_max_families": 0}, "site_shift_max_families"),
    ({"site_shift_on_canvas": True}, "site_shift_on_canvas needs .* wide_fov_prob > 0"),
])
def test_bad_site_shift_settings_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides)
