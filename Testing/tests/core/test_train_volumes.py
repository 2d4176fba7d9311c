"""relseg train --volumes: a researcher's own CT volumes and masks, split by patient, rendered as at inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from relsegcore.cli import main
from relsegcore.data.intensity import render_full_slice
from relsegcore.demo import make_demo_ct
from relsegcore.training import lesion_share

SHAPE, SPACING = (10, 64, 64), (5.5, 5.5, 12.0)
CASES = ["coronacases_001", "radiopaedia_10_85902_1", "radiopaedia_10_85902_3"]  # the last two: one patient
TINY = ["--iterations", "2", "--batch-size", "2", "--size", "32", "--base-channels", "4", "--depth", "3",
        "--device", "cpu", "--no-validation"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own-data")
    (root / "ct").mkdir()
    (root / "masks").mkdir()
    for seed, name in enumerate(CASES, start=1):
        case = make_demo_ct(seed, shape=SHAPE, spacing=SPACING)
        sitk.WriteImage(case.image, str(root / "ct" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.Cast(case.infection > 0, sitk.sitkUInt8), str(root / "masks" / f"{name}.nii.gz"))
    return root


def train_volumes(root: Path, out: Path, *extra: str) -> int:
    return main(["train", "--images", str(root / "ct"), "--masks", str(root / "masks"), "--volumes",
                 "--out", str(out), *TINY, *extra])


def test_a_fold_holds_out_whole_patients_and_the_card_says_what_trained_it(volumes, tmp_path):
    out = tmp_path / "fold"
    assert train_volumes(volumes, out, "--folds", "2", "--fold", "0", "--export", "own") == 0
    result = json.loads((out / "fold_result.json").read_text())
    assert sorted(result["train_patients"] + result["val_patients"]) == ["coronacases_001", "radiopaedia_10"]
    assert not set(result["train_patients"]) & set(result["val_patients"])
    trained = {"coronacases_001": 1, "radiopaedia_10": 2}[result["train_patients"][0]]
    assert result["train_slices"] == trained * SHAPE[0]  # every slice of each training CT
    card = json.loads((out / "own.json").read_text())
    assert card["preprocessing"]["recipe"] == "full-slice-clahe" and card["preprocessing"]["upright"] is True
    assert f"{SHAPE[0] * trained} slices of {trained} volume(s)" in card["training"]["data"]
    assert f"masks in {volumes / 'masks'}" in card["training"]["data"]
    assert "--volumes" in card["training"]["command"]


def test_slices_are_rendered_from_hu_as_the_pipeline_renders_them(volumes, tmp_path):
    from relsegcore.data.readers import VolumeOptions, find_volume_pairs, read_pairs

    pairs = find_volume_pairs(volumes / "ct", volumes / "masks")[:1]
    data = read_pairs(pairs, VolumeOptions(size=32, only_lesion_slices=False, context="lungs",
                                           recipe="full-slice-clahe"), source="ct")
    hu = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(pairs[0][1])), "LPS"))
    assert np.array_equal(data.images[4], render_full_slice(hu[4], 32))


def test_slices_with_a_lesion_get_their_share_and_the_other_sets_keep_theirs():
    masks = np.zeros((10, 4, 4), np.uint8)
    masks[0, 1, 1] = 1  # one of 8 target slices has a lesion; slices 8, 9 are negatives at 0.5 of the draws
    before = np.r_[np.full(8, 0.5 / 8), np.full(2, 0.25)]
    weights = lesion_share(masks, 0.5, before, targets=8)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(0.25) and weights[1:8].sum() == pytest.approx(0.25)
    assert weights[8:].tolist() == [0.25, 0.25]


def test_bad_requests_are_one_line_errors(volumes, tmp_path, capsys):
    assert main(["train", "--data", f"ctseg2d:{volumes}", "--volumes", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "not from --data" in capsys.readouterr().err
    assert train_volumes(volumes, tmp_path / "b", "--cases", "radiopaedia_99") == 2
    assert "no volume named 'radiopaedia_99'" in capsys.readouterr().err
    assert train_volumes(volumes, tmp_path / "c", "--upright") == 2
    assert "anterior up already" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_folds_held_out_patients_are_scored_alone_by_relseg_evaluate(volumes, tmp_path):
    out = tmp_path / "fold"
    assert train_volumes(volumes, out, "--folds", "2", "--fold", "1", "--export", "own") == 0
    held_out = json.loads((out / "fold_result.json").read_text())["val_patients"]
    assert main(["evaluate", "--model", str(out / "own.pt"), "--images", str(volumes / "ct"), "--masks",
                 str(volumes / "masks"), "--volumes", "--cases", ",".join(held_out), "--device", "cpu",
                 "--json", str(tmp_path / "scores.json")]) == 0
    scored = [case["case"] for case in json.loads((tmp_path / "scores.json").read_text())["per_case"]]
    expected = {"coronacases_001": ["coronacases_001"],
                "radiopaedia_10": ["radiopaedia_10_85902_1", "radiopaedia_10_85902_3"]}[held_out[0]]
    assert held_out == [held_out[0]] and sorted(scored) == expected


def test_the_lungs_step_is_scored_on_volumes_against_lung_masks(tmp_path, capsys):
    """The HU method against the demo's true lungs scores high; against the infection masks (not lungs) low."""
    images, lungs, infection = tmp_path / "ct", tmp_path / "lungs", tmp_path / "infection"
    for folder in (images, lungs, infection):
        folder.mkdir()
    for seed in (1, 2):
        case = make_demo_ct(seed, shape=(16, 96, 96), spacing=(3.7, 3.7, 10.0))
        sitk.WriteImage(case.image, str(images / f"case{seed}.nii.gz"))
        sitk.WriteImage(case.lungs, str(lungs / f"case{seed}.nii.gz"))
        sitk.WriteImage(case.infection, str(infection / f"case{seed}.nii.gz"))

    def score(masks: Path) -> dict:
        out = tmp_path / f"{masks.name}.json"
        assert main(["evaluate", "--images", str(images), "--masks", str(masks), "--volumes", "--target", "lungs",
                     "--lungs", "hu", "--device", "cpu", "--json", str(out), "--progress", "lines"]) == 0
        return json.loads(out.read_text())

    right = score(lungs)
    printed = capsys.readouterr().out  # a line per CT for tools (and a tqdm bar in a terminal)
    assert "PROGRESS 0.5000 evaluating" in printed and "PROGRESS 1.0000 evaluating" in printed
    assert "(hu-threshold)" in printed
    assert right["model"]["name"] == "hu-threshold" and right["target"] == "lungs" and right["cases"] == 2
    assert right["mean_dice"] > 0.9 and all(case["nsd"] > 0.9 for case in right["per_case"])
    assert score(infection)["mean_dice"] < 0.3
    capsys.readouterr()
    # masks kept on a crop of the CT's grid (slices 4-11) are scored where the expert looked, on the mask's grid
    for path in lungs.iterdir():
        mask = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.RegionOfInterest(mask, [96, 96, 8], [0, 0, 4]), str(path))
    cropped = score(lungs)
    assert all(case["prediction_resampled_to_mask_grid"] for case in cropped["per_case"])
    assert cropped["mean_dice"] > 0.9 and "prediction_resampled_to_mask_grid" not in right["per_case"][0]
    capsys.readouterr()
    assert main(["evaluate", "--images", str(images), "--masks", str(lungs), "--volumes", "--lungs", "auto"]) == 2
    assert "--volumes --target lungs" in capsys.readouterr().err
