"""Output files written into tmp_path and read back with slicerio, Slicer's own reader, SimpleITK, json and Pillow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image

from relsegcore import outputs, terminology
from relsegcore.errors import InputError

CLASSES_3 = ["background", "ground-glass opacity", "consolidation"]
SPACING = (2.0, 2.0, 2.5)  # 10 mm^3 voxels: 100 voxels are exactly 1 mL
SHAPE_ZYX = (16, 24, 30)


def _image(array: np.ndarray) -> sitk.Image:
    """An oblique image whose slice axis points inferiorly, so canonical and input indices differ."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((-31.5, 12.25, 140.0))
    angle = math.radians(20)
    c, s = math.cos(angle), math.sin(angle)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    return image


@pytest.fixture(scope="module")
def case():
    lungs = np.zeros(SHAPE_ZYX, np.uint8)
    lungs[2:14, 6:16, 17:27] = 1  # left lung (high x = patient's left): 1200 voxels = 12 mL
    lungs[2:14, 6:16, 3:8] = 2  # right lung: 600 voxels = 6 mL
    infection = np.zeros(SHAPE_ZYX, np.uint8)
    infection[4:6, 6:11, 17:27] = 1  # ground-glass in the left lung: 100 voxels = 1 mL
    infection[8:10, 6:11, 3:8] = 2  # consolidation in the right lung: 50 voxels = 0.5 mL
    infection[0:1, 0:2, 0:5] = 1  # outside the lungs: 10 voxels = 0.1 mL
    ct = np.full(SHAPE_ZYX, 30, np.int16)
    ct[lungs > 0] = -850
    ct[infection == 1] = -350  # ground-glass
    ct[infection == 2] = 20  # consolidation: at or above -200 HU, so PHO counts it
    return {"ct": _image(ct), "lungs": _image(lungs), "infection": _image(infection),
            "lungs_zyx": lungs, "infection_zyx": infection}


@pytest.fixture(scope="module")
def written(case, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    report = outputs.compute_report(case["lungs"], case["infection"], CLASSES_3, case["ct"])
    paths = outputs.write_outputs(out_dir, "case1", case["ct"], case["lungs"], case["infection"], CLASSES_3, report)
    return {"dir": out_dir, "paths": paths, "report": report}


def test_all_five_files_are_written_with_the_documented_names(written):
    names = sorted(p.name for p in written["dir"].iterdir())
    assert names == sorted(["case1.seg.nrrd", "case1_lungs.nii.gz", "case1_infection.nii.gz",
                            "case1_report.json", "case1_overview.png"])
    assert all(path.exists() for path in written["paths"].values())


def test_seg_nrrd_reads_back_in_slicerio_with_names_colours_terminology_and_voxels(case, written):
    segmentation = slicerio.read_segmentation(str(written["paths"]["segmentation"]))
    assert segmentation["voxels"].shape == (2, 30, 24, 16)  # layers, i, j, k
    names = slicerio.segment_names(segmentation)
    assert names == ["Left lung", "Right lung", "Ground-glass opacity", "Consolidation"]
    expected_masks = {
        "Left lung": case["lungs_zyx"] == 1,
        "Right lung": case["lungs_zyx"] == 2,
        "Ground-glass opacity": case["infection_zyx"] == 1,
        "Consolidation": case["infection_zyx"] == 2,
    }
    for name, mask_zyx in expected_masks.items():
        mask_ijk = slicerio.segment_mask(segmentation, name)
        np.testing.assert_array_equal(mask_ijk, mask_zyx.transpose(2, 1, 0))
    segments = {segment["name"]: segment for segment in segmentation["segments"]}
    assert segments["Left lung"]["terminology"]["type"] == ["SCT", "44029006", "Left lung"]
    assert segments["Right lung"]["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert segments["Consolidation"]["terminology"]["type"] == ["SCT", "95436008", "Lung consolidation"]
    assert segments["Ground-glass opacity"]["terminology"]["anatomicRegion"] == ["SCT", "39607008", "Lung"]
    assert segments["Left lung"]["color"] == pytest.approx([128 / 255, 174 / 255, 216 / 255], abs=1e-6)
    assert segments["Consolidation"]["layer"] == 1 and segments["Right lung"]["layer"] == 0


def test_seg_nrrd_geometry_equals_the_ct(case, written):
    segmentation = slicerio.read_segmentation(str(written["paths"]["segmentation"]), skip_voxels=True)
    ct = case["ct"]
    expected = np.eye(4)
    expected[:3, :3] = np.array(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    expected[:3, 3] = ct.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-12)


def test_slicer_reads_the_seg_nrrd_and_the_shipped_terminology(case, written):
    slicer = pytest.importorskip("slicer")
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(written["paths"]["segmentation"]))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    counts = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation("Binary labelmap")
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        counts[segment.GetName()] = int(np.count_nonzero(voxels == segment.GetLabelValue()))
    assert counts == {"Left lung": 1200, "Right lung": 600, "Ground-glass opacity": 110, "Consolidation": 50}

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = logic.LoadTerminologyFromFile(terminology.terminology_path())
    for definition in terminology.lung_definitions() + terminology.infection_definitions(CLASSES_3):
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(definition.terminology_entry, entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [context], [])
        assert logic.SerializeTerminologyEntry(entry) == definition.terminology_entry
        rgb = entry.GetTypeObject().GetRecommendedDisplayRGBValue()
        assert tuple(round(c * 255) for c in definition.color) == tuple(rgb)


def test_nifti_labelmaps_have_exact_arrays_and_geometry(case, written):
    for kind, expected in (("lungs", case["lungs_zyx"]), ("infection", case["infection_zyx"])):
        image = sitk.ReadImage(str(written["paths"][kind]))
        assert image.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
        np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), case["ct"].GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), case["ct"].GetDirection(), atol=1e-6)


