"""The real pipeline from a volume node to the segmentation node: blocking and in a separate process.

The synthetic demo CT, and real CTs in HU read by Slicer's storage node where ../shared/data has
them; relsegcore runs for real (the shipped model when present, else a tiny model saved like one).
Checks geometry, names, infection inside the lungs, table = report (PO and PHO included), and the
.seg.nrrd written from the node.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from headless_slicer import load_volume, volume_from_image
from test_results import assert_on_volume_grid, mask, node_ids, segment_names

from COVIDInfectionSegLib import InfectionSegmentationLogic, SegmentationProcess, stored_report
from COVIDInfectionSegLib.process import SUCCEEDED

SMALL_CT = "ct-fixtures/totalsegmentator-example/example_ct_sm.nii.gz"


def assert_consistent_result(segmentation, volume, logic) -> dict:
    """Names, infection inside the lungs, and the measured table equal to the pipeline's report."""
    report = stored_report(segmentation)
    infection_names = [c["name"] for c in sorted(report["infection"]["classes"].values(), key=lambda c: c["label"])]
    assert infection_names == ["Ground-glass opacity", "Consolidation"]  # a binary model's infection, split by HU
    assert segment_names(segmentation) == ["Left lung", "Right lung", *infection_names]
    lungs = mask(segmentation, "Left lung", volume) | mask(segmentation, "Right lung", volume)
    assert lungs.sum() > 1000
    for name in infection_names:
        assert not (mask(segmentation, name, volume) & ~lungs).any()
    measured = logic.measure(segmentation, volume)
    for group in ("lungs", "percent_opacity", "percent_high_opacity"):
        for key, value in report[group].items():
            assert measured[group][key] == pytest.approx(value or 0.0, rel=1e-6, abs=1e-9), (group, key)
    for key in ("left_ml", "right_ml", "total_ml"):
        assert measured["infection"][key] == pytest.approx(report["infection"][key], rel=1e-6, abs=1e-9)
    import slicer

    table = logic.quantify(segmentation, volume)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "Lung volume (mL)")[:3],
                               [report["lungs"]["left_ml"], report["lungs"]["right_ml"], report["lungs"]["total_ml"]],
                               rtol=1e-6)
    classes = [report["infection"]["classes"][key]["total_ml"] for key in ("ground_glass", "consolidation")]
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "Infection volume (mL)")[3:], classes,
                               rtol=1e-6, atol=1e-9)
    return report


def test_chest_ct_blocking_path(ct_volume, test_model, tmp_path):
    logic = InfectionSegmentationLogic()
    stages = []
    segmentation = logic.segment(ct_volume, model=str(test_model), device="cpu", show3D=False,
                                 progress=lambda fraction, stage: stages.append((fraction, stage)))
    assert_on_volume_grid(segmentation, ct_volume)
    report = assert_consistent_result(segmentation, ct_volume, logic)
    assert report["lungs"]["left_ml"] > 300 and report["lungs"]["right_ml"] > 300  # a real adult chest
    assert [stage for _, stage in stages][-1] == "Report" and stages[-1][0] == 1.0

    storage = segmentation.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "lung1.seg.nrrd"))
    assert storage.WriteData(segmentation)
    read = slicerio.read_segmentation(str(tmp_path / "lung1.seg.nrrd"))
    assert [segment["name"] for segment in read["segments"]] == segment_names(segmentation)
    assert slicerio.segment_mask(read, "Right lung").sum() == mask(segmentation, "Right lung", ct_volume).sum()


def oblique_copy(image: sitk.Image, tmp_path):
    """The same voxels with a rotated direction (an oblique acquisition), written as NIfTI."""
    image = sitk.Image(image)
    rotation = np.array(sitk.VersorTransform((0.0, 0.0, 1.0), 0.3).GetMatrix()).reshape(3, 3)
    image.SetDirection((rotation @ np.array(image.GetDirection()).reshape(3, 3)).flatten().tolist())
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(params=["demo", "small CT"])
def ct_image(request, demo_ct) -> sitk.Image:
    """The synthetic demo CT always, the real small CT where ../shared/data has it."""
    if request.param == "demo":
        return demo_ct
    return sitk.ReadImage(str(request.getfixturevalue("shared_data") / SMALL_CT))


