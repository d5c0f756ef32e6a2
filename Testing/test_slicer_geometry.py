"""Slicer side: geometry of the files exchanged with the child (RAS in MRML, LPS in NRRD), the stand-in's
conversion checked against SimpleITK, and the module's grid guard (geometry.py)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_fake
from conftest import rotation

# isort: split
from SemiSegLALib.geometry import GridError, checkSameGrid, compareGrids, gridFromNrrd

DIRS_RAS = rotation([0.3, -1.0, 2.0], 33)
SPACING = (0.625, 0.9, 2.5)
ORIGIN_RAS = (-12.5, 30.0, 7.25)


@pytest.fixture
def written(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # K, J, I
    geometry = slicer_fake.Geometry(SPACING, ORIGIN_RAS, DIRS_RAS)
    path = str(tmp_path / "v.nrrd")
    slicer_fake.writeNrrd(array, geometry, path, compress=False)
    return array, geometry, path


def test_stand_in_writes_lps_as_itk_reads_it(written):
    """The stand-in's RAS->LPS conversion, checked against SimpleITK (independent of our code)."""
    array, _, path = written
    image = sitk.ReadImage(path)
    assert image.GetSize() == (6, 5, 4)  # I, J, K
    np.testing.assert_allclose(image.GetSpacing(), SPACING)
    np.testing.assert_allclose(image.GetOrigin(), [12.5, -30.0, 7.25])  # x and y flip sign in LPS
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), np.diag([-1, -1, 1]) @ DIRS_RAS,
                               atol=1e-12)
    # the physical point of voxel (i, j, k) is the same in both conventions
    ijk = (5, 1, 3)
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ras = np.asarray(ORIGIN_RAS) + DIRS_RAS @ (np.asarray(SPACING) * np.asarray(ijk))
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-9)
    assert sitk.GetArrayFromImage(image)[3, 1, 5] == array[3, 1, 5]
    assert b"space: left-posterior-superior" in Path(path).read_bytes()[:1000]


def test_stand_in_round_trip_is_exact(written):
    array, geometry, path = written
    back, backGeometry = slicer_fake.readNrrd(path)
    np.testing.assert_array_equal(back, array)
    assert backGeometry.close(geometry, tol=1e-12)


def test_header_reader_agrees_with_simpleitk(written, tmp_path):
    _, _, path = written
    image = sitk.ReadImage(path)
    grid = gridFromNrrd(path)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert grid.size == [6, 5, 4]
    np.testing.assert_allclose(np.array(grid.axes).T, direction @ np.diag(image.GetSpacing()), atol=1e-9)
    np.testing.assert_allclose(grid.origin, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(grid.spacing, SPACING, atol=1e-9)
    gz = str(tmp_path / "v_gz.nrrd")
    sitk.WriteImage(image, gz, useCompression=True)
    same, reason = compareGrids(grid, gridFromNrrd(gz))
    assert same, reason


def test_header_reader_converts_ras_headers(tmp_path):
    path = tmp_path / "ras.nrrd"
    path.write_bytes(b"NRRD0004\n# comment\ntype: uint8\ndimension: 4\nspace: right-anterior-superior\n"
                     b"sizes: 3 4 5 6\nspace directions: none (0,0,2) (0,1.5,0) (1,0,0)\n"
                     b"space origin: (10,20,30)\nkinds: vector domain domain domain\nencoding: raw\n"
                     b"key:=value: ignored\n\n" + bytes(3 * 4 * 5 * 6))
    grid = gridFromNrrd(str(path))
    assert grid.size == [4, 5, 6]
    assert grid.axes == [[0, 0, 2], [0, -1.5, 0], [-1, 0, 0]]
    assert grid.origin == [-10, -20, 30]


def test_grid_comparison_tolerates_round_trip_noise_only(written, tmp_path):
    _, geometry, path = written
    noisy = slicer_fake.Geometry(geometry.spacing + 1e-6, geometry.origin - 2e-6, geometry.directions)
    other = str(tmp_path / "noisy.nrrd")
    slicer_fake.writeNrrd(np.zeros((4, 5, 6), np.uint8), noisy, other, compress=False)
    checkSameGrid(path, other)  # Slicer/NRRD round-trip noise passes
    shifted = slicer_fake.Geometry(geometry.spacing, geometry.origin + [0.0, 0.0, 0.01], geometry.directions)
    slicer_fake.writeNrrd(np.zeros((4, 5, 6), np.uint8), shifted, other, compress=False)
    with pytest.raises(GridError, match="origin"):
        checkSameGrid(path, other)
    flipped = slicer_fake.Geometry(geometry.spacing, geometry.origin, geometry.directions @ np.diag([1, 1, -1]))
    slicer_fake.writeNrrd(np.zeros((4, 5, 6), np.uint8), flipped, other, compress=False)
    with pytest.raises(GridError, match="axis 2"):
        checkSameGrid(path, other)
    slicer_fake.writeNrrd(np.zeros((4, 5, 7), np.uint8), geometry, other, compress=False)
    with pytest.raises(GridError, match="size"):
        checkSameGrid(path, other)


def test_not_nrrd_is_a_clear_error(tmp_path):
    path = tmp_path / "x.nrrd"
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(GridError, match="not an NRRD"):
        gridFromNrrd(str(path))


def test_volume_node_to_file_to_segmentation_node_geometry(tmp_path, monkeypatch):
    """Node -> file -> (child copies the header) -> node, through nodes.py, for oblique + anisotropic
    volumes with odd sizes: the segmentation's grid equals the volume's."""
    from SemiSegLALib import nodes

    fake = slicer_fake.getFake()
    fake.reset()
    fake.install(monkeypatch)
    for index, (axis, degrees, spacing) in enumerate([([1, 0, 0], 90, (1.0, 1.0, 1.0)),
                                                      ([1, 2, 3], 17, (0.3, 0.7, 3.1)),
                                                      ([0, 0, 1], 180, (2.0, 0.5, 0.5))]):
        rng = np.random.default_rng(index)
        array = rng.normal(size=(7, 9, 11)).astype(np.float32)
        volume = fake.addVolume(f"v{index}", array, spacing, (3.0 * index, -4.0, 5.5), rotation(axis, degrees))
        source = str(tmp_path / f"in{index}.nrrd")
        nodes.writeVolumeNode(volume, source)
        # what the core does: label on the input's own header (SimpleITK CopyInformation)
        image = sitk.ReadImage(source)
        label = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 0.5).astype(np.uint8))
        label.CopyInformation(image)
        result = str(tmp_path / f"out{index}.nrrd")
        sitk.WriteImage(label, result)
        checkSameGrid(source, result)
        seg, empty = nodes.importLabelAsSegmentation(result, volume)
        assert not empty
        segmentation = seg.GetSegmentation()
        assert segmentation.geometry.close(volume.geometry, tol=1e-9)
        np.testing.assert_array_equal(segmentation.GetNthSegment(0).mask, array > 0.5)
