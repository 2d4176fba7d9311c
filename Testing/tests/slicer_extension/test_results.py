"""Results into the scene: one segmentation node on the CT's geometry, named and coded segments, table, .seg.nrrd."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import slicerio

from COVIDInfectionSegLib import InfectionSegmentationLogic, ResultArrays, SegmentationEditedError
from COVIDInfectionSegLib.results import FINGERPRINT_ATTRIBUTE

LUNG_NAMES = ["Left lung", "Right lung"]
SPLIT_NAMES = ["Ground-glass opacity", "Consolidation"]
BOX_SHAPE = (48, 512, 512)  # (k, j, i) of lung1, the CT the boxes below were drawn on; other CTs scale them


def scaled_box(shape, *ranges: tuple[int, int]) -> tuple[slice, ...]:
    """Index ranges drawn on a BOX_SHAPE volume, scaled to ``shape``."""
    return tuple(slice(round(start * n / m), round(stop * n / m))
                 for (start, stop), n, m in zip(ranges, shape, BOX_SHAPE, strict=True))


def synthetic_result(volume, class_names=("Infection",)) -> ResultArrays:
    """Two box lungs (label 1 at low i) with infection inside, on the volume's grid."""
    import slicer

    shape = slicer.util.arrayFromVolume(volume).shape  # (k, j, i)
    lungs = np.zeros(shape, np.uint8)
    lungs[scaled_box(shape, (5, 30), (150, 350), (60, 240))] = 1
    lungs[scaled_box(shape, (5, 30), (150, 350), (270, 450))] = 2
    infection = np.zeros(shape, np.uint8)
    infection[scaled_box(shape, (10, 20), (200, 260), (100, 160))] = 1
    infection[scaled_box(shape, (12, 18), (280, 320), (300, 380))] = len(class_names)
    report = {"model": {"name": "synthetic", "version": "0", "sha256": "0" * 64}, "device": "cpu"}
    return ResultArrays(lungs=lungs, infection=infection, class_names=list(class_names), report=report)


