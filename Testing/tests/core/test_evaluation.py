"""relseg evaluate: numbers on masks with known overlap, at the masks' native size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_slices import save_constant_model

from relsegcore import zoo
from relsegcore.cli import main
from relsegcore.errors import InputError
from relsegcore.evaluation import evaluate_image_folder


def constant_model(tmp_path, foreground: bool, training: dict | None = None):
    """A network whose output is the same class everywhere: its Dice on any mask is known exactly."""
    return zoo.load_model(save_constant_model(tmp_path, foreground, training=training), torch.device("cpu"))


def write_folder(root, shapes_and_areas):
    """Vertical-band images (upright: no transposition) with masks of known foreground area."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index, ((height, width), area_rows) in enumerate(shapes_and_areas):
        image = np.zeros((height, width), np.uint8)
        image[:, width // 2 - 3: width // 2 + 3] = 200  # a bright vertical band, like a mediastinum
        mask = np.zeros((height, width), np.uint8)
        mask[:area_rows] = 255
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")


def test_all_foreground_prediction_gives_the_exact_dice_of_each_mask(tmp_path):
    cases = [((40, 50), 10), ((30, 30), 15)]  # foreground fractions 1/4 and 1/2
    write_folder(tmp_path / "data", cases)
    result = evaluate_image_folder(constant_model(tmp_path, foreground=True), tmp_path / "data" / "images",
                                   tmp_path / "data" / "masks")
    expected = [2 * 0.25 / 1.25, 2 * 0.5 / 1.5]  # Dice = 2|M| / (|M| + N)
    assert [c["dice"] for c in result["per_case"]] == pytest.approx(expected)
    assert [c["sensitivity"] for c in result["per_case"]] == pytest.approx([1.0, 1.0])
    assert [c["specificity"] for c in result["per_case"]] == pytest.approx([0.0, 0.0])
    assert result["mean_dice"] == pytest.approx(np.mean(expected))
    assert result["transposed"] is False


def test_cli_writes_json_with_top_level_mean_dice(tmp_path, capsys):
    write_folder(tmp_path / "data", [((40, 50), 10), ((30, 30), 0)])
    constant_model(tmp_path, foreground=False)
    code = main(["evaluate", "--model", str(tmp_path / "constant.pt"), "--images", str(tmp_path / "data/images"),
                 "--masks", str(tmp_path / "data/masks"), "--json", str(tmp_path / "out.json"), "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "out.json").read_text())
    # all background: Dice 0 where there is infection, 1 where both are empty
    assert [c["dice"] for c in result["per_case"]] == [0.0, 1.0]
    assert result["mean_dice"] == pytest.approx(0.5)
    assert "mean Dice 0.5000" in capsys.readouterr().out
    assert result["postprocessing"] == {"threshold": 0.5, "flip_tta": False, "min_component_fraction": 0.0}


@pytest.mark.parametrize(("postprocessing", "tta", "flip_recorded"),
                         [({"flip_tta": True, "threshold": 0.6}, False, True), ({}, True, True), ({}, False, False)])
def test_the_result_says_which_postprocessing_made_its_numbers(tmp_path, postprocessing, tta, flip_recorded):
    """The card's flip TTA, threshold and component fraction, and flip TTA asked for by --tta, are recorded."""
    write_folder(tmp_path / "data", [((40, 50), 10)])
    loaded = zoo.load_model(save_constant_model(tmp_path, True, postprocessing=postprocessing), torch.device("cpu"))
    result = evaluate_image_folder(loaded, tmp_path / "data" / "images", tmp_path / "data" / "masks", tta=tta)
    assert result["postprocessing"] == {"threshold": postprocessing.get("threshold", 0.5), "flip_tta": flip_recorded,
                                        "min_component_fraction": 0.0}


def test_missing_masks_folder_is_one_clear_error(tmp_path, capsys):
    write_folder(tmp_path / "data", [((20, 20), 5)])
    constant_model(tmp_path, foreground=True)
    code = main(["evaluate", "--model", str(tmp_path / "constant.pt"), "--images", str(tmp_path / "data/images"),
                 "--masks", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert code == 2
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_an_image_without_a_mask_is_an_error_not_a_skipped_slice(tmp_path, capsys):
    """Skipping it silently would change the mean Dice without a word."""
    write_folder(tmp_path / "data", [((20, 20), 5), ((20, 20), 5)])
    (tmp_path / "data" / "masks" / "1.png").unlink()
    constant_model(tmp_path, foreground=True)
    code = main(["evaluate", "--model", str(tmp_path / "constant.pt"), "--images", str(tmp_path / "data/images"),
                 "--masks", str(tmp_path / "data/masks"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "'1'" in err and "Traceback" not in err


def test_masks_stored_as_0_and_1_are_read_like_0_and_255(tmp_path):
    write_folder(tmp_path / "data", [((40, 50), 10)])
    mask_path = tmp_path / "data" / "masks" / "0.png"
    Image.fromarray((np.asarray(Image.open(mask_path)) > 0).astype(np.uint8)).save(mask_path)  # 0/1 values
    result = evaluate_image_folder(constant_model(tmp_path, foreground=True), tmp_path / "data" / "images",
                                   tmp_path / "data" / "masks")
    assert result["per_case"][0]["dice"] == pytest.approx(2 * 0.25 / 1.25)


def test_cli_scores_volumes_in_mm_through_the_segment_pipeline(tmp_path, capsys):
    """A model that calls everything infection predicts exactly the lungs (infection is kept inside them),
    so its Dice against the demo's lesions is the lesions' share of the lungs, computed here independently."""
    import SimpleITK as sitk

    from relsegcore.demo import make_demo_ct
    from relsegcore.lungs import segment_lungs

    case = make_demo_ct(seed=1, shape=(40, 192, 192), spacing=(1.8, 1.8, 5.0))
    (tmp_path / "ct").mkdir()
    (tmp_path / "labels").mkdir()
    sitk.WriteImage(case.image, str(tmp_path / "ct" / "case1.nii.gz"))
    sitk.WriteImage(case.infection, str(tmp_path / "labels" / "case1.nii.gz"))
    constant_model(tmp_path, foreground=True)
    code = main(["evaluate", "--model", str(tmp_path / "constant.pt"), "--volumes", "--images", str(tmp_path / "ct"),
                 "--masks", str(tmp_path / "labels"), "--json", str(tmp_path / "out.json"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out.json").read_text())
    lungs = sitk.GetArrayFromImage(segment_lungs(case.image)) > 0
    lesions = sitk.GetArrayFromImage(case.infection) > 0
    expected = 2.0 * (lungs & lesions).sum() / (lungs.sum() + lesions.sum())
    assert 0.0 < expected < 0.5
    assert result["units"] == "mm" and result["tolerance_mm"] == 3.0
    assert [c["case"] for c in result["per_case"]] == ["case1"]
    assert result["per_case"][0]["dice"] == pytest.approx(expected, abs=1e-6)
    assert result["per_case"][0]["sensitivity"] == pytest.approx((lungs & lesions).sum() / lesions.sum(), abs=1e-6)
    assert result["per_case"][0]["hd95"] > 0.0


def test_evaluate_says_how_many_images_the_model_was_trained_on(tmp_path, capsys):
    """The card's fingerprints of its training slices: the same pixels count under any file name."""
    import shutil

    from relsegcore.data.readers import folder_fingerprints

    write_folder(tmp_path / "trained", [((40, 50), 10), ((30, 30), 15)])
    write_folder(tmp_path / "test", [((40, 40), 5), ((30, 50), 5)])
    for sub in ("images", "masks"):  # one training slice again, renamed, among the test slices
        shutil.copy(tmp_path / "trained" / sub / "1.png", tmp_path / "test" / sub / "renamed.png")
    fingerprints = folder_fingerprints(tmp_path / "trained" / "images", tmp_path / "trained" / "masks")
    constant_model(tmp_path, foreground=True, training={"image_fingerprints": fingerprints})
    arguments = ["evaluate", "--model", str(tmp_path / "constant.pt"), "--images", str(tmp_path / "test/images"),
                 "--masks", str(tmp_path / "test/masks"), "--json", str(tmp_path / "out.json"), "--device", "cpu"]
    assert main(arguments) == 0
    assert json.loads((tmp_path / "out.json").read_text())["cases_seen_in_training"] == 1
    assert "Warning: 1 of these 3 images were in the model's training data" in capsys.readouterr().out

    constant_model(tmp_path, foreground=True)  # a card that does not say what it was trained on
    assert main(arguments) == 0
    assert json.loads((tmp_path / "out.json").read_text())["cases_seen_in_training"] is None
    assert "Warning" not in capsys.readouterr().out


@pytest.mark.parametrize(("threshold", "expected_foreground"), [(None, True), (0.6, True), (0.8, False)])
def test_labels_are_decided_at_the_cards_threshold(tmp_path, threshold, expected_foreground):
    """A network that gives every pixel a foreground probability of 0.7: the argmax (no threshold in the card)
    and 0.6 call it infection, a card threshold of 0.8 does not."""
    from relsegcore.evaluation import predict_image

    postprocessing = None if threshold is None else {"threshold": threshold}
    loaded = zoo.load_model(save_constant_model(tmp_path, True, probability=0.7, postprocessing=postprocessing),
                            torch.device("cpu"))
    labels = predict_image(loaded, np.full((40, 50), 100, np.uint8))
    assert labels.shape == (40, 50)
    assert np.all(labels == 1) if expected_foreground else not labels.any()


def test_a_cards_component_fraction_drops_stray_islands_from_the_labels(tmp_path, monkeypatch):
    """Two lungs and a stray island, decided as the pipeline decides: a card without the fraction keeps all,
    one of 0.05 drops the island (smaller than 5 % of the largest lung), whatever the threshold."""
    from relsegcore import evaluation

    foreground = np.zeros((60, 60), np.float32)
    foreground[10:50, 5:25] = foreground[10:50, 35:55] = 0.9  # two lungs of 800 px
    foreground[55:57, 28:30] = 0.9  # 4 px
    monkeypatch.setattr(evaluation, "native_probabilities",
                        lambda loaded, image, tta=False: np.stack([1.0 - foreground, foreground]))
    for postprocessing, island in [(None, True), ({"min_component_fraction": 0.05}, False),
                                   ({"min_component_fraction": 0.05, "threshold": 0.6}, False)]:
        loaded = zoo.load_model(save_constant_model(tmp_path, True, postprocessing=postprocessing),
                                torch.device("cpu"))
        labels = evaluation.predict_image(loaded, np.zeros((60, 60), np.uint8))
        assert labels[10:50, 5:25].all() and labels[10:50, 35:55].all()
        assert labels[55:57, 28:30].all() == island


@pytest.mark.parametrize("bad", [{"threshold": 1.0}, {"threshold": 0.0}, {"threshold": "high"}])
def test_a_threshold_outside_0_1_is_refused_when_the_card_is_read(tmp_path, bad):
    save_constant_model(tmp_path, True, postprocessing=bad)
    with pytest.raises(zoo.ModelError, match="threshold must lie between 0 and 1"):
        zoo.find_model(tmp_path / "constant.pt")


def test_a_threshold_on_a_multiclass_model_is_refused(tmp_path):
    save_constant_model(tmp_path, True)
    card_path = tmp_path / "constant.json"
    card = json.loads(card_path.read_text())
    card.update(classes=["background", "ground-glass", "consolidation"], postprocessing={"threshold": 0.7})
    card_path.write_text(json.dumps(card))
    with pytest.raises(zoo.ModelError, match="needs a model of 2 classes"):
        zoo.find_model(card_path)


def constant_fold_and_target(tmp_path: Path) -> tuple[Path, Path]:
    """A fold folder (a model at foreground probability 0.3, holding out two patients of ``make_ctseg_folder``)
    and a target model folder whose card a sweep writes."""
    fold = tmp_path / "fold0"
    fold.mkdir()
    save_constant_model(fold, True, name="fold0", probability=0.3,
                        preprocessing={"input_size": 32, "recipe": "full-slice-clahe"})
    (fold / "fold_result.json").write_text(json.dumps({"val_patients": ["coronacases_002", "radiopaedia_10"]}))
    target = tmp_path / "target"
    target.mkdir()
    save_constant_model(target, True, name="target")
    return fold, target


def test_choose_postprocessing_sweeps_a_folds_held_out_patients_and_writes_the_card(tmp_path, repo_root):
    """Testing/benchmarks/choose_postprocessing.py on a fold folder (a model at foreground probability 0.3 and
    the fold's held-out patients, every slice with some infection): at 0.2 it calls every pixel infection (Dice
    above 0), from 0.5 none (Dice 0), so 0.2 is chosen and written into the card, which then decides at it.
    The flip and the component fraction change nothing on a constant prediction, so the simpler setting wins."""
    import subprocess
    import sys

    from synthetic_slices import make_ctseg_folder

    data = make_ctseg_folder(tmp_path / "ctseg")
    fold, target = constant_fold_and_target(tmp_path)
    completed = subprocess.run(
        [sys.executable, str(repo_root / "Testing" / "benchmarks" / "choose_postprocessing.py"), "--folds",
         str(fold), "--data", f"ctseg2d:{data}", "--thresholds", "0.2,0.5,0.8", "--flip-tta", "--fractions",
         "0,0.1", "--card", str(target / "target.pt")],
        capture_output=True, text=True, check=True, timeout=120)
    assert "chosen: threshold 0.2, flip off, components >= 0.0" in completed.stdout
    card = zoo.find_model(target / "target.pt")
    assert card.threshold == 0.2 and not card.flip_tta and card.min_component_fraction == 0.0
    sweep = card.postprocessing["folds"][0]
    assert sweep["held_out_patients"] == ["coronacases_002", "radiopaedia_10"] and sweep["slices"] == 5
    dice_at = {label.split(",")[0]: value for label, value in sweep["mean_dice"].items() if "flip off" in label}
    assert dice_at["threshold 0.2"] > dice_at["threshold 0.5"] == dice_at["threshold 0.8"] == 0.0
    assert len(sweep["mean_dice"]) == 12  # 3 thresholds x 2 flips x 2 fractions
    assert "choose_postprocessing.py" in card.postprocessing["chosen_by"]


def test_choose_postprocessing_drops_what_lies_outside_the_body_as_the_lung_card_does(tmp_path, repo_root):
    """With --drop-outside-body every setting is scored after the card's outside-body step (or a threshold chosen
    for covid-lungs-2d would be judged without it), and the card written keeps the step. Here the body is a
    16 x 16 block of a 32 x 32 slice, and a model painting the whole slice paints mostly outside it."""
    import subprocess
    import sys

    from synthetic_slices import make_ctseg_folder

    data = make_ctseg_folder(tmp_path / "ctseg")
    for picture in (data / "images").iterdir():
        body = np.zeros((32, 32), np.uint8)
        body[8:24, 8:24] = 200
        Image.fromarray(body).save(picture)
    fold, target = constant_fold_and_target(tmp_path)
    command = [sys.executable, str(repo_root / "Testing" / "benchmarks" / "choose_postprocessing.py"), "--folds",
               str(fold), "--data", f"ctseg2d:{data}", "--thresholds", "0.2", "--json", str(tmp_path / "sweep.json")]
    dice_at_02 = []
    for extra in ([], ["--drop-outside-body", "--card", str(target / "target.pt")]):
        subprocess.run(command + extra, capture_output=True, text=True, check=True, timeout=120)
        sweep = json.loads((tmp_path / "sweep.json").read_text())["folds"][0]
        dice_at_02.append(sweep["mean_dice"]["threshold 0.2, flip off, components >= 0.0"])
    assert dice_at_02[0] > 0.0 and dice_at_02[1] == 0.0
    assert zoo.find_model(target / "target.pt").outside_body_dropped


def test_choose_postprocessing_averages_the_views_as_relseg_does(tmp_path, repo_root):
    """The sweep's (flip, upside down) averages must be what relseg computes for a card that names them, or a
    setting chosen on the folds would not be the one shipped; on a random network the views differ."""
    import importlib.util

    from test_inference import save_tiny_model

    from relsegcore.evaluation import native_probabilities

    spec = importlib.util.spec_from_file_location("choose_postprocessing",
                                                  repo_root / "Testing" / "benchmarks" / "choose_postprocessing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = zoo.load_model(save_tiny_model(tmp_path), torch.device("cpu"))
    image = np.random.default_rng(3).integers(0, 256, (40, 48), dtype=np.uint8)  # not the input size: resized
    wanted = {(False, False), (True, False), (False, True), (True, True)}
    averaged = module.views_averaged(loaded, image, wanted)
    for flip, upside_down in wanted:
        loaded.card.postprocessing.update(flip_tta=flip, upside_down_tta=upside_down)
        np.testing.assert_allclose(averaged[flip, upside_down], native_probabilities(loaded, image), atol=1e-5)
    assert not np.allclose(averaged[True, True], averaged[True, False], atol=1e-3)
    assert module.Setting(upside_down_tta=True).label.endswith(", upside down too")
    assert module.Setting().label == "threshold 0.5, flip off, components >= 0.0"  # old sweeps' labels unchanged


def test_choose_postprocessing_keeps_the_untuned_setting_unless_another_wins_clearly(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("choose_postprocessing",
                                                  repo_root / "Testing" / "benchmarks" / "choose_postprocessing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    untuned, high, small_parts = module.Setting(), module.Setting(0.7), module.Setting(0.5, False, 0.05)
    settings = module.settings_grid((0.7, 0.5), (False,), (0.0, 0.05))
    assert settings[0] == untuned and set(settings) == {untuned, high, small_parts, module.Setting(0.7, False, 0.05)}
    folds = [{"mean_dice": {untuned.label: 0.685, high.label: 0.698}},
             {"mean_dice": {untuned.label: 0.531, high.label: 0.520}}]
    assert module.best_setting(folds, [untuned, high]) == untuned  # +0.1 points on the mean: the folds disagree
    assert module.best_setting(folds[:1], [untuned, high]) == high  # +1.3 points
    assert module.best_setting(folds[:1], [untuned, high], min_gain=0.02) == untuned
    tie = [{"mean_dice": {untuned.label: 0.9, high.label: 0.95, small_parts.label: 0.95}}]
    assert module.best_setting(tie, [untuned, high, small_parts]) == high  # a tie goes to the earlier setting
    # +0.3 points on the mean: chosen when each of at least 3 folds gains, not when one fold loses or with 2 folds
    agreeing = [{"mean_dice": {untuned.label: base, high.label: base + gain}}
                for base, gain in [(0.96, 0.002), (0.95, 0.004), (0.97, 0.003)]]
    assert module.best_setting(agreeing, [untuned, high]) == high
    assert module.best_setting(agreeing[:2], [untuned, high]) == untuned
    assert module.best_setting(agreeing, [untuned, high], min_gain_agreeing=0.004) == untuned
    one_loses = [{"mean_dice": {untuned.label: base, high.label: base + gain}}
                 for base, gain in [(0.96, 0.003), (0.95, 0.005), (0.97, 0.004), (0.9, -0.0001)]]  # mean +0.3
    assert module.best_setting(one_loses, [untuned, high]) == untuned


@pytest.mark.parametrize(("lungs_everywhere", "expected_dice"), [(True, 2 * 0.25 / 1.25), (False, 0.0)])
def test_a_cards_within_lungs_keeps_the_labels_inside_the_named_lung_models_lungs(tmp_path, lungs_everywhere,
                                                                                expected_dice):
    """An all-infection model bounded by a lung model: lungs everywhere leave its Dice as it is, no lungs
    anywhere leave no infection; the result names the lung model that bounded it."""
    write_folder(tmp_path / "data", [((40, 50), 10)])
    lung_weights = save_constant_model(tmp_path, lungs_everywhere, name="lungs")
    loaded = zoo.load_model(save_constant_model(tmp_path, True, postprocessing={"within_lungs": str(lung_weights)}),
                            torch.device("cpu"))
    assert loaded.card.within_lungs == str(lung_weights)
    result = evaluate_image_folder(loaded, tmp_path / "data" / "images", tmp_path / "data" / "masks")
    assert result["mean_dice"] == pytest.approx(expected_dice)
    assert result["postprocessing"]["within_lungs"]["name"] == "lungs"


@pytest.mark.parametrize("value", [3, "  ", "constant", "elsewhere/constant.pt"])
def test_a_within_lungs_that_names_no_lung_model_is_refused_when_the_card_is_read(tmp_path, value):
    save_constant_model(tmp_path, True, postprocessing={"within_lungs": value})
    with pytest.raises(zoo.ModelError, match="within_lungs must name another model"):
        zoo.find_model(tmp_path / "constant.pt")


def test_choose_postprocessing_bounds_by_the_same_folds_lungs_and_refuses_another_folds(tmp_path, repo_root):
    """With --lung-folds every setting is also scored inside that fold's lungs: a lung model that finds none
    leaves no infection (Dice 0, not chosen); a lung fold holding out other patients is refused."""
    import subprocess
    import sys

    from synthetic_slices import make_ctseg_folder

    data = make_ctseg_folder(tmp_path / "ctseg")
    folds = {}
    for name, foreground, patients in [("fold0", True, ["coronacases_002", "radiopaedia_10"]),
                                       ("lungs0", False, ["coronacases_002", "radiopaedia_10"]),
                                       ("lungs1", False, ["coronacases_002"])]:
        folds[name] = tmp_path / name
        folds[name].mkdir()
        save_constant_model(folds[name], foreground, name=name,
                            preprocessing={"input_size": 32, "recipe": "full-slice-clahe"})
        (folds[name] / "fold_result.json").write_text(json.dumps({"val_patients": patients}))
    command = [sys.executable, str(repo_root / "Testing" / "benchmarks" / "choose_postprocessing.py"), "--folds",
               str(folds["fold0"]), "--data", f"ctseg2d:{data}", "--thresholds", "0.5", "--json",
               str(tmp_path / "sweep.json"), "--lung-folds"]
    completed = subprocess.run(command + [str(folds["lungs0"])], capture_output=True, text=True, check=True,
                               timeout=120)
    assert "chosen: threshold 0.5, flip off, components >= 0.0\n" in completed.stdout
    sweep = json.loads((tmp_path / "sweep.json").read_text())["folds"][0]
    scores = sweep["mean_dice"]
    assert scores["threshold 0.5, flip off, components >= 0.0"] > 0.0
    assert scores["threshold 0.5, flip off, components >= 0.0, within the lungs"] == 0.0
    assert sweep["lung_model"]["name"] == "lungs0"
    refused = subprocess.run(command + [str(folds["lungs1"])], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "holds out other patients" in refused.stderr


def write_crop_folder(root, count=3):
    """Pictures framed by bright chest wall (lung-window crops, as COVID-SemiSeg), each with a quarter mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        image = np.full((40, 50), 220, np.uint8)
        image[8:32, 5:22] = image[8:32, 28:45] = 20  # two dark lungs left and right of a bright mediastinum
        mask = np.zeros((40, 50), np.uint8)
        mask[:10] = 255
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")


@pytest.mark.parametrize("crops", [True, False])
def test_pictures_of_another_recipe_are_scored_by_the_model_the_card_names_for_it(tmp_path, crops):
    """A full-slice model that calls nothing infection names an all-infection lung-crop model for lung-window
    crops: crops get that model's exact Dice and the result names both models; whole slices (dark frame) stay
    with the asked model."""
    crop_model = save_constant_model(tmp_path, True, name="crops")
    asked = zoo.load_model(save_constant_model(tmp_path, False, name="slices",
                                               preprocessing={"input_size": 32, "recipe": "full-slice-clahe"},
                                               recipe_models={"lung-crop": str(crop_model)}), torch.device("cpu"))
    if crops:
        write_crop_folder(tmp_path / "data")
    else:
        write_folder(tmp_path / "data", [((40, 50), 10)] * 3)
    result = evaluate_image_folder(asked, tmp_path / "data" / "images", tmp_path / "data" / "masks")
    if crops:
        assert result["recipe"] == "lung-crop"
        assert result["model"]["name"] == "crops" and result["asked_model"]["name"] == "slices"
        assert result["mean_dice"] == pytest.approx(2 * 0.25 / 1.25)
        assert "crops" in result["note"] and "slices" in result["note"]
    else:
        assert result["recipe"] == "full-slice-clahe"
        assert result["model"]["name"] == "slices" and "asked_model" not in result
        assert result["mean_dice"] == 0.0


def test_a_model_named_for_a_recipe_it_was_not_trained_on_is_refused(tmp_path):
    """A card naming a full-slice model for lung-window crops would score them with the wrong network."""
    wrong = save_constant_model(tmp_path, True, name="wrong", preprocessing={"input_size": 32,
                                                                           "recipe": "full-slice-clahe"})
    asked = zoo.load_model(save_constant_model(tmp_path, False, name="slices",
                                               preprocessing={"input_size": 32, "recipe": "full-slice-clahe"},
                                               recipe_models={"lung-crop": str(wrong)}), torch.device("cpu"))
    write_crop_folder(tmp_path / "data")
    with pytest.raises(InputError, match="was trained on full-slice-clahe"):
        evaluate_image_folder(asked, tmp_path / "data" / "images", tmp_path / "data" / "masks")


@pytest.mark.parametrize(("recipe_models", "message"), [
    ({"lung-crop": "other"}, "not one of the other recipes"),  # the card's own recipe (1.x cards: lung-crop)
    ({"mri": "other"}, "not one of the other recipes"),
    ({"full-slice-clahe": " "}, "must name another model"),
    ({"full-slice-clahe": "constant"}, "must name another model"),
    (["lung-crop"], "must map recipes to models"),
])
def test_recipe_models_that_name_no_other_model_for_another_recipe_are_refused_when_read(tmp_path, recipe_models,
                                                                                      message):
    save_constant_model(tmp_path, True, recipe_models=recipe_models)
    with pytest.raises(zoo.ModelError, match=message):
        zoo.find_model(tmp_path / "constant.pt")


@pytest.mark.parametrize("names_full_slice_model", [True, False])
def test_ctseg2d_slices_are_whole_slices_whatever_they_look_like(tmp_path, names_full_slice_model):
    """`--data ctseg2d:` is always scored as the full-slice recipe: a lung-crop model that names a full-slice
    model hands the slices to it (no warning that its score says little); one that names none keeps them, warned."""
    from synthetic_slices import make_ctseg_folder

    from relsegcore.evaluation import evaluate_ctseg2d

    root = make_ctseg_folder(tmp_path / "ctseg")
    slices_model = save_constant_model(tmp_path, True, name="slices",
                                       preprocessing={"input_size": 32, "recipe": "full-slice-clahe"})
    recipe_models = {"full-slice-clahe": str(slices_model)} if names_full_slice_model else None
    asked = zoo.load_model(save_constant_model(tmp_path, False, name="crops", recipe_models=recipe_models),
                           torch.device("cpu"))
    result = evaluate_ctseg2d(asked, root)
    assert result["recipe"] == "full-slice-clahe"
    assert result["model"]["name"] == ("slices" if names_full_slice_model else "crops")
    assert ("says little" in result.get("note", "")) is not names_full_slice_model