def test_report_numbers_equal_hand_computed_volumes(written):
    report = json.loads(written["paths"]["report"].read_text())
    assert report == written["report"]
    assert report["lungs"] == {"left_ml": 12.0, "right_ml": 6.0, "total_ml": 18.0}
    infection = report["infection"]
    assert (infection["left_ml"], infection["right_ml"], infection["total_ml"]) == (1.0, 0.5, 1.5)
    assert infection["outside_lungs_ml"] == 0.1
    assert infection["classes"]["ground_glass"] == {"name": "Ground-glass opacity", "label": 1,
                                                    "left_ml": 1.0, "right_ml": 0.0, "total_ml": 1.0}
    assert infection["classes"]["consolidation"]["total_ml"] == 0.5
    assert report["percent_opacity"]["left"] == pytest.approx(100 / 12)
    assert report["percent_opacity"]["right"] == pytest.approx(100 * 0.5 / 6)
    assert report["percent_opacity"]["overall"] == pytest.approx(100 * 1.5 / 18)
    assert report["percent_high_opacity"] == {"left": 0.0, "right": pytest.approx(100 * 0.5 / 6),
                                              "overall": pytest.approx(100 * 0.5 / 18)}
    assert report["high_opacity_hu"] == -200.0
    text = written["paths"]["report"].read_text()
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"


def test_binary_report_without_the_ct_has_no_high_opacity_and_empty_lungs_give_none(case):
    report = outputs.compute_report(case["lungs"], case["infection"] > 0, ["background", "infection"])
    assert report["percent_high_opacity"] is None
    assert set(report["infection"]["classes"]) == {"infection"}
    empty = outputs.compute_report(_image(np.zeros(SHAPE_ZYX, np.uint8)), case["infection"] > 0, ["infection"])
    assert empty["percent_opacity"] == {"left": None, "right": None, "overall": None}


def test_coverage_warnings_name_a_missing_lung_and_too_little_lung():
    def warnings(left_ml: float, right_ml: float) -> list[str]:
        return outputs.coverage_warnings({"left_ml": left_ml, "right_ml": right_ml, "total_ml": left_ml + right_ml})

    assert warnings(1200.0, 1500.0) == []  # a small adult chest
    assert warnings(0.0, 0.0) == []  # nothing found at all is an error of its own, not a warning
    (missing,) = warnings(0.0, 2600.0)  # e.g. after a pneumonectomy
    assert missing.startswith("No left lung was found")
    (small,) = warnings(600.0, 700.0)
    assert "total 1300 mL" in small and "may not cover the whole chest" in small
    assert len(warnings(2.0, 0.0)) == 2 and "No right lung" in warnings(2.0, 0.0)[0]


def test_overview_png_is_a_radiological_montage_with_overlays(written):
    image = np.asarray(Image.open(written["paths"]["overview"]).convert("RGB")).astype(int)
    assert image.shape == (3 * 256, 4 * 256, 3)  # 12 tiles, 4 per row
    first_tile = image[:256, :256]

    def columns_of(color):
        rgb = np.round(np.array(color) * 255).astype(int)
        return np.nonzero(np.all(first_tile == rgb, axis=2))[1]

    left_lung, right_lung = (columns_of(d.color) for d in terminology.lung_definitions())
    assert left_lung.size and right_lung.size
    # Radiological convention: the patient's left lung is drawn on the image right.
    assert left_lung.mean() > 128 > right_lung.mean()
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    assert np.count_nonzero((red - blue > 60) & (green - blue > 60)) > 100  # yellow ground-glass
    assert np.count_nonzero((red - green > 60) & (red - blue > 60)) > 50  # red consolidation


