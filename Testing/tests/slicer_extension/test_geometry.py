"""Volume node <-> SimpleITK: the same voxels at the same physical places (real CTs, oblique, LPS, flipped)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from headless_slicer import load_volume, volume_from_image

from COVIDInfectionSegLib import GeometryError, sitk_image_from_volume, update_volume_from_sitk
from COVIDInfectionSegLib.geometry import array_on_volume_grid


def corner_points(image: sitk.Image) -> np.ndarray:
    """Physical (LPS) positions of the 8 corner voxels."""
    corners = itertools.product(*[(0, size - 1) for size in image.GetSize()])
    return np.array([image.TransformIndexToPhysicalPoint([int(c) for c in corner]) for corner in corners])


def assert_same_image(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(corner_points(actual), corner_points(expected), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(actual), sitk.GetArrayFromImage(expected))


@pytest.mark.parametrize("relative", ["lung-tumor-volumes/lung1_image.nrrd",
                                      "ct-fixtures/totalsegmentator-example/example_ct_sm.nii.gz"])
def test_real_ct_read_by_slicer_matches_simpleitk(mrml, shared_data, relative):
    path = shared_data / relative
    volume = load_volume(path)
    assert_same_image(sitk_image_from_volume(volume), sitk.ReadImage(str(path)))


def synthetic_ct(direction: np.ndarray, origin=(-120.5, 80.25, -300.0), spacing=(0.7, 0.8, 2.5)) -> sitk.Image:
    array = np.random.default_rng(0).integers(-1024, 1500, (6, 9, 11)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.flatten().tolist())
    return image


def oblique_direction() -> np.ndarray:
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.35)  # axis, angle (rad)
    return np.array(rotation.GetMatrix()).reshape(3, 3)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("direction", [np.eye(3), oblique_direction(), np.diag([-1.0, 1.0, -1.0])],
                         ids=["lps", "oblique", "flipped"])
def test_file_written_by_simpleitk_round_trips_through_slicer(mrml, tmp_path, suffix, direction):
    """SimpleITK writes a file, Slicer's storage node reads it, and the conversion gives the original back."""
    original = synthetic_ct(direction)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(original, str(path))
    volume = load_volume(path)
    assert_same_image(sitk_image_from_volume(volume), original)


def test_update_volume_from_sitk_is_the_inverse(mrml):
    import slicer

    original = synthetic_ct(oblique_direction())
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "made")
    update_volume_from_sitk(volume, original)
    assert_same_image(sitk_image_from_volume(volume), original)
    # RAS in Slicer is LPS with x and y negated.
    ras = [0.0, 0.0, 0.0, 1.0]
    matrix = slicer.vtkMRMLScalarVolumeNode.GetIJKToRASMatrix  # noqa: F841 (documenting the API used)
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    ijk_to_ras.MultiplyPoint([2, 3, 4, 1], ras)
    lps = original.TransformIndexToPhysicalPoint((2, 3, 4))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)


def test_result_off_the_volume_grid_is_refused(mrml):
    original = synthetic_ct(np.eye(3))
    volume = volume_from_image(original, "ct")
    labels = sitk.Image(original.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(original)
    assert array_on_volume_grid(labels, volume).shape == (6, 9, 11)
    labels.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="voxel grid"):
        array_on_volume_grid(labels, volume)
    with pytest.raises(GeometryError, match="size"):
        array_on_volume_grid(sitk.Image((3, 3, 3), sitk.sitkUInt8), volume)


def test_vector_volume_is_refused(mrml):
    import slicer

    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(volume, np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="not a scalar"):
        sitk_image_from_volume(volume)
