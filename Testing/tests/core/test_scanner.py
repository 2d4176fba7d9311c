"""The padded-scan-field construction the padded test and its benchmark share (``relsegcore.scanner``)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from relsegcore.demo import make_demo_ct
from relsegcore.scanner import METAL_HU, PADDING_HU, padded_with_metal


def test_metal_lands_on_the_skin_and_padding_only_outside_a_circle_holding_the_body():
    clean = sitk.Cast(make_demo_ct().image, sitk.sitkInt16)
    spacing = clean.GetSpacing()
    with_metal, padded = (sitk.GetArrayFromImage(image) for image in padded_with_metal(clean))
    original = sitk.GetArrayFromImage(clean)
    metal = with_metal == METAL_HU
    assert metal.sum() == 9 and np.array_equal(with_metal[~metal], original[~metal])  # 3 x 3, nothing else changed
    z, rows, cols = np.argwhere(metal).T
    assert set(z) == {len(original) // 2} and set(cols) == {original.shape[2] // 2 - 1, original.shape[2] // 2,
                                                             original.shape[2] // 2 + 1}
    assert (original[z[0], rows.max() + 1:, cols[0]] <= -200).all()  # the last tissue row: on the skin
    outside = padded == PADDING_HU
    assert 0.05 < outside[0].mean() < 0.5 and (outside == outside[0]).all()  # the same corners on every slice
    assert (original[outside] < -500).all()  # only air was padded, never the body
    assert np.array_equal(padded[~outside], with_metal[~outside])
    assert padded_with_metal(clean)[1].GetSpacing() == pytest.approx(spacing)


def test_a_body_filling_the_field_of_view_has_no_corners_to_pad():
    clean = sitk.GetImageFromArray(np.zeros((3, 32, 32), np.int16))
    with pytest.raises(ValueError, match="no corners"):
        padded_with_metal(clean)
