"""PO and PHO as radiologists report them: ground-glass below, consolidation at or above -200 HU.

Constructed CTs with known HU (a lesion half at -500, half at 0 HU); the pipeline with a model
that calls every lung voxel infection, so that its split is all HU; and ``relseg segment``'s
written files read back with SimpleITK and slicerio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from relsegcore import opacity, outputs, pipeline, zoo
from relsegcore.cli import main
from relsegcore.demo import make_demo_ct
from relsegcore.models import DualEncoderUNet, NetworkConfig

SPACING = (2.0, 2.0, 2.5)  # 10 mm^3 voxels: 100 voxels are exactly 1 mL
SHAPE_ZYX = (10, 10, 30)
SPLIT_NAMES = ["Ground-glass opacity", "Consolidation"]


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    return image


@pytest.fixture(scope="module")
def lesion_case() -> dict[str, np.ndarray]:
    """Left lung 12 mL with a 1 mL lesion, half at -500 and half at 0 HU; right lung 6 mL with 0.4 mL at -500 HU."""
    lungs = np.zeros(SHAPE_ZYX, np.uint8)
    lungs[:, :, 15:27] = 1  # 1200 voxels
    lungs[:, :, 3:9] = 2  # 600 voxels
    hu = np.full(SHAPE_ZYX, 30, np.int16)
    hu[lungs > 0] = -850
    infection = np.zeros(SHAPE_ZYX, bool)
    infection[2:4, :, 15:20] = True  # 100 voxels in the left lung
    hu[2, :, 15:20] = -500
    hu[3, :, 15:20] = 0
    infection[5:7, 0:5, 3:7] = True  # 40 voxels in the right lung
    hu[5:7, 0:5, 3:7] = -500
    return {"lungs": lungs, "hu": hu, "infection": infection}


def _report(case: dict, infection: np.ndarray, class_names: list[str], **kwargs) -> dict:
    return outputs.compute_report(_image(case["lungs"]), _image(infection.astype(np.uint8)), class_names,
                                  _image(case["hu"]), **kwargs)


def test_a_lesion_half_at_minus_500_and_half_at_0_hu_has_pho_half_its_po(lesion_case):
    report = _report(lesion_case, lesion_case["infection"], ["background", "infection"])
    po, pho = report["percent_opacity"], report["percent_high_opacity"]
    assert po == pytest.approx({"left": 100 / 12, "right": 100 * 0.4 / 6, "overall": 100 * 1.4 / 18})
    assert pho == pytest.approx({"left": 100 * 0.5 / 12, "right": 0.0, "overall": 100 * 0.5 / 18})
    assert pho["left"] == pytest.approx(po["left"] / 2)
    assert report["high_opacity_hu"] == -200.0


def test_without_the_ct_there_is_no_pho(lesion_case):
    report = outputs.compute_report(_image(lesion_case["lungs"]), _image(lesion_case["infection"].astype(np.uint8)),
                                    ["infection"])
    assert report["percent_high_opacity"] is None
    assert report["percent_opacity"]["overall"] == pytest.approx(100 * 1.4 / 18)


def test_split_puts_ground_glass_below_and_consolidation_at_or_above_the_threshold():
    hu = np.array([-1000, -500, -201, -200, 0, 300, 0])
    infected = np.array([True, True, True, True, True, True, False])
    np.testing.assert_array_equal(opacity.split_by_attenuation(infected, hu), [1, 1, 1, 2, 2, 2, 0])
    assert opacity.split_by_attenuation(infected, hu).dtype == np.uint8
    assert opacity.has_single_infection_class(["background", "infection"])
    assert not opacity.has_single_infection_class(["background", "ground-glass", "consolidation"])
    assert opacity.split_class_names() == SPLIT_NAMES


@pytest.mark.parametrize("threshold, left_pho", [(-600.0, 100 / 12), (-200.0, 50 / 12), (100.0, 0.0)])
def test_the_threshold_moves_the_split_and_pho(lesion_case, threshold, left_pho):
    infection, hu = lesion_case["infection"], lesion_case["hu"]
    labels = opacity.split_by_attenuation(infection, hu, threshold)
    assert np.count_nonzero(labels == 2) == np.count_nonzero(infection & (hu >= threshold))
    report = _report(lesion_case, labels, SPLIT_NAMES, high_opacity_hu=threshold)
    assert report["percent_high_opacity"]["left"] == pytest.approx(left_pho)
    assert report["high_opacity_hu"] == threshold
    assert report["infection"]["classes"]["consolidation"]["left_ml"] == pytest.approx(left_pho * 12 / 100)


def test_seg_nrrd_holds_ground_glass_and_consolidation_whose_union_is_the_infection(lesion_case, tmp_path):
    infection, hu = lesion_case["infection"], lesion_case["hu"]
    labels = opacity.split_by_attenuation(infection, hu)
    report = _report(lesion_case, labels, SPLIT_NAMES)
    paths = outputs.write_outputs(tmp_path, "case", _image(hu), _image(lesion_case["lungs"]), _image(labels),
                                  SPLIT_NAMES, report)
    segmentation = slicerio.read_segmentation(str(paths["segmentation"]))
    assert slicerio.segment_names(segmentation) == ["Left lung", "Right lung", *SPLIT_NAMES]
    ground_glass, consolidation = (slicerio.segment_mask(segmentation, name).transpose(2, 1, 0) > 0
                                   for name in SPLIT_NAMES)
    np.testing.assert_array_equal(ground_glass | consolidation, infection)
    assert not (ground_glass & consolidation).any()
    np.testing.assert_array_equal(consolidation, infection & (hu >= -200))
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "Left lung").transpose(2, 1, 0) > 0,
                                  lesion_case["lungs"] == 1)
    types = {segment["name"]: segment["terminology"]["type"] for segment in segmentation["segments"]}
    assert types["Ground-glass opacity"] == ["RADLEX", "RID28531", "Ground-glass opacity"]
    assert types["Consolidation"] == ["SCT", "95436008", "Lung consolidation"]
    classes = report["infection"]["classes"]
    assert classes["ground_glass"] == {"name": "Ground-glass opacity", "label": 1,
                                       "left_ml": 0.5, "right_ml": 0.4, "total_ml": 0.9}
    assert classes["consolidation"] == {"name": "Consolidation", "label": 2,
                                        "left_ml": 0.5, "right_ml": 0.0, "total_ml": 0.5}


def test_a_three_class_model_keeps_its_classes_while_pho_follows_the_hu(lesion_case):
    """The model calls the whole left lesion consolidation, half of it at -500 HU: PHO counts only the half at 0 HU."""
    labels = lesion_case["infection"].astype(np.uint8)
    labels[lesion_case["lungs"] == 1] *= 2
    report = _report(lesion_case, labels, ["background", "ground-glass", "consolidation"])
    assert report["infection"]["classes"]["consolidation"]["left_ml"] == 1.0
    assert report["percent_high_opacity"]["left"] == pytest.approx(100 * 0.5 / 12)


# --- the pipeline and the command line ------------------------------------------------------------------------


def save_everywhere_model(directory: Path, name: str = "everywhere") -> Path:
    """A binary model that calls every pixel infection (zero head weights, bias for class 1): its split is all HU."""
    torch.manual_seed(0)
    network = DualEncoderUNet(NetworkConfig(dims=2, num_classes=2, base_channels=4, depth=3))
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([-10.0, 10.0]))
    card = zoo.ModelCard(name=name, version="0.0.1", description="infection everywhere, for tests", file="",
                         sha256="", architecture={}, classes=["background", "infection"],
                         preprocessing={"input_size": 32, "window": [-1250, 250]})
    return zoo.save_model(network, card, directory)


@pytest.fixture(scope="module")
def everywhere_model(tmp_path_factory) -> Path:
    return save_everywhere_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def demo():
    return make_demo_ct(shape=(32, 128, 128), spacing=(2.8, 2.8, 8.0))


def test_pipeline_splits_a_binary_models_infection_by_hu(demo, everywhere_model, one_torch_thread):
    result = pipeline.segment(demo.image, model=everywhere_model, device="cpu")
    lungs, labels = sitk.GetArrayFromImage(result.lungs), sitk.GetArrayFromImage(result.infection)
    hu = sitk.GetArrayFromImage(demo.image)
    assert result.class_names == SPLIT_NAMES
    np.testing.assert_array_equal(labels == 2, (lungs > 0) & (hu >= -200))  # vessels and consolidation
    np.testing.assert_array_equal(labels == 1, (lungs > 0) & (hu < -200))
    report = result.report
    assert report["percent_opacity"]["overall"] == pytest.approx(100.0)
    expected = 100 * np.count_nonzero((lungs > 0) & (hu >= -200)) / np.count_nonzero(lungs)
    assert report["percent_high_opacity"]["overall"] == pytest.approx(expected)
    assert 0.1 < expected < 50.0  # the demo's consolidation and vessels: far from PO, far from none


def percentages_in_written_images(out_dir: Path, name: str, ct_path: Path, threshold: float) -> dict[str, float]:
    """PHO per lung from the files alone: infection NIfTI at or above the threshold in the CT, over the lungs NIfTI."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{name}_lungs.nii.gz")))
    infection = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{name}_infection.nii.gz"))) > 0
    high = infection & (hu >= threshold)
    share = {side: 100 * np.count_nonzero(high & (lungs == label)) / np.count_nonzero(lungs == label)
             for side, label in (("left", 1), ("right", 2))}
    return {**share, "overall": 100 * np.count_nonzero(high & (lungs > 0)) / np.count_nonzero(lungs)}


