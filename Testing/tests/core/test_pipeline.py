"""pipeline: CT in -> lungs, infection, report, on the input's exact geometry; files all or nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_inference import save_tiny_model

import relsegcore
from relsegcore import imageio, pipeline
from relsegcore.demo import make_demo_ct
from relsegcore.errors import Cancelled, InputError
from relsegcore.fileutil import sha256_of
from relsegcore.noise import NOISY_CT_HU, add_ct_noise
from relsegcore.progress import Progress

SMALL_SHAPE, SMALL_SPACING = (32, 128, 128), (2.8, 2.8, 8.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def demo():
    return make_demo_ct(shape=SMALL_SHAPE, spacing=SMALL_SPACING)


@pytest.fixture(scope="module")
def lps_result(demo, model_path) -> pipeline.SegmentationResult:
    return pipeline.segment(demo.image, model=model_path, device="cpu")


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
            and a.GetDirection() == b.GetDirection())


def reoriented(image: sitk.Image, kind: str) -> sitk.Image:
    """The same CT stored another way: RAS (x, y flipped), left-handed (z flipped), or on oblique axes."""
    voxels = array(image)
    nx, ny, nz = image.GetSize()
    if kind == "RAS":
        voxels, corner, signs = voxels[:, ::-1, ::-1], (nx - 1, ny - 1, 0), (-1, -1, 1)
    elif kind == "left-handed":
        voxels, corner, signs = voxels[::-1], (0, 0, nz - 1), (1, 1, -1)
    else:
        voxels, corner, signs = voxels, (0, 0, 0), (1, 1, 1)
    result = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    result.SetSpacing(image.GetSpacing())
    result.SetOrigin(image.TransformIndexToPhysicalPoint(corner))
    if kind == "oblique":  # 15 degrees about z: still closest to LPS, so canonical voxels are unchanged
        c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
        result.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    else:
        result.SetDirection((signs[0], 0.0, 0.0, 0.0, signs[1], 0.0, 0.0, 0.0, signs[2]))
    return result


def test_lps_result_has_lungs_and_infection_only_inside_them(demo, lps_result):
    lungs, infection = array(lps_result.lungs), array(lps_result.infection)
    assert same_geometry(lps_result.lungs, demo.image) and same_geometry(lps_result.infection, demo.image)
    assert set(np.unique(lungs)) == {0, 1, 2}
    assert lps_result.lungs.GetPixelID() == sitk.sitkUInt8 and lps_result.infection.GetPixelID() == sitk.sitkUInt8
    assert not np.any((infection > 0) & (lungs == 0))
    # The binary model's infection comes split by HU: 1 ground-glass below -200 HU, 2 consolidation at or above.
    assert lps_result.class_names == ["Ground-glass opacity", "Consolidation"]
    hu = array(demo.image)
    np.testing.assert_array_equal(infection == 2, (infection > 0) & (hu >= -200))
    # Left lung (label 1) is on the patient's left: larger x in LPS.
    assert np.argwhere(lungs == 1)[:, 2].mean() > np.argwhere(lungs == 2)[:, 2].mean()


@pytest.mark.parametrize("kind", ["RAS", "left-handed", "oblique"])
def test_results_are_written_back_on_the_exact_input_geometry(demo, model_path, lps_result, kind):
    image = reoriented(demo.image, kind)
    result = pipeline.segment(image, model=model_path, device="cpu")
    for labels in (result.lungs, result.infection):
        assert same_geometry(labels, image)
    # The same anatomy gives the same labels, voxel for voxel, once back on the canonical grid.
    np.testing.assert_array_equal(array(imageio.to_canonical(result.lungs)), array(lps_result.lungs))
    np.testing.assert_array_equal(array(imageio.to_canonical(result.infection)), array(lps_result.infection))
    assert result.report["lungs"]["left_ml"] == pytest.approx(lps_result.report["lungs"]["left_ml"])


def test_report_names_model_device_and_timing(lps_result, model_path):
    report = lps_result.report
    assert report["model"]["name"] == "tiny-test-model" and report["model"]["version"] == "0.0.1"
    assert report["model"]["sha256"] == sha256_of(model_path)
    assert report["device"] == "cpu" and report["tta"] is False
    assert {"lungs", "infection", "network", "total"} <= report["timing_s"].keys()
    assert report["timing_s"]["network"] <= report["timing_s"]["infection"] <= report["timing_s"]["total"]
    assert report["lungs"]["total_ml"] == pytest.approx(
        np.count_nonzero(array(lps_result.lungs)) * math.prod(SMALL_SPACING) / 1000)
    assert 0 <= report["percent_opacity"]["overall"] <= 100


def test_the_report_gives_the_cts_noise_and_warns_when_it_is_above_the_training_cts(demo, lps_result, model_path):
    """The demo CT (about 15 HU by the estimator) passes quietly; with 40 HU of white noise added, the report says
    the opacity is likely overestimated (the model takes noise for ground-glass)."""
    assert 10 < lps_result.report["noise_hu"] < NOISY_CT_HU
    assert not any("noisier" in warning for warning in lps_result.report["warnings"])
    noisy = sitk.GetImageFromArray(add_ct_noise(array(demo.image), 40.0, "white", seed=0))
    noisy.CopyInformation(demo.image)
    report = pipeline.segment(noisy, model=model_path, device="cpu").report
    assert report["noise_hu"] > NOISY_CT_HU
    assert [warning for warning in report["warnings"] if "noisier" in warning and "overestimated" in warning]


def test_known_lungs_are_used_as_given(demo, model_path):
    result = pipeline.segment(demo.image, model=model_path, device="cpu", lungs=demo.lungs)
    np.testing.assert_array_equal(array(result.lungs), array(demo.lungs))
    assert not np.any((array(result.infection) > 0) & (array(demo.lungs) == 0))


def test_three_class_model_tta_and_3d_model(demo, tmp_path):
    three_class = save_tiny_model(tmp_path / "a", num_classes=3, name="tiny-three-class")
    result = pipeline.segment(demo.image, model=three_class, device="cpu", tta=True)
    assert result.class_names == ["ground-glass", "consolidation"]  # the model's own classes, not split by HU
    assert array(result.infection).max() <= 2 and result.report["tta"] is True
    high = (array(result.infection) > 0) & (array(demo.image) >= -200)
    assert result.report["percent_high_opacity"]["overall"] == pytest.approx(
        100 * np.count_nonzero(high) / np.count_nonzero(array(result.lungs)))

    volumetric = save_tiny_model(tmp_path / "b", dims=3, name="tiny-3d", patch_size=(16, 64, 64))
    result = pipeline.segment(demo.image, model=volumetric, device="cpu")
    infection = array(result.infection)
    assert same_geometry(result.infection, demo.image)
    assert not np.any((infection > 0) & (array(result.lungs) == 0))


def test_progress_goes_through_the_stages_in_order(demo, model_path):
    seen: list[tuple[float, str]] = []
    pipeline.segment(demo.image, model=model_path, device="cpu",
                     progress=Progress(callback=lambda f, s: seen.append((f, s))))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = list(dict.fromkeys(s for _, s in seen))
    assert stages == ["Lungs", "Infection", "Report"]


def test_segment_file_writes_all_outputs_named_after_the_input(demo, model_path, tmp_path):
    source = tmp_path / "in" / "patient 7.nii.gz"
    source.parent.mkdir()
    sitk.WriteImage(demo.image, str(source))
    paths = pipeline.segment_file(source, tmp_path / "out", model=model_path, device="cpu")
    assert sorted(p.name for p in paths.values()) == sorted(
        f"patient_7{suffix}" for suffix in (".seg.nrrd", "_lungs.nii.gz", "_infection.nii.gz", "_report.json",
                                            "_overview.png"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    written = sitk.ReadImage(str(paths["lungs"]))
    expected = pipeline.segment(sitk.ReadImage(str(source)), model_path, "cpu").lungs  # as read back from NIfTI
    np.testing.assert_array_equal(array(written), array(expected))


def test_cancel_raises_and_leaves_no_output_files(demo, model_path, tmp_path):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(demo.image, str(source))
    stages: list[str] = []
    progress = Progress(callback=lambda f, s: stages.append(s), should_cancel=lambda: "Infection" in stages)
    with pytest.raises(Cancelled):
        pipeline.segment_file(source, tmp_path / "out", model=model_path, device="cpu", progress=progress)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_ct_without_lungs_is_refused(model_path):
    hu = np.full((12, 64, 64), -1000, np.int16)
    hu[:, 8:56, 8:56] = 40  # a block of soft tissue in air: a CT, but no lungs
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((3.0, 3.0, 5.0))
    with pytest.raises(InputError, match="No lungs"):
        pipeline.segment(image, model=model_path, device="cpu")


@pytest.mark.parametrize(("path", "name"), [("a/ct.nii.gz", "ct"), ("b/Case 01.nrrd", "Case_01"),
                                            ("c/DICOM_SERIES", "DICOM_SERIES"), ("d/scan.v2.mha", "scan.v2")])
def test_case_names(path, name):
    assert pipeline.case_name(path) == name


def test_package_level_api(demo, model_path):
    lungs = relsegcore.segment_lungs(demo.image)
    assert same_geometry(lungs, demo.image) and set(np.unique(array(lungs))) == {0, 1, 2}
    assert relsegcore.segment is pipeline.segment and relsegcore.SegmentationResult is pipeline.SegmentationResult


@pytest.fixture(scope="module")
def shipped_model() -> str:
    from relsegcore import zoo
    from relsegcore.errors import ModelError

    try:
        return str(zoo.find_model(zoo.DEFAULT_MODEL).path.with_suffix(".json"))
    except ModelError:
        pytest.skip("the shipped default model is not installed")


def test_real_data_infection_lands_on_ground_glass_not_on_effusion_or_tumour(shipped_model, shared_data, repo_root,
                                                                             tmp_path):
    """Real CT (../shared/data) with the shipped model: Testing/benchmarks/check_real_data.py --quick."""
    numbers_path = tmp_path / "numbers.json"
    subprocess.run([sys.executable, str(repo_root / "Testing" / "benchmarks" / "check_real_data.py"), "--quick",
                    "--model", shipped_model, "--json", str(numbers_path)],
                   check=True, timeout=300, env={**os.environ, "RELSEG_SHARED_DATA": str(shared_data)})
    numbers = json.loads(numbers_path.read_text())
    slices = numbers["covid_hu_slices"]
    assert max(row["lung_fraction_flagged"] for row in slices) > 0.01
    flagged_hu = [row["flagged_mean_hu"] for row in slices if row["lung_fraction_flagged"] > 0.001]
    assert -750 <= float(np.mean(flagged_hu)) <= -300  # the flagged pixels are ground-glass, not clear lung or vessel
    assert np.mean([r["ggo_hu_fraction_flagged"] for r in slices]) > 3 * np.mean(
        [r["aerated_fraction_flagged"] for r in slices])
    for row in numbers["pleural_effusion"] + numbers["lung_tumor"]:
        if row["label_ml"] >= 10:  # an effusion or a mass (a 1.4 mL nodule looks like a consolidation focus)
            assert row["label_fraction_flagged"] < 0.5, row  # never flagged wholesale as COVID infection


@pytest.mark.parametrize(("threshold", "painted"), [(0.6, True), (0.8, False)])
def test_what_the_closing_along_z_adds_stays_lung_only_where_infection_is_painted(demo, tmp_path, threshold, painted):
    """The demo's consolidation on the pleura comes into the HU lungs by the closing along z. A model that paints
    every lung voxel keeps all of it lung; one that paints nothing leaves the lungs without the closing's
    additions (effusion and the heart's rim come in the same way on real CTs), and nothing else changes."""
    from synthetic_slices import save_constant_model

    from relsegcore import lungs

    canonical = imageio.to_canonical(demo.image)
    hu, spacing = sitk.GetArrayFromImage(canonical), canonical.GetSpacing()
    with_closing = lungs.segment_lungs_array(hu, spacing)
    without_closing = lungs.segment_lungs_array(hu, spacing, z_closing=False)
    consolidation = sitk.GetArrayFromImage(imageio.to_canonical(demo.infection)) == 2
    both, added = lungs.lungs_and_closing_additions(hu, spacing)
    np.testing.assert_array_equal(both, with_closing)  # one pass gives both maps as two would
    np.testing.assert_array_equal(added, (with_closing > 0) & (without_closing == 0))
    assert added.sum() > 0.3 * (consolidation & (without_closing == 0)).sum() > 0  # the test is not vacuous

    path = save_constant_model(tmp_path, True, probability=0.7, postprocessing={"threshold": threshold})
    result = pipeline.segment(demo.image, model=path, device="cpu", engine="torch")
    found = sitk.GetArrayFromImage(imageio.to_canonical(result.lungs))
    np.testing.assert_array_equal(found, with_closing if painted else without_closing)


def test_real_effusion_brought_in_by_the_closing_leaves_the_lungs_and_the_infection_stays(shipped_model, shared_data):
    """LUNG1-002: the closing along z takes 23.7 % of its pleural effusion into the HU lungs; the shipped model
    paints none of it, so the lungs of ``segment`` keep under 5 %, and its infection is the one found inside the
    closed lungs, voxel for voxel."""
    from relsegcore import lungs

    folder = shared_data / "pleural-effusion"
    image = sitk.ReadImage(str(folder / "LUNG1-002_ct.nii.gz"))
    effusion = array(sitk.ReadImage(str(folder / "LUNG1-002_effusion.nii.gz"))) > 0
    closed_lungs = lungs.segment_lungs(image)
    gated = pipeline.segment(image, model=shipped_model, device="cpu")
    ungated = pipeline.segment(image, model=shipped_model, device="cpu", lungs=closed_lungs)

    def inside(lung_image: sitk.Image) -> float:
        return float((effusion & (array(lung_image) > 0)).sum() / effusion.sum())

    assert inside(closed_lungs) > 0.2 and inside(ungated.lungs) > 0.2
    assert inside(gated.lungs) < 0.05
    np.testing.assert_array_equal(array(gated.infection), array(ungated.infection))
    assert gated.report["lungs"]["total_ml"] < 0.97 * ungated.report["lungs"]["total_ml"]


@pytest.mark.parametrize("dropped", [False, True])
def test_a_lung_cards_outside_body_dropped_is_followed_on_ct_slices(demo, tmp_path, dropped):
    """The pipeline decides 2D slices as ``relseg evaluate`` does: a model painting every pixel paints one
    component per slice, mostly the air around the body, and the card's ``outside_body_dropped`` takes it away
    (the body judged on the HU slice)."""
    from synthetic_slices import save_constant_model

    from relsegcore import zoo
    from relsegcore.data import intensity

    full_slice = intensity.preprocessing_for(intensity.FULL_SLICE_CLAHE, 32)
    path = save_constant_model(tmp_path, True, preprocessing=full_slice,
                               postprocessing={"outside_body_dropped": dropped})
    loaded = zoo.load_model(zoo.find_model(path), torch.device("cpu"), "torch")
    hu = sitk.GetArrayFromImage(imageio.to_canonical(demo.image))
    z = np.array([len(hu) // 2])
    labels, _ = pipeline.slice_labels_2d(loaded, hu, z, None)
    assert labels[z[0]].sum() == (0 if dropped else labels[z[0]].size)


@pytest.mark.parametrize(("threshold", "infected"), [(0.6, True), (0.8, False)])
def test_infection_is_decided_at_the_model_cards_threshold(demo, tmp_path, threshold, infected):
    """Every pixel at foreground probability 0.7: a card threshold of 0.6 makes all the lungs infection, 0.8
    none; the report names the threshold that decided."""
    from synthetic_slices import save_constant_model

    path = save_constant_model(tmp_path, True, probability=0.7, postprocessing={"threshold": threshold})
    result = pipeline.segment(demo.image, model=path, device="cpu", engine="torch")
    lungs, infection = array(result.lungs) > 0, array(result.infection) > 0
    np.testing.assert_array_equal(infection, lungs if infected else np.zeros_like(lungs))
    assert result.report["model"]["threshold"] == threshold
