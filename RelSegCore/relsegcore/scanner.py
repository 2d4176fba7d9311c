"""What real scanners store in a CT that the training slices lacked: padding and metal.

Real series set the voxels outside the circular scan field to -3024 (or -2048), and an ECG electrode
or a port stores metal above 4095 HU. ``padded_with_metal`` makes both from a clean CT, for the test
that the pipeline segments such a CT like the clean one
(``test_ctseg.py::test_a_real_ct_padded_outside_its_scan_field_with_metal_segments_like_the_clean_one``)
and for the benchmark whose table a model card records (``Testing/benchmarks/padded_scan_field.py``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

PADDING_HU = -3024
METAL_HU = 6000


def padded_with_metal(clean: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """``clean`` with a 3 x 3 electrode of metal on the skin (middle slice, anterior midline), and that CT
    also padded outside a circular scan field that holds the body and the table, as scanners store it."""
    array = sitk.GetArrayFromImage(clean).astype(np.int16)
    _, rows, cols = array.shape
    z, x = len(array) // 2, cols // 2
    skin = int(np.flatnonzero(array[z, :, x] > -200)[-1])
    array[z, skin - 2: skin + 1, x - 1: x + 2] = METAL_HU
    with_metal = sitk.GetImageFromArray(array)
    yy, xx = np.mgrid[:rows, :cols]
    distance2 = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2
    outside = distance2 > distance2[(array > -500).any(axis=0)].max() + 3 ** 2
    if outside.mean() <= 0.05:
        raise ValueError("the body fills the field of view: no corners to pad")
    array[:, outside] = PADDING_HU
    padded = sitk.GetImageFromArray(array)
    for image in (with_metal, padded):
        image.CopyInformation(clean)
    return with_metal, padded