@pytest.fixture(scope="module")
def ct_file(demo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "chest.nii.gz"
    sitk.WriteImage(demo.image, str(path))
    return path


@pytest.mark.parametrize("threshold", [-200.0, -900.0])
def test_relseg_segment_reports_pho_as_measured_on_its_written_files(ct_file, everywhere_model, tmp_path, capsys,
                                                                      threshold, one_torch_thread):
    code = main(["segment", str(ct_file), "--out", str(tmp_path), "--model", str(everywhere_model), "--device", "cpu",
                 "--progress", "none", "--high-opacity-hu", str(threshold)])
    assert code == 0
    report = json.loads((tmp_path / "chest_report.json").read_text())
    measured = percentages_in_written_images(tmp_path, "chest", ct_file, threshold)
    assert set(report["percent_high_opacity"]) == {"left", "right", "overall"}
    for key, value in measured.items():
        assert report["percent_high_opacity"][key] == pytest.approx(value, abs=0.5), key
    assert report["high_opacity_hu"] == threshold
    # -200 HU: mostly aerated lung with dense vessels and lesions; -900 HU: nearly all lung is "high".
    assert (measured["overall"] < 50) if threshold == -200 else (measured["overall"] > 90)

    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "chest_lungs.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "chest_infection.nii.gz")))
    voxel_ml = float(np.prod(sitk.ReadImage(str(ct_file)).GetSpacing())) / 1000
    for key, label in (("ground_glass", 1), ("consolidation", 2)):
        volumes = report["infection"]["classes"][key]
        assert volumes["left_ml"] == pytest.approx(np.count_nonzero((labels == label) & (lungs == 1)) * voxel_ml)
        assert volumes["right_ml"] == pytest.approx(np.count_nonzero((labels == label) & (lungs == 2)) * voxel_ml)
        assert volumes["total_ml"] == pytest.approx(volumes["left_ml"] + volumes["right_ml"])

    segmentation = slicerio.read_segmentation(str(tmp_path / "chest.seg.nrrd"))
    union = sum(slicerio.segment_mask(segmentation, name) for name in SPLIT_NAMES).transpose(2, 1, 0)
    np.testing.assert_array_equal(union, labels > 0)  # each infection voxel in exactly one of the two segments

    printed = capsys.readouterr().out
    assert f"High opacity (>= {threshold:g} HU): {report['percent_high_opacity']['overall']:.1f} %" in printed
    assert "Ground-glass opacity" in printed and "Consolidation" in printed


def test_a_batch_is_redone_when_the_threshold_changes(ct_file, everywhere_model, tmp_path, capsys, one_torch_thread):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a.nii.gz").write_bytes(ct_file.read_bytes())

    def run(threshold: float) -> str:
        assert main(["segment", str(cases), "--out", str(tmp_path / "out"), "--model", str(everywhere_model),
                     "--device", "cpu", "--progress", "none", "--high-opacity-hu", str(threshold)]) == 0
        return capsys.readouterr().out.splitlines()[0].split()[0]

    assert [run(-200.0), run(-200.0), run(-500.0)] == ["done", "skipped", "done"]
    assert json.loads((tmp_path / "out" / "a_report.json").read_text())["high_opacity_hu"] == -500.0
