"""relseg benchmark: COVID-19-CT-Seg Task 1 / Task 3 folds, per-fold results, table, resume.

Runs on tiny synthetic chest CTs written in the Ma et al. layout (a folder of CTs, a folder of
infection masks with the same file names) and a tiny network, a few iterations per fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from relsegcore.benchmark import (
    BenchmarkConfig,
    case_pairs,
    fold_plan,
    format_table,
    in_hounsfield_units,
    read_splits,
    training_splits,
)
from relsegcore.cli import main
from relsegcore.demo import make_demo_ct
from relsegcore.errors import InputError
from relsegcore.training import lesion_share

SHAPE, SPACING = (24, 96, 96), (3.7, 3.7, 10.0)
CASES = [f"coronacases_{i:03d}" for i in range(1, 5)] + ["radiopaedia_10_85902_3"]  # the last stored windowed
TINY = ["--iterations", "3", "--batch-size", "4", "--size", "32", "--base-channels", "4", "--depth", "3",
        "--device", "cpu"]


def windowed(image: sitk.Image) -> sitk.Image:
    """The CT as the benchmark stores its Radiopaedia cases: [-1250, 250] HU as 0..255."""
    return sitk.Cast(sitk.IntensityWindowing(image, -1250.0, 250.0, 0.0, 255.0), sitk.sitkUInt8)


def write_cases(images: Path, masks: Path, names: list[str], first_seed: int) -> None:
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for seed, name in enumerate(names, start=first_seed):
        case = make_demo_ct(seed, shape=SHAPE, spacing=SPACING)
        image = windowed(case.image) if name.startswith("radiopaedia") else case.image
        sitk.WriteImage(image, str(images / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.Cast(case.infection > 0, sitk.sitkUInt8), str(masks / f"{name}.nii.gz"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """COVID-19-CT-Seg_20cases/ + Infection_Mask/ (5 cases), and a non-COVID set as image/ + mask/."""
    root = tmp_path_factory.mktemp("covid-ct-seg")
    write_cases(root / "COVID-19-CT-Seg_20cases", root / "Infection_Mask", CASES, first_seed=1)
    write_cases(root / "non-covid" / "image", root / "non-covid" / "mask", ["tumour_1", "tumour_2"], first_seed=50)
    return root


def benchmark(dataset: Path, out: Path, task: str, *extra: str) -> int:
    return main(["benchmark", task, "--images", str(dataset / "COVID-19-CT-Seg_20cases"),
                 "--masks", str(dataset / "Infection_Mask"), "--out", str(out), "--folds", "5",
                 "--train-cases", "1", *TINY, *extra])


def test_training_splits_train_each_group_once_the_reverse_of_cross_validation():
    names = [f"case{i:02d}" for i in range(20)]
    splits = training_splits(names, folds=5, train_cases=4, seed=0)
    assert [len(s) for s in splits] == [4] * 5
    assert sorted(c for s in splits for c in s) == sorted(names)  # every case trains exactly once
    assert splits == training_splits(names, folds=5, train_cases=4, seed=0)
    assert splits != training_splits(names, folds=5, train_cases=4, seed=1)
    # More cases than folds x training cases: the rest are only tested.
    more = training_splits(names + ["extra1", "extra2"], folds=5, train_cases=4)
    assert [len(s) for s in more] == [4] * 5 and len({c for s in more for c in s}) == 20
    with pytest.raises(InputError, match="need at least 25 cases"):
        training_splits(names, folds=5, train_cases=5)


def test_fold_plan_never_tests_a_case_where_it_trains_and_reads_published_splits(tmp_path):
    pairs = [(name, Path(f"{name}.nii.gz"), Path(f"m/{name}.nii.gz")) for name in CASES]
    config = BenchmarkConfig(task="task1", images=tmp_path, out_dir=tmp_path, folds=5, train_cases=1)
    plan = fold_plan(config, pairs)
    for train, test in plan:
        assert len(train) == 1 and len(test) == 4
        assert {p[0] for p in train}.isdisjoint(p[0] for p in test)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"folds": [CASES[:2], CASES[2:4]]}))
    assert read_splits(splits, CASES) == [CASES[:2], CASES[2:4]]
    config = BenchmarkConfig(task="task1", images=tmp_path, out_dir=tmp_path, splits=splits)
    assert [[p[0] for p in test] for _, test in fold_plan(config, pairs)] == [CASES[2:], CASES[:2] + CASES[4:]]
    splits.write_text(json.dumps([{"train": CASES[:2], "val": CASES[2:]}, {"train": CASES[2:4], "val": []}]))
    assert read_splits(splits, CASES) == [CASES[:2], CASES[2:4]]  # nnU-Net's splits_final.json
    splits.write_text(json.dumps([["coronacases_001"], ["radiopaedia_9"]]))
    with pytest.raises(InputError, match="radiopaedia_9"):
        read_splits(splits, CASES)


def test_cases_are_found_in_the_ma_et_al_and_the_decathlon_layouts(dataset, tmp_path):
    found = case_pairs(dataset / "COVID-19-CT-Seg_20cases", dataset / "Infection_Mask")
    assert [case for case, _, _ in found] == CASES
    assert all(mask.parent.name == "Infection_Mask" and mask.name == image.name for _, image, mask in found)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
        for name in ("volume-covid19-A-0003", "volume-covid19-A-0011"):
            sitk.WriteImage(sitk.Image([4, 4, 2], sitk.sitkInt16), str(tmp_path / folder / f"{name}.nii.gz"))
    assert [case for case, _, _ in case_pairs(tmp_path)] == ["volume-covid19-A-0003", "volume-covid19-A-0011"]


def test_ct_stored_windowed_is_brought_back_to_hounsfield_units(dataset, tmp_path):
    found = case_pairs(dataset / "COVID-19-CT-Seg_20cases", dataset / "Infection_Mask")
    converted = in_hounsfield_units(found, tmp_path / "hu")
    assert converted[:4] == found[:4]  # CTs in HU are used where they are
    case, image_path, mask_path = converted[4]
    assert image_path == tmp_path / "hu" / f"{case}.nii.gz" and mask_path == found[4][2]
    image = sitk.ReadImage(str(image_path))
    original = make_demo_ct(5, shape=SHAPE, spacing=SPACING).image
    stored = sitk.ReadImage(str(found[4][1]))
    assert image.GetSpacing() == stored.GetSpacing() and image.GetOrigin() == stored.GetOrigin()
    assert image.GetDirection() == stored.GetDirection()
    hu, truth = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original).astype(float)
    inside = (truth > -1250) & (truth < 250)
    assert np.abs(hu[inside] - truth[inside]).max() <= 2 * 1500 / 255  # the 8-bit cast truncates: two levels
    assert -1030 < hu.min() < -1000  # air is air again


def test_lesion_slices_are_drawn_at_least_half_the_time():
    masks = np.zeros((10, 4, 4), np.uint8)
    masks[:2, 1, 1] = 1
    weights = lesion_share(masks, 0.5)
    assert weights[:2].sum() == pytest.approx(0.5) and weights.sum() == pytest.approx(1.0)
    assert np.allclose(weights[2:], 0.5 / 8)
    masks[:6, 1, 1] = 1  # already more than half: uniform draws
    assert lesion_share(masks, 0.5) is None


def test_table_has_the_benchmark_layout_with_percent_mean_and_sd(tmp_path):
    config = BenchmarkConfig(task="task1", images=tmp_path, out_dir=tmp_path)
    folds = [{"fold": k, "train_cases": ["a"] * 4, "test_cases": ["b"] * 16,
              "dsc": {"mean": 0.5 + 0.1 * k, "sd": 0.1, "n": 16}, "nsd": {"mean": 0.6, "sd": 0.05, "n": 16}}
             for k in (1, 2)]
    summary = {"task": "task1", "label": config.label, "tolerance_mm": 3.0, "planned_folds": 5,
               "finished_folds": 2, "folds": folds,
               "mean": {"dsc": {"mean": 0.65, "sd": 0.12}, "nsd": {"mean": 0.6, "sd": 0.05}}}
    lines = format_table(summary).splitlines()
    assert lines[0] == "COVID-19-CT-Seg Task 1, infection: 2D U-Net, COVID cases only"
    assert lines[2] == "| fold | training cases | test cases | DSC (%) | NSD@3mm (%) |"
    assert lines[4] == "| 1 | 4 | 16 | 60.0 ± 10.0 | 60.0 ± 5.0 |"
    assert lines[6] == "| mean (2 of 5 folds) | | | 65.0 ± 12.0 | 60.0 ± 5.0 |"


def test_task1_trains_each_case_once_scores_the_others_and_resumes(dataset, tmp_path, capsys):
    out = tmp_path / "task1"
    assert benchmark(dataset, out, "task1") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "task1" and results["finished_folds"] == 5
    trained = [case for fold in results["folds"] for case in fold["train_cases"]]
    assert sorted(trained) == CASES  # every case is the training set exactly once
    for fold in results["folds"]:
        assert sorted(fold["test_cases"]) == sorted(set(CASES) - set(fold["train_cases"]))
        per_fold = json.loads((out / f"fold{fold['fold']}" / "result.json").read_text())
        assert [c["case"] for c in per_fold["per_case"]] == fold["test_cases"]
        for case in per_fold["per_case"]:
            assert 0.0 <= case["dice"] <= 1.0 and 0.0 <= case["nsd"] <= 1.0
        for metric in ("dsc", "nsd"):
            assert 0.0 <= fold[metric]["mean"] <= 1.0 and fold[metric]["n"] == 4
        card = json.loads((out / f"fold{fold['fold']}" / f"task1-fold{fold['fold']}.json").read_text())
        assert card["architecture"]["use_general_encoder"] is False and card["preprocessing"]["input_size"] == 32
        assert card["preprocessing"]["recipe"] == "full-slice-clahe"  # as the shipped models see HU slices
    fold_results = [json.loads((out / f"fold{k}" / "result.json").read_text()) for k in range(1, 6)]
    all_dice = [case["dice"] for result in fold_results for case in result["per_case"]]
    assert results["mean"]["dsc"]["mean"] == pytest.approx(np.mean(all_dice))
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 3", "| 4", "| 5", "| mean"]
    assert table in printed
    # A second run skips every finished fold: no model is trained again.
    models = {path: path.stat().st_mtime_ns for path in out.glob("fold*/task1-fold*.pt")}
    assert benchmark(dataset, out, "task1") == 0
    assert capsys.readouterr().out.count("done before, skipped") == 5
    assert {path: path.stat().st_mtime_ns for path in out.glob("fold*/task1-fold*.pt")} == models
    # Another split in the same folder is refused rather than mixed in.
    assert benchmark(dataset, out, "task1", "--seed", "3") == 2
    assert "other training cases" in capsys.readouterr().err


def test_task3_dual_trains_the_general_encoder_once_and_uses_the_relation_loss(dataset, tmp_path, capsys):
    out = tmp_path / "task3"
    general = ["--general-data", f"pairs:{dataset / 'non-covid'}"]
    for fold in ("1", "2"):
        assert benchmark(dataset, out, "task3", *general, "--fold", fold) == 0
    assert capsys.readouterr().out.count("general encoder: training") == 1
    assert (out / "general" / "general-encoder.pt").is_file()
    card = json.loads((out / "fold1" / "task3-fold1.json").read_text())
    assert card["architecture"]["use_general_encoder"] is True
    assert card["training"]["config"]["relation"]["reading"] == "encoders"
    assert card["training"]["config"]["relation"]["weight"] == 10.0
    assert card["training"]["config"]["general_encoder"] == str(out / "general" / "general-encoder.pt")
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "dual" and results["finished_folds"] == 2
    assert "| mean (2 of 5 folds) |" in (out / "table.md").read_text()


def test_task3_pooled_trains_one_single_encoder_model_on_both_sets(dataset, tmp_path):
    out = tmp_path / "pooled"
    assert benchmark(dataset, out, "task3", "--method", "pooled", "--general-data",
                     f"pairs:{dataset / 'non-covid'}", "--fold", "1") == 0
    card = json.loads((out / "fold1" / "task3-fold1.json").read_text())
    assert card["architecture"]["use_general_encoder"] is False
    assert "non-covid" in card["training"]["data"] and "covid" in card["training"]["data"]
    assert not (out / "general").exists()
    assert json.loads((out / "results.json").read_text())["method"] == "pooled"


def test_bad_requests_are_one_line_errors(dataset, tmp_path, capsys):
    assert benchmark(dataset, tmp_path / "a", "task3") == 2
    assert "--general-data" in capsys.readouterr().err
    assert benchmark(dataset, tmp_path / "b", "task1", "--fold", "6") == 2
    assert "--fold must be between 1 and 5" in capsys.readouterr().err
    assert main(["benchmark", "task1", "--images", str(dataset / "COVID-19-CT-Seg_20cases"), "--masks",
                 str(dataset / "Infection_Mask"), "--out", str(tmp_path / "c"), "--train-cases", "2"]) == 2
    assert "need at least 10 cases" in capsys.readouterr().err


def test_recipe_lung_crop_reproduces_the_1x_models_and_a_general_encoder_must_share_the_recipe(
        dataset, tmp_path, capsys):
    lung_crop = tmp_path / "lung-crop"
    general = ["--general-data", f"pairs:{dataset / 'non-covid'}"]
    assert benchmark(dataset, lung_crop, "task3", *general, "--recipe", "lung-crop", "--fold", "1") == 0
    for card_path in (lung_crop / "fold1" / "task3-fold1.json", lung_crop / "general" / "general-encoder.json"):
        preprocessing = json.loads(card_path.read_text())["preprocessing"]
        assert preprocessing["recipe"] == "lung-crop" and preprocessing["crop"] == "lungs"
    capsys.readouterr()
    # that lung-crop general encoder cannot serve folds trained on whole slices: one line naming both recipes
    assert benchmark(dataset, tmp_path / "mixed", "task3", "--general-encoder",
                     str(lung_crop / "general" / "general-encoder.pt"), "--fold", "1") == 2
    error = capsys.readouterr().err
    assert "learned lung-crop slices" in error and "full-slice-clahe" in error and "Traceback" not in error
    assert not list((tmp_path / "mixed").glob("fold1/*.pt"))
