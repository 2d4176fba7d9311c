"""Save as correction: the edited infection, the model's original and the CT go into a real CorrectionStore."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_results import scaled_box, synthetic_result

from COVIDInfectionSegLib import InfectionSegmentationLogic
from COVIDInfectionSegLib.learning import CorrectionError


def test_edited_segmentation_is_stored_with_the_original(ct_volume, tmp_path):
    import slicer

    logic = InfectionSegmentationLogic()
    result = synthetic_result(ct_volume)
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    unedited = logic.save_correction(ct_volume, segmentation, tmp_path / "store")
    assert unedited.edited is False  # the panel warns: nothing was corrected

    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Infection")
    corrected = (result.infection > 0).astype(np.uint8)
    corrected[scaled_box(corrected.shape, (25, 27), (200, 230), (100, 130))] = 1  # the radiologist adds a lesion
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, segmentation, infection_id, ct_volume)
    record = logic.save_correction(ct_volume, segmentation, tmp_path / "store")
    assert record.edited is True
    assert record.metadata["revision"] == 2  # same case saved twice: updated, not duplicated
    np.testing.assert_array_equal(sitk.GetArrayFromImage(record.read_corrected()), corrected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(record.read_original()), result.infection)
    ct = record.read_ct()
    assert ct.GetSize() == ct_volume.GetImageData().GetDimensions()
    assert record.model["name"] == "synthetic"


def test_segmentation_not_made_by_the_module_is_refused(ct_volume, tmp_path):
    import slicer

    own = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(CorrectionError, match="not produced by COVIDInfectionSeg"):
        InfectionSegmentationLogic().save_correction(ct_volume, own, tmp_path / "store")


def test_fine_tuning_runs_in_a_separate_process_and_registers_a_new_version(ct_volume, test_model, tmp_path,
                                                                          monkeypatch):
    import slicer

    from COVIDInfectionSegLib import learning, models
    from COVIDInfectionSegLib.process import SUCCEEDED
    from relsegcore.registry import ModelRegistry

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    parent = ModelRegistry().register(test_model).name
    volume = ct_volume
    logic = InfectionSegmentationLogic()
    segmentation = logic.segment(volume, model=parent, device="cpu", show3D=False)
    # The binary model's infection comes as ground-glass + consolidation: the radiologist edits the ground-glass.
    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Ground-glass opacity")
    edited = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, infection_id, volume)
    assert edited.any()
    lungs = slicer.util.arrayFromSegmentBinaryLabelmap(
        segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName("Right lung"), volume)
    # Two corrected cases: the radiologist erases all infection, then marks the whole right lung.
    for case_id, corrected in (("case-a", np.zeros_like(edited)), ("case-b", edited | lungs)):
        slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, segmentation, infection_id, volume)
        assert logic.save_correction(volume, segmentation, tmp_path / "store", case_id=case_id).edited

    process = learning.start_fine_tuning(parent, tmp_path / "store", device="cpu", iterations=2)
    assert process.wait(timeout_s=180) == SUCCEEDED, process.error
    assert process.fraction == 1.0 or process.stage
    assert process.output_lines and "Dice" in " ".join(process.output_lines)
    names = [choice.name for choice in models.model_choices()]
    assert parent in names and len(names) >= 2  # the new version is listed beside its parent
