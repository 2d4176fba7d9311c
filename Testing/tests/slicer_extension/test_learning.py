"""Save as correction: the edited infection, the model's original and the CT go into a real CorrectionStore."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_results import synthetic_result

from COVIDInfectionSegLib import InfectionSegmentationLogic
from COVIDInfectionSegLib.learning import CorrectionError


def test_edited_segmentation_is_stored_with_the_original(lung_ct, tmp_path):
    import slicer

    logic = InfectionSegmentationLogic()
    result = synthetic_result(lung_ct)
    segmentation = logic.show_result(lung_ct, result, show3D=False)
    unedited = logic.save_correction(lung_ct, segmentation, tmp_path / "store")
    assert unedited.edited is False  # the panel warns: nothing was corrected

    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Infection")
    corrected = (result.infection > 0).astype(np.uint8)
    corrected[25:27, 200:230, 100:130] = 1  # the radiologist adds a lesion on slices 25-26
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, segmentation, infection_id, lung_ct)
    record = logic.save_correction(lung_ct, segmentation, tmp_path / "store")
    assert record.edited is True
    assert record.metadata["revision"] == 2  # same case saved twice: updated, not duplicated
    np.testing.assert_array_equal(sitk.GetArrayFromImage(record.read_corrected()), corrected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(record.read_original()), result.infection)
    ct = record.read_ct()
    assert ct.GetSize() == lung_ct.GetImageData().GetDimensions()
    assert record.model["name"] == "synthetic"


def test_segmentation_not_made_by_the_module_is_refused(lung_ct, tmp_path):
    import slicer

    own = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(CorrectionError, match="not produced by COVIDInfectionSeg"):
        InfectionSegmentationLogic().save_correction(lung_ct, own, tmp_path / "store")
