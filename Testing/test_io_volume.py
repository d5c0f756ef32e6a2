"""Volume files keep their geometry through a write/read round trip; broken files give one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.io import Volume, read_volume, write_volume

OBLIQUE = (0.9396926, 0.0, 0.3420201, 0.1169778, 0.9396926, -0.3213938, -0.3213938, 0.3420201, 0.8830222)


@pytest.mark.parametrize("name", ["case.nrrd", "case.nii.gz", "case.mha"])
def test_round_trip_keeps_geometry(tmp_path, name):
    image, _ = sphere_volume((12, 10, 8))
    vol = Volume(image, (0.7, 0.9, 2.5), (-12.5, 30.25, 7.0), OBLIQUE)
    back = read_volume(write_volume(vol, tmp_path / name))
    assert back.shape == vol.shape and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.same_grid(vol)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)


def test_bool_mask_is_written_as_uint8(tmp_path):
    mask = np.zeros((6, 5, 4), bool)
    mask[2:4, 1:3, 1:3] = True
    back = read_volume(write_volume(Volume(mask), tmp_path / "mask.nrrd"))
    assert back.array.dtype == np.uint8 and back.array.sum() == mask.sum()


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_nrrd(tmp_path, compress):
    image, _ = sphere_volume((20, 16, 10))
    path = write_volume(Volume(image), tmp_path / "full.nrrd", compress=compress)
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.nrrd: unreadable or truncated image"):
        read_volume(cut)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nope.nrrd")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_volume(tmp_path / "empty.nrrd")
    with pytest.raises(InputError, match="unknown output format"):
        write_volume(Volume(np.zeros((2, 2, 2))), tmp_path / "x.png")