def test_oblique_ct_result_stays_on_the_volume_grid(mrml, ct_image, test_model, tmp_path):
    volume = load_volume(oblique_copy(ct_image, tmp_path), "oblique")
    logic = InfectionSegmentationLogic()
    segmentation = logic.segment(volume, model=str(test_model), device="cpu", show3D=False)
    assert_on_volume_grid(segmentation, volume)
    assert_consistent_result(segmentation, volume, logic)


def test_a_ct_moved_by_a_registration_gets_its_segments_where_it_lies(mrml, demo_ct, test_model):
    """A CT under a linear transform (aligned to a prior study): the segments follow it in the views, and measured
    on its grid they are the voxels the untransformed CT gives."""
    import slicer
    import vtk

    logic = InfectionSegmentationLogic()
    plain = volume_from_image(demo_ct, "plain")
    expected = logic.segment(plain, model=str(test_model), device="cpu", show3D=False)
    moved = volume_from_image(demo_ct, "moved")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 40.0)
    matrix.SetElement(2, 3, -25.0)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(matrix)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = logic.segment(moved, model=str(test_model), device="cpu", show3D=False)
    for name in ("Left lung", "Right lung"):
        assert np.array_equal(mask(segmentation, name, moved), mask(expected, name, plain))
    bounds, volume_bounds = [0.0] * 6, [0.0] * 6
    segmentation.GetRASBounds(bounds)
    moved.GetRASBounds(volume_bounds)
    assert volume_bounds[0] - 1 <= bounds[0] and bounds[1] <= volume_bounds[1] + 1  # drawn on the moved CT
    assert assert_consistent_result(segmentation, moved, logic)["lungs"] == stored_report(expected)["lungs"]


def test_a_ct_under_a_non_linear_transform_is_refused_before_any_work(mrml, demo_ct, test_model):
    """Slicer's regularisation of unevenly spaced DICOM slices is a grid transform: the voxel grid is not where
    the voxels lie, so every mL would be off; both paths ask to harden it, and nothing is added to the scene."""
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    volume = volume_from_image(demo_ct, "demo")
    grid = vtk.vtkImageData()
    grid.SetDimensions(2, 2, 2)
    grid.SetSpacing(400.0, 400.0, 400.0)
    grid.SetOrigin(-200.0, -200.0, -200.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement = vtk_to_numpy(grid.GetPointData().GetScalars())
    displacement[:] = 0.0
    displacement[4:, 2] = 3.0  # slices stretched along z, as a missing slice makes them
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(grid)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Acquisition transform")
    transform.SetAndObserveTransformToParent(warp)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    before = node_ids()
    with pytest.raises(ValueError, match="non-linear transform 'Acquisition transform'.*Harden"):
        InfectionSegmentationLogic().segment(volume, model=str(test_model), device="cpu", show3D=False)
    with pytest.raises(ValueError, match="Harden"):
        SegmentationProcess(volume, model=str(test_model), device="cpu").start()
    assert node_ids() == before


def test_separate_process_gives_the_same_segmentation_as_the_blocking_path(mrml, shared_data, shipped_model):
    """With the shipped model's real weights, through the real ``relsegcore.cli segment`` subprocess."""
    volume = load_volume(shared_data / SMALL_CT, "small")
    logic = InfectionSegmentationLogic()
    blocking = logic.segment(volume, model=str(shipped_model), device="cpu", show3D=False)
    before = node_ids()
    process = SegmentationProcess(volume, model=str(shipped_model), device="cpu")
    process.start()
    assert process.wait(timeout_s=120) == SUCCEEDED, process.error
    assert node_ids() - before  # a new segmentation node, only now
    background = process.output_segmentation
    assert segment_names(background) == segment_names(blocking)
    for name in segment_names(blocking):
        np.testing.assert_array_equal(mask(background, name, volume), mask(blocking, name, volume))
    assert stored_report(background)["lungs"] == pytest.approx(stored_report(blocking)["lungs"])
