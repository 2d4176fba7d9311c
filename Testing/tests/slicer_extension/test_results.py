"""Results into the scene: one segmentation node on the CT's geometry, named and coded segments, table, .seg.nrrd."""

from __future__ import annotations

import numpy as np
import pytest
import slicerio

from COVIDInfectionSegLib import InfectionSegmentationLogic, ResultArrays, SegmentationEditedError
from COVIDInfectionSegLib.results import FINGERPRINT_ATTRIBUTE

LUNG_NAMES = ["Left lung", "Right lung"]


def synthetic_result(volume, class_names=("Infection",)) -> ResultArrays:
    """Two box lungs (patient's left = RAS +x = low i for this CT) with infection inside, on the volume's grid."""
    import slicer

    shape = slicer.util.arrayFromVolume(volume).shape  # (k, j, i)
    lungs = np.zeros(shape, np.uint8)
    lungs[5:30, 150:350, 60:240] = 1
    lungs[5:30, 150:350, 270:450] = 2
    infection = np.zeros(shape, np.uint8)
    infection[10:20, 200:260, 100:160] = 1
    infection[12:18, 280:320, 300:380] = len(class_names)
    report = {"model": {"name": "synthetic", "version": "0", "sha256": "0" * 64}, "device": "cpu"}
    return ResultArrays(lungs=lungs, infection=infection, class_names=list(class_names), report=report)


def node_ids() -> set[str]:
    import slicer

    return {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def mask(segmentation_node, name, volume) -> np.ndarray:
    import slicer

    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume) > 0  # Slicer's own


def assert_on_volume_grid(segmentation, volume, atol: float = 1e-5) -> None:
    """The segmentation's reference geometry is the volume's IJK-to-RAS grid and extent."""
    import slicer
    import vtk

    geometry = slicer.vtkOrientedImageData()
    reference = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference, geometry, False)
    seg_matrix, volume_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(seg_matrix)
    volume.GetIJKToRASMatrix(volume_matrix)
    elements = lambda m: [m.GetElement(r, c) for r in range(4) for c in range(4)]  # noqa: E731
    np.testing.assert_allclose(elements(seg_matrix), elements(volume_matrix), atol=atol)
    assert geometry.GetExtent() == volume.GetImageData().GetExtent()


def test_result_lands_on_the_ct_grid_with_names_colours_and_terminology(lung_ct):
    import slicer

    result = synthetic_result(lung_ct)
    nodes_before = node_ids()
    segmentation = InfectionSegmentationLogic().show_result(lung_ct, result, show3D=False)
    # Only the segmentation and its display node were added: temporary label volumes are gone.
    added = [slicer.mrmlScene.GetNodeByID(node_id).GetClassName() for node_id in node_ids() - nodes_before]
    assert sorted(added) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"]
    assert segment_names(segmentation) == [*LUNG_NAMES, "Infection"]
    # Each lung segment is the whole lung (overlapping the infection), voxel for voxel.
    np.testing.assert_array_equal(mask(segmentation, "Left lung", lung_ct), result.lungs == 1)
    np.testing.assert_array_equal(mask(segmentation, "Right lung", lung_ct), result.lungs == 2)
    np.testing.assert_array_equal(mask(segmentation, "Infection", lung_ct), result.infection == 1)
    infection = mask(segmentation, "Infection", lung_ct)
    lungs = mask(segmentation, "Left lung", lung_ct) | mask(segmentation, "Right lung", lung_ct)
    assert infection.any() and not (infection & ~lungs).any()
    from relsegcore import terminology

    segments = segmentation.GetSegmentation()
    for definition in [*terminology.lung_definitions(), *terminology.infection_definitions(["Infection"])]:
        segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(definition.name))
        assert segment.GetTerminology() == definition.terminology_entry
        np.testing.assert_allclose(segment.GetColor(), definition.color, atol=1e-6)
    assert "Inflammation" in segments.GetSegment(segments.GetSegmentIdBySegmentName("Infection")).GetTerminology()


def test_reference_geometry_matches_the_volume(lung_ct):
    segmentation = InfectionSegmentationLogic().show_result(lung_ct, synthetic_result(lung_ct), show3D=False)
    assert_on_volume_grid(segmentation, lung_ct, atol=1e-6)


def test_three_class_result_and_3d_display(lung_ct):
    result = synthetic_result(lung_ct, ("Ground-glass opacity", "Consolidation"))
    segmentation = InfectionSegmentationLogic().show_result(lung_ct, result)
    assert segment_names(segmentation) == [*LUNG_NAMES, "Ground-glass opacity", "Consolidation"]
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    display = segmentation.GetDisplayNode()
    consolidation = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Consolidation")
    assert display.GetSegmentVisibility3D(consolidation) and display.GetSegmentVisibility2DFill(consolidation)
    assert display.GetSegmentOpacity3D(consolidation) == 1.0