def test_slice_labels_follow_the_input_axial_index(case):
    canonical = sitk.DICOMOrient(case["ct"], "LPS")
    # The input's slice axis points inferiorly: canonical slice z is input slice 15 - z.
    assert [outputs._original_slice_index(canonical, case["ct"], z) for z in (0, 5, 15)] == [15, 10, 0]


def test_overview_slices_cluster_where_the_infection_is():
    lungs = np.zeros((40, 8, 8), np.uint8)
    lungs[5:35] = 1
    infection = np.zeros_like(lungs)
    infection[20:23, 2:6, 2:6] = 1
    slices = outputs.choose_overview_slices(lungs, infection, 10)
    assert len(slices) == 10 and slices == sorted(slices, reverse=True)
    assert all(5 <= z < 35 for z in slices)
    assert sum(20 <= z < 23 for z in slices) >= 3
    assert outputs.choose_overview_slices(lungs[:3], infection[:3], 10) == [2, 1, 0]  # no lungs: all slices


def test_a_failing_writer_leaves_no_partial_outputs(case, tmp_path, monkeypatch):
    report = outputs.compute_report(case["lungs"], case["infection"], CLASSES_3)

    def broken_png(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "_write_overview_png", broken_png)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_outputs(tmp_path, "case1", case["ct"], case["lungs"], case["infection"], CLASSES_3, report)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rerun_keeps_the_previous_complete_outputs(case, tmp_path, monkeypatch):
    first = outputs.write_outputs(tmp_path, "c", case["ct"], case["lungs"], case["infection"], CLASSES_3, {"run": 1})
    monkeypatch.setattr(outputs, "_write_overview_png", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        outputs.write_outputs(tmp_path, "c", case["ct"], case["lungs"], case["infection"], CLASSES_3, {"run": 2})
    assert json.loads(first["report"].read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first.values())


def test_bad_inputs_raise_input_error(case, tmp_path):
    shifted = sitk.Image(case["lungs"])
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="same voxel grid"):
        outputs.write_seg_nrrd(tmp_path / "a.seg.nrrd", case["lungs"], shifted, ["infection"])
    with pytest.raises(InputError, match="lung labelmap is not on the same voxel grid as the CT"):
        outputs.compute_report(case["lungs"], case["infection"], CLASSES_3, ct=shifted)
    with pytest.raises(InputError, match="expected 0..1"):
        outputs.write_seg_nrrd(tmp_path / "a.seg.nrrd", case["lungs"], case["infection"], ["infection"])
    with pytest.raises(InputError, match="plain file name"):
        outputs.output_paths(tmp_path, "../escape")
    with pytest.raises(InputError, match="JSON"):
        outputs.write_report_json(tmp_path / "r.json", {"value": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_single_writers_are_usable_on_their_own(case, tmp_path):
    outputs.write_labelmap_nifti(tmp_path / "lungs.nii.gz", case["lungs"])
    outputs.write_overview_png(tmp_path / "o.png", case["ct"], case["lungs"], case["infection"], n_slices=5)
    assert Image.open(tmp_path / "o.png").size == (4 * 256, 2 * 256)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lungs.nii.gz"))),
                                  case["lungs_zyx"])


def test_infection_class_names_map_to_definitions():
    keys = [d.key for d in terminology.infection_definitions(["background", "GGO", "Consolidation"])]
    assert keys == ["ground_glass", "consolidation"]
    custom = terminology.infection_definitions(["Crazy paving"])[0]
    assert custom.name == "Crazy paving" and custom.type == ("SCT", "23583003", "Inflammation")


def test_label_pair_counts_are_exact_beyond_float32_precision():
    """OpenCV counts in float32, exact only below 2**24: 21 M voxels of one pair must still count exactly."""
    from relsegcore.outputs import label_pair_counts

    rng = np.random.default_rng(0)
    lungs = rng.integers(0, 3, (100, 512, 512), dtype=np.uint8)
    infection = rng.integers(0, 3, lungs.shape, dtype=np.uint8)
    lungs[:80] = infection[:80] = 0  # one pair above 2**24 voxels
    expected = np.bincount((lungs.astype(np.int64) * 3 + infection).ravel(), minlength=9).reshape(3, 3)
    assert expected.max() > 2**24
    assert np.array_equal(label_pair_counts(lungs, infection, 3), expected)