def known_hu_result(volume) -> ResultArrays:
    """``synthetic_result`` on a CT whose HU it sets: lungs -850, the left lesion half at -500 and half at 0 HU,
    the right lesion at -500 HU; labelled as the pipeline splits a binary model (1 below -200 HU, 2 at or above)."""
    import slicer

    result = synthetic_result(volume)
    hu = slicer.util.arrayFromVolume(volume)
    hu[result.lungs > 0] = -850
    infected = result.infection > 0
    hu[infected] = -500
    left_lesion = np.flatnonzero((infected & (result.lungs == 1)).ravel())
    hu.flat[left_lesion[len(left_lesion) // 2:]] = 0  # the second half of its voxels (in k order)
    slicer.util.arrayFromVolumeModified(volume)
    labels = np.where(infected, np.where(hu >= -200, 2, 1), 0).astype(np.uint8)
    report = {**result.report, "high_opacity_hu": -200.0}
    return ResultArrays(lungs=result.lungs, infection=labels, class_names=SPLIT_NAMES, report=report)


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


def test_result_lands_on_the_ct_grid_with_names_colours_and_terminology(ct_volume):
    import slicer

    result = synthetic_result(ct_volume)
    nodes_before = node_ids()
    segmentation = InfectionSegmentationLogic().show_result(ct_volume, result, show3D=False)
    # Only the segmentation and its display node were added: temporary label volumes are gone.
    added = [slicer.mrmlScene.GetNodeByID(node_id).GetClassName() for node_id in node_ids() - nodes_before]
    assert sorted(added) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"]
    assert segment_names(segmentation) == [*LUNG_NAMES, "Infection"]
    # Each lung segment is the whole lung (overlapping the infection), voxel for voxel.
    np.testing.assert_array_equal(mask(segmentation, "Left lung", ct_volume), result.lungs == 1)
    np.testing.assert_array_equal(mask(segmentation, "Right lung", ct_volume), result.lungs == 2)
    np.testing.assert_array_equal(mask(segmentation, "Infection", ct_volume), result.infection == 1)
    infection = mask(segmentation, "Infection", ct_volume)
    lungs = mask(segmentation, "Left lung", ct_volume) | mask(segmentation, "Right lung", ct_volume)
    assert infection.any() and not (infection & ~lungs).any()
    from relsegcore import terminology

    segments = segmentation.GetSegmentation()
    for definition in [*terminology.lung_definitions(), *terminology.infection_definitions(["Infection"])]:
        segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(definition.name))
        assert segment.GetTerminology() == definition.terminology_entry
        np.testing.assert_allclose(segment.GetColor(), definition.color, atol=1e-6)
    assert "Inflammation" in segments.GetSegment(segments.GetSegmentIdBySegmentName("Infection")).GetTerminology()


def test_reference_geometry_matches_the_volume(ct_volume):
    segmentation = InfectionSegmentationLogic().show_result(ct_volume, synthetic_result(ct_volume), show3D=False)
    assert_on_volume_grid(segmentation, ct_volume, atol=1e-6)


def test_three_class_result_and_3d_display(ct_volume):
    result = synthetic_result(ct_volume, ("Ground-glass opacity", "Consolidation"))
    segmentation = InfectionSegmentationLogic().show_result(ct_volume, result)
    assert segment_names(segmentation) == [*LUNG_NAMES, "Ground-glass opacity", "Consolidation"]
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    display = segmentation.GetDisplayNode()
    consolidation = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Consolidation")
    assert display.GetSegmentVisibility3D(consolidation) and display.GetSegmentVisibility2DFill(consolidation)
    assert display.GetSegmentOpacity3D(consolidation) == 1.0


def test_segmentation_goes_under_the_ct_study(ct_volume):
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    volume_item = hierarchy.GetItemByDataNode(ct_volume)
    if volume_item:
        hierarchy.SetItemParent(volume_item, study)
    else:  # the DICOM module's job in Slicer
        hierarchy.CreateItem(study, ct_volume)
    segmentation = InfectionSegmentationLogic().show_result(ct_volume, synthetic_result(ct_volume), show3D=False)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study


def test_table_values_equal_the_measured_masks(ct_volume):
    import slicer

    result = synthetic_result(ct_volume)
    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    table = logic.quantify(segmentation, ct_volume)
    voxel_ml = float(np.prod(ct_volume.GetSpacing())) / 1000
    left, right = (result.lungs == 1).sum() * voxel_ml, (result.lungs == 2).sum() * voxel_ml
    infection_left = ((result.infection > 0) & (result.lungs == 1)).sum() * voxel_ml
    assert table.GetNumberOfRows() == 3
    assert [table.GetCellText(row, 0) for row in range(3)] == ["Left lung", "Right lung", "Both lungs"]
    values = slicer.util.arrayFromTableColumn(table, "Lung volume (mL)")
    np.testing.assert_allclose(values, [left, right, left + right], rtol=1e-9)
    opacity = slicer.util.arrayFromTableColumn(table, "Opacity PO (%)")
    assert opacity[0] == pytest.approx(100 * infection_left / left)


def table_column(table, title: str) -> dict[str, float]:
    import slicer

    values = slicer.util.arrayFromTableColumn(table, title)
    return {table.GetCellText(row, 0): float(values[row]) for row in range(table.GetNumberOfRows())}


def test_table_gives_po_pho_and_the_ground_glass_and_consolidation_rows_on_known_hu(ct_volume):
    result = known_hu_result(ct_volume)
    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    assert segment_names(segmentation) == [*LUNG_NAMES, *SPLIT_NAMES]
    table = logic.quantify(segmentation, ct_volume)
    assert [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())] == [
        "Left lung", "Right lung", "Both lungs", *SPLIT_NAMES]
    voxel_ml = float(np.prod(ct_volume.GetSpacing())) / 1000
    lungs = {"Left lung": result.lungs == 1, "Right lung": result.lungs == 2, "Both lungs": result.lungs > 0}
    po, pho = table_column(table, "Opacity PO (%)"), table_column(table, "High opacity PHO (%)")
    for region, lung in lungs.items():
        assert po[region] == pytest.approx(100 * ((result.infection > 0) & lung).sum() / lung.sum())
        assert pho[region] == pytest.approx(100 * ((result.infection == 2) & lung).sum() / lung.sum())
    assert pho["Left lung"] == pytest.approx(po["Left lung"] / 2)  # half the lesion at 0 HU, half at -500 HU
    assert po["Right lung"] > 0 and pho["Right lung"] == 0.0
    volumes = table_column(table, "Infection volume (mL)")
    for label, name in enumerate(SPLIT_NAMES, start=1):
        assert volumes[name] == pytest.approx((result.infection == label).sum() * voxel_ml)
        assert po[name] == pytest.approx(100 * (result.infection == label).sum() / (result.lungs > 0).sum())
        assert np.isnan(pho[name]) and np.isnan(table_column(table, "Lung volume (mL)")[name])


