"""Metrics against values worked out by hand and against a brute-force point-distance reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from relsegcore import metrics
from relsegcore.errors import InputError


def _square(shape=(40, 40), top=5, left=5, size=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def _cube(shape=(30, 30, 30), corner=(10, 10, 10), size=8, grow=0) -> np.ndarray:
    mask = np.zeros(shape, bool)
    lo = [c - grow for c in corner]
    mask[tuple(slice(a, a + size + 2 * grow) for a in lo)] = True
    return mask


def test_dice_of_offset_squares_is_exact():
    # 10x10 squares offset by 3 columns: overlap 10*7 = 70 -> Dice = 140 / 200.
    a, b = _square(), _square(left=8)
    assert metrics.dice(a, b) == pytest.approx(0.7, abs=1e-12)
    assert metrics.confusion(a, b) == {"tp": 70, "fp": 30, "fn": 30, "tn": 1600 - 130}
    assert metrics.sensitivity(a, b) == pytest.approx(0.7)
    assert metrics.specificity(a, b) == pytest.approx(1 - 30 / (1600 - 100))


def test_empty_masks_follow_documented_conventions():
    empty, square = np.zeros((20, 20), bool), _square((20, 20))
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(square, empty) == 0.0
    assert metrics.surface_dice(empty, empty, None, 1.0) == 1.0
    assert metrics.surface_dice(square, empty, None, 1.0) == 0.0
    assert metrics.hd95(empty, empty, None) == 0.0
    assert metrics.hd95(empty, square, None) == math.inf
    assert math.isnan(metrics.sensitivity(square, empty))


def test_hd95_of_a_shifted_cube_is_the_shift_in_mm():
    # Every voxel of the trailing face (1/6 of the border) lies exactly k voxels from the other
    # cube's border and nothing lies further, so the 95th percentile is k * spacing along x.
    a = _cube()
    b = np.roll(a, 3, axis=2)
    assert metrics.hd95(a, b, None) == pytest.approx(3.0)
    assert metrics.hd95(a, b, (2.5, 0.7, 1.5)) == pytest.approx(4.5)
    assert metrics.hd95(a, a, (2.5, 0.7, 1.5)) == 0.0


def test_hd95_of_concentric_spheres_is_the_radius_difference():
    grid = np.indices((41, 41, 41)) - 20
    radius = np.sqrt((grid**2).sum(axis=0))
    inner, outer = radius <= 10, radius <= 14
    # Voxelised spheres: border distances scatter around 4 voxels, within one voxel.
    assert metrics.hd95(inner, outer, None) == pytest.approx(4.0, abs=1.0)


def test_nsd_is_zero_below_and_one_above_the_gap():
    # A cube inside a cube grown by 2 voxels: every border voxel of either is at least 2 and
    # at most 2*sqrt(3) (corners) from the other border.
    inner, outer = _cube(), _cube(grow=2)
    assert metrics.surface_dice(inner, outer, None, 1.99) == 0.0
    assert metrics.surface_dice(inner, outer, None, 2 * math.sqrt(3) + 1e-6) == 1.0
    assert 0.0 < metrics.surface_dice(inner, outer, None, 2.0) < 1.0


def _brute_force_nsd(pred, ref, spacing, tolerance):
    def border_points(mask):
        return np.argwhere(metrics._border(mask)) * np.asarray(spacing)

    pred_points, ref_points = border_points(pred), border_points(ref)
    pred_to_ref = cKDTree(ref_points).query(pred_points)[0]
    ref_to_pred = cKDTree(pred_points).query(ref_points)[0]
    within = (pred_to_ref <= tolerance).sum() + (ref_to_pred <= tolerance).sum()
    return within / (len(pred_to_ref) + len(ref_to_pred))


def test_anisotropic_spacing_moves_the_z_faces_out_of_tolerance():
    inner, outer = _cube(), _cube(grow=2)
    tolerance = 2 * math.sqrt(3) + 1e-6
    assert metrics.surface_dice(inner, outer, (1.0, 1.0, 1.0), tolerance) == 1.0
    # With 3 mm slices the z faces are 6 mm apart: they fall outside a 3.47 mm tolerance.
    anisotropic = metrics.surface_dice(inner, outer, (3.0, 1.0, 1.0), tolerance)
    assert anisotropic < 0.9
    assert anisotropic == pytest.approx(_brute_force_nsd(inner, outer, (3.0, 1.0, 1.0), tolerance))


@pytest.mark.parametrize("corner", [(5, 5), (0, 0), (28, 0)])
def test_2d_nsd_matches_brute_force_over_the_whole_image(corner):
    # Shapes touching the image edge check that cropping to the masks changes no border.
    a = _square(top=corner[0], left=corner[1], size=12)
    b = _square(top=corner[0] + 3, left=corner[1] + 4, size=9)
    for tolerance in (0.5, 1.5, 3.0):
        expected = _brute_force_nsd(a, b, (0.8, 1.3), tolerance)
        assert metrics.surface_dice(a, b, (0.8, 1.3), tolerance) == pytest.approx(expected)


def test_bad_input_raises_input_error():
    with pytest.raises(InputError, match="shape"):
        metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="Spacing"):
        metrics.hd95(_square(), _square(left=7), (1.0, 1.0, 1.0))


def test_case_metrics_reports_foreground_and_per_class_keys():
    ref = np.zeros((40, 40), np.uint8)
    ref[5:15, 5:15] = 1
    ref[20:30, 20:30] = 2
    pred = ref.copy()
    pred[20:30, 20:25] = 1  # half of class 2 predicted as class 1
    result = metrics.case_metrics(pred, ref, spacing=(1.0, 1.0), labels={"ggo": 1, "consolidation": 2})
    assert result["dice"] == 1.0  # foreground is identical
    assert result["dice_consolidation"] == pytest.approx(2 * 50 / 150)
    assert result["dice_ggo"] == pytest.approx(2 * 100 / 250)
    assert result["sensitivity_consolidation"] == pytest.approx(0.5)
    assert set(result) >= {"nsd", "hd95", "nsd_ggo", "hd95_consolidation", "specificity_ggo"}
    assert all(type(value) is float for value in result.values())  # plain floats for JSON reports


def test_summarise_gives_mean_sd_and_skips_non_finite_values():
    cases = [
        {"name": "a", "dice": 0.5, "hd95": 2.0},
        {"name": "b", "dice": 0.7, "hd95": math.inf},
        {"name": "c", "dice": 0.9, "hd95": 4.0},
    ]
    summary = metrics.summarise(cases)
    assert summary["cases"] == 3
    assert summary["mean_dice"] == pytest.approx(0.7)
    assert summary["metrics"]["dice"]["sd"] == pytest.approx(0.2)
    assert summary["metrics"]["hd95"] == {"mean": 3.0, "sd": pytest.approx(math.sqrt(2)), "n": 2}
    assert "name" not in summary["metrics"]
