"""The synthetic demo CT: plausible HU, known masks, deterministic, and segmentable."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from relsegcore import demo, imageio
from relsegcore.lungs import LEFT_LUNG, RIGHT_LUNG, segment_lungs


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def case() -> demo.DemoCase:
    return demo.make_demo_ct(seed=0)


@pytest.fixture(scope="module")
def predicted(case) -> np.ndarray:
    return sitk.GetArrayFromImage(segment_lungs(case.image))


def test_demo_is_a_valid_ct_with_masks_on_the_same_grid(case):
    imageio.validate_ct(case.image)
    assert case.image.GetPixelID() == sitk.sitkInt16
    for mask in (case.lungs, case.infection):
        assert mask.GetSize() == case.image.GetSize()
        assert np.allclose(mask.GetOrigin(), case.image.GetOrigin())
        assert np.allclose(mask.GetSpacing(), case.image.GetSpacing())
        assert np.allclose(mask.GetDirection(), case.image.GetDirection())
    image, lungs_mask, infection = case  # unpacks like the (image, lungs, infection) tuple it is
    assert image is case.image and lungs_mask is case.lungs and infection is case.infection


def test_demo_tissues_have_ct_values(case):
    hu = sitk.GetArrayFromImage(case.image).astype(np.float32)
    lungs = sitk.GetArrayFromImage(case.lungs)
    infection = sitk.GetArrayFromImage(case.infection)
    assert hu[0, 0, 0] < -900  # air outside the body
    healthy = (lungs > 0) & (infection == 0)
    assert -900 < np.median(hu[healthy]) < -780
    assert -600 < np.median(hu[infection == demo.GROUND_GLASS]) < -300
    assert -120 < np.median(hu[infection == demo.CONSOLIDATION]) < 60
    assert hu.max() > 400  # bone
    assert 10 < np.std(hu[:, :8, :8]) < 40  # noise in the air around the body


def test_demo_left_lung_is_on_the_patients_left_and_lesions_are_in_the_lungs(case):
    lungs = sitk.GetArrayFromImage(case.lungs)
    infection = sitk.GetArrayFromImage(case.infection)
    x_left = np.nonzero(lungs == LEFT_LUNG)[2].mean()
    x_right = np.nonzero(lungs == RIGHT_LUNG)[2].mean()
    assert x_left > x_right  # LPS identity direction: larger x index is the patient's left
    assert set(np.unique(infection)) == {0, demo.GROUND_GLASS, demo.CONSOLIDATION}
    assert (lungs[infection > 0] > 0).all()


def test_demo_is_deterministic_by_seed(case):
    again = demo.make_demo_ct(seed=0)
    other = demo.make_demo_ct(seed=1)
    for name in ("image", "lungs", "infection"):
        assert np.array_equal(sitk.GetArrayFromImage(getattr(again, name)), sitk.GetArrayFromImage(getattr(case, name)))
    assert not np.array_equal(sitk.GetArrayFromImage(other.infection), sitk.GetArrayFromImage(case.infection))


def test_lung_segmentation_reaches_dice_095_per_lung_on_the_demo(case, predicted):
    truth = sitk.GetArrayFromImage(case.lungs)
    for side in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(predicted == side, truth == side) >= 0.95


def test_trachea_is_not_lung(case, predicted):
    """Above the carina the trachea column is air in the image but never lung."""
    hu = sitk.GetArrayFromImage(case.image)
    canonical_index = case.image.TransformPhysicalPointToIndex((0.0, demo.TRACHEA_Y, 0.0))
    x, y = canonical_index[0], canonical_index[1]
    z_carina = case.image.TransformPhysicalPointToIndex((0.0, 0.0, demo.CARINA_Z + 5.0))[2]
    trachea_column = slice(z_carina, hu.shape[0])
    assert (hu[trachea_column, y, x] < -800).all()
    assert not predicted[trachea_column, y - 3 : y + 4, x - 3 : x + 4].any()


def test_lesions_are_inside_the_segmented_lungs(case, predicted):
    infection = sitk.GetArrayFromImage(case.infection)
    for kind in (demo.GROUND_GLASS, demo.CONSOLIDATION):
        assert (predicted[infection == kind] > 0).mean() >= 0.95, f"infection class {kind}"


def test_stomach_gas_is_not_lung(case, predicted):
    hu = sitk.GetArrayFromImage(case.image)
    lungs = sitk.GetArrayFromImage(case.lungs)
    below_lungs = np.arange(hu.shape[0]) < np.nonzero(lungs.any(axis=(1, 2)))[0][0]
    body = np.stack([ndimage.binary_fill_holes(plane > -500) for plane in hu])
    gas = (hu < -900) & body & below_lungs[:, None, None]
    assert gas.sum() > 100
    assert not predicted[gas].any()


def test_demo_anatomy_is_laid_out_in_millimetres():
    fine = demo.make_demo_ct(seed=0, shape=(20, 128, 128), spacing=(2.8, 2.8, 16.0))
    lungs = sitk.GetArrayFromImage(fine.lungs)
    volume_ml = (lungs > 0).sum() * np.prod(fine.image.GetSpacing()) / 1000.0
    coarse = demo.make_demo_ct(seed=0)
    coarse_ml = (sitk.GetArrayFromImage(coarse.lungs) > 0).sum() * np.prod(coarse.image.GetSpacing()) / 1000.0
    assert volume_ml == pytest.approx(coarse_ml, rel=0.1)