def test_update_numbers_measures_the_edited_segments_against_the_cts_hu(ct_volume):
    """The radiologist erases the dense half of the left lesion, then paints it back into the wrong segment:
    PO follows the segments, PHO the HU under them."""
    import slicer

    result = known_hu_result(ct_volume)
    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    lung_voxels = (result.lungs == 1).sum()
    dense = result.infection == 2
    segments = segmentation.GetSegmentation()

    def paint(name: str, array: np.ndarray) -> None:
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            array.astype(np.uint8), segmentation, segments.GetSegmentIdBySegmentName(name), ct_volume)

    paint("Consolidation", np.zeros_like(dense))
    measured = logic.measure(segmentation, ct_volume)
    assert measured["percent_opacity"]["left"] == pytest.approx(100 * (result.infection == 1)[result.lungs == 1].sum()
                                                                / lung_voxels)
    assert measured["percent_high_opacity"]["left"] == 0.0

    paint("Ground-glass opacity", result.infection > 0)  # the dense half, called ground-glass by mistake
    measured = logic.measure(segmentation, ct_volume)
    assert measured["percent_opacity"]["left"] == pytest.approx(100 * (result.infection > 0)[result.lungs == 1].sum()
                                                                / lung_voxels)
    assert measured["percent_high_opacity"]["left"] == pytest.approx(100 * dense[result.lungs == 1].sum() / lung_voxels)
    assert measured["infection"]["classes"]["Consolidation"]["total_ml"] == 0.0


def test_the_threshold_moves_pho_and_defaults_to_the_one_the_result_was_made_with(ct_volume):
    result = known_hu_result(ct_volume)
    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    po = logic.measure(segmentation, ct_volume)["percent_opacity"]
    assert logic.measure(segmentation, ct_volume, highOpacityHU=-600.0)["percent_high_opacity"] == pytest.approx(po)
    assert logic.measure(segmentation, ct_volume, highOpacityHU=100.0)["percent_high_opacity"]["overall"] == 0.0
    at_default = logic.measure(segmentation, ct_volume)["percent_high_opacity"]["left"]
    assert at_default == pytest.approx(po["left"] / 2)

    made_at = logic.show_result(ct_volume, replace(result, report={**result.report, "high_opacity_hu": -600.0}),
                                show3D=False)
    measured = logic.measure(made_at, ct_volume)
    assert measured["high_opacity_hu"] == -600.0 and measured["percent_high_opacity"] == pytest.approx(po)


def test_edited_segmentation_is_never_overwritten_without_consent(ct_volume):
    import slicer

    logic = InfectionSegmentationLogic()
    result = synthetic_result(ct_volume)
    segmentation = logic.show_result(ct_volume, result, show3D=False)
    fingerprint = segmentation.GetAttribute(FINGERPRINT_ATTRIBUTE)
    logic.show_result(ct_volume, result, segmentation, show3D=False)  # unedited: replaced silently
    assert segmentation.GetAttribute(FINGERPRINT_ATTRIBUTE) == fingerprint
    assert not logic.isEdited(segmentation)

    infection_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Infection")
    edited = mask(segmentation, "Infection", ct_volume).astype(np.uint8)
    first = np.flatnonzero(edited.any(axis=(1, 2)))[0]
    edited[first:first + 2] = 0  # the radiologist erases two slices
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, infection_id, ct_volume)
    assert logic.isEdited(segmentation)
    with pytest.raises(SegmentationEditedError, match="edited"):
        logic.show_result(ct_volume, result, segmentation, show3D=False)
    np.testing.assert_array_equal(mask(segmentation, "Infection", ct_volume), edited > 0)  # edit kept
    logic.show_result(ct_volume, result, segmentation, overwrite=True, show3D=False)
    np.testing.assert_array_equal(mask(segmentation, "Infection", ct_volume), result.infection > 0)


def test_user_segmentation_is_not_ours_to_overwrite(ct_volume):
    import slicer

    own = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my tumour")
    own.CreateDefaultDisplayNodes()
    own.GetSegmentation().AddEmptySegment("tumour", "tumour")
    with pytest.raises(SegmentationEditedError, match="did not create"):
        InfectionSegmentationLogic().show_result(ct_volume, synthetic_result(ct_volume), own, show3D=False)
    assert segment_names(own) == ["tumour"]


def test_seg_nrrd_written_from_the_node_reads_back_in_slicerio(ct_volume, tmp_path):

    result = synthetic_result(ct_volume)
    segmentation = InfectionSegmentationLogic().show_result(ct_volume, result, show3D=False)
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


def test_blocking_segment_refuses_an_edited_output_before_any_work(ct_volume):
    import slicer

    logic = InfectionSegmentationLogic()
    segmentation = logic.show_result(ct_volume, synthetic_result(ct_volume), show3D=False)
    right_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Right lung")
    segmentation.GetSegmentation().GetSegment(right_id).SetName("Right lung (edited)")
    started = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(SegmentationEditedError):
        logic.segment(ct_volume, segmentation, model="no-such-model")  # refused before the model is even looked up
    assert slicer.mrmlScene.GetNumberOfNodes() == started
    assert "Right lung (edited)" in segment_names(segmentation)