def test_segmentation_goes_under_the_ct_study(lung_ct):
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    volume_item = hierarchy.GetItemByDataNode(lung_ct)
    if volume_item:
        hierarchy.SetItemParent(volume_item, study)
    else:  # the DICOM module's job in Slicer
        hierarchy.CreateItem(study, lung_ct)
    segmentation = InfectionSegmentationLogic().show_result(lung_ct, synthetic_result(lung_ct), show3D=False)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study


def test_table_values_equal_the_measured_masks(lung_ct):
    import slicer

    result = synthetic_result(lung_ct)
    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(lung_ct, result, show3D=False)
    table = logic.quantify(segmentation, lung_ct)
    voxel_ml = float(np.prod(lung_ct.GetSpacing())) / 1000
    left, right = (result.lungs == 1).sum() * voxel_ml, (result.lungs == 2).sum() * voxel_ml
    infection_left = ((result.infection > 0) & (result.lungs == 1)).sum() * voxel_ml
    assert table.GetNumberOfRows() == 3
    assert [table.GetCellText(row, 0) for row in range(3)] == ["Left lung", "Right lung", "Both lungs"]
    values = slicer.util.arrayFromTableColumn(table, "Lung volume (mL)")
    np.testing.assert_allclose(values, [left, right, left + right], rtol=1e-9)
    opacity = slicer.util.arrayFromTableColumn(table, "Opacity (%)")
    assert opacity[0] == pytest.approx(100 * infection_left / left)


def test_edited_segmentation_is_never_overwritten_without_consent(lung_ct):
    import slicer

    logic = InfectionSegmentationLogic()
    result = synthetic_result(lung_ct)
    segmentation = logic.show_result(lung_ct, result, show3D=False)
    fingerprint = segmentation.GetAttribute(FINGERPRINT_ATTRIBUTE)
    logic.show_result(lung_ct, result, segmentation, show3D=False)  # unedited: replaced silently
    assert segmentation.GetAttribute(FINGERPRINT_ATTRIBUTE) == fingerprint
    assert not logic.isEdited(segmentation)

    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Infection")
    edited = mask(segmentation, "Infection", lung_ct).astype(np.uint8)
    edited[10:12] = 0  # the radiologist erases two slices
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, infection_id, lung_ct)
    assert logic.isEdited(segmentation)
    with pytest.raises(SegmentationEditedError, match="edited"):
        logic.show_result(lung_ct, result, segmentation, show3D=False)
    np.testing.assert_array_equal(mask(segmentation, "Infection", lung_ct), edited > 0)  # edit kept
    logic.show_result(lung_ct, result, segmentation, overwrite=True, show3D=False)
    np.testing.assert_array_equal(mask(segmentation, "Infection", lung_ct), result.infection > 0)


def test_user_segmentation_is_not_ours_to_overwrite(lung_ct):
    import slicer

    own = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my tumour")
    own.CreateDefaultDisplayNodes()
    own.GetSegmentation().AddEmptySegment("tumour", "tumour")
    with pytest.raises(SegmentationEditedError, match="did not create"):
        InfectionSegmentationLogic().show_result(lung_ct, synthetic_result(lung_ct), own, show3D=False)
    assert segment_names(own) == ["tumour"]


def test_seg_nrrd_written_from_the_node_reads_back_in_slicerio(lung_ct, tmp_path):

    result = synthetic_result(lung_ct)
    segmentation = InfectionSegmentationLogic().show_result(lung_ct, result, show3D=False)
    storage = segmentation.CreateDefaultStorageNode()
    path = tmp_path / "result.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)

    read = slicerio.read_segmentation(str(path))
    assert [segment["name"] for segment in read["segments"]] == [*LUNG_NAMES, "Infection"]
    expected = {"Left lung": (result.lungs == 1).sum(), "Right lung": (result.lungs == 2).sum(),
                "Infection": (result.infection == 1).sum()}
    for name, count in expected.items():
        assert slicerio.segment_mask(read, name).sum() == count
    terminology = {segment["name"]: segment.get("terminology", {}) for segment in read["segments"]}
    assert terminology["Left lung"]["type"] == ["SCT", "44029006", "Left lung"]
    assert terminology["Infection"]["type"] == ["SCT", "23583003", "Inflammation"]
    assert not any(segment["nameAutoGenerated"] or segment["colorAutoGenerated"] for segment in read["segments"])


def test_blocking_segment_refuses_an_edited_output_before_any_work(lung_ct):
    import slicer

    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(lung_ct, synthetic_result(lung_ct), show3D=False)
    right_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Right lung")
    segmentation.GetSegmentation().GetSegment(right_id).SetName("Right lung (edited)")
    started = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(SegmentationEditedError):
        logic.segment(lung_ct, segmentation, model="no-such-model")  # refused before the model is even looked up
    assert slicer.mrmlScene.GetNumberOfNodes() == started
    assert "Right lung (edited)" in segment_names(segmentation)
