"""Slices stored posterior up are found by their lungs and turned upright for a network trained upright only."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from synthetic_slices import chest_lungs, make_ctseg_folder, save_constant_model

from relsegcore.data.ctseg import patient_of, read_cases_csv, read_ctseg2d
from relsegcore.data.orientation import posterior_up_groups, widest_row_fraction
from relsegcore.data.readers import read_gray_picture


def test_the_lungs_widest_rows_tell_which_way_up_a_slice_is() -> None:
    upright, upside_down = chest_lungs(64), chest_lungs(64, posterior_up=True)
    assert widest_row_fraction(upright) > 0.9 and widest_row_fraction(upside_down) < 0.1
    box = np.zeros((64, 64), bool)
    box[10:50, 10:50] = True
    assert widest_row_fraction(box) == 0.5, "a shape as wide at the top as at the bottom cannot tell"
    speck = np.zeros((64, 64), bool)
    speck[30, 30:33] = True
    assert widest_row_fraction(speck) is None, "a basal sliver is too small to vote"
    masks = [upright, upright, upside_down, upside_down, upright, box, speck]
    groups = ["a", "a", "b", "b", "b", "c", "d"]
    assert posterior_up_groups(masks, groups) == {"b"}, "the majority of a patient's slices decides"
    with pytest.raises(ValueError, match="2 lung masks but 1"):
        posterior_up_groups(masks[:2], ["a"])


def test_the_upright_reader_turns_only_the_patients_stored_posterior_up(tmp_path) -> None:
    root = make_ctseg_folder(tmp_path / "set", chest=True)
    stored, upright = read_ctseg2d(root, size=32), read_ctseg2d(root, size=32, upright=True)
    turned = np.array([name.startswith("radiopaedia") for name in stored.names])
    assert turned.sum() == 5 and stored.names == upright.names
    np.testing.assert_array_equal(upright.images[~turned], stored.images[~turned])
    np.testing.assert_array_equal(upright.masks[turned], stored.masks[turned][:, ::-1])
    np.testing.assert_array_equal(upright.images[turned], stored.images[turned][:, ::-1])
    lungs = read_ctseg2d(root, target="lungs", size=32, upright=True)
    assert all(widest_row_fraction(mask) > 0.5 for mask in lungs.masks), "every chest anterior up after reading"


def test_train_upright_writes_it_in_the_card_and_needs_ctseg_data(tmp_path, one_torch_thread, capsys) -> None:
    from relsegcore.cli import main

    root = make_ctseg_folder(tmp_path / "set", chest=True)
    tiny = ["--iterations", "2", "--batch-size", "2", "--size", "32", "--base-channels", "4", "--depth", "2",
            "--device", "cpu", "--no-validation", "--upright"]
    assert main(["train", "--data", f"ctseg2d:{root}", "--out", str(tmp_path / "run"), "--export", "up", *tiny]) == 0
    card = json.loads((tmp_path / "run" / "up.json").read_text())
    assert card["preprocessing"]["upright"] is True and card["preprocessing"]["recipe"] == "full-slice-clahe"
    teacher = save_constant_model(tmp_path / "teacher", True, name="teacher",
                                  preprocessing={"recipe": "full-slice-clahe", "input_size": 32})
    assert main(["train", "--data", f"ctseg2d:{root}", "--out", str(tmp_path / "taught"), "--teacher", str(teacher),
                 *tiny]) == 2
    assert "--teacher teacher saw the slices as stored; this training sees them upright" in capsys.readouterr().err
    assert main(["train", "--images", str(root / "images"), "--masks", str(root / "masks"),
                 "--out", str(tmp_path / "pictures"), *tiny]) == 2
    assert "--upright needs --data ctseg2d" in capsys.readouterr().err
    assert not (tmp_path / "pictures" / "checkpoint.pt").exists()


def test_the_real_radiopaedia_patients_are_the_ones_found_posterior_up(shared_data) -> None:
    """Every Radiopaedia series of covid-ct-seg-2d is stored spine up, every coronacases one spine down."""
    root = shared_data / "covid-ct-seg-2d"
    rows = read_cases_csv(root)
    lungs = [read_gray_picture(root / "lungs" / row["file"]) > 127 for row in rows]
    found = posterior_up_groups(lungs, [patient_of(row["case"]) for row in rows])
    assert found == {patient_of(row["case"]) for row in rows if row["case"].startswith("radiopaedia")}
    assert len(found) == 5


def _real_subset(shared_data, destination, turn: set[str] = frozenset()):
    """A few real slices of one coronacases and one Radiopaedia patient in the covid-ct-seg-2d layout; the slices
    (and masks) of the patients in ``turn`` stored upside down."""
    from PIL import Image

    source = shared_data / "covid-ct-seg-2d"
    rows = [row for row in read_cases_csv(source) if row["case"] in ("coronacases_001", "radiopaedia_36_86526_0")]
    rows = [row for row in rows if int(row["order_in_case"]) % 8 == 4]
    for folder in ("images", "masks", "lungs"):
        (destination / folder).mkdir(parents=True)
        for row in rows:
            picture = np.asarray(Image.open(source / folder / row["file"]))
            Image.fromarray(picture[::-1] if patient_of(row["case"]) in turn else picture).save(
                destination / folder / row["file"])
    with open(source / "cases.csv") as handle:
        header = handle.readline()
    lines = [",".join(row[k] for k in header.strip().split(",")) for row in rows]
    (destination / "cases.csv").write_text(header + "\n".join(lines) + "\n")
    return destination


def test_an_upright_model_sees_the_posterior_up_patients_turned_upright(shared_data, tmp_path) -> None:
    """Scoring a model trained upright on the stored slices equals scoring the same network on a copy where the
    Radiopaedia patient was turned upright by hand: the lungs tell the orientation, no annotation does."""
    from relsegcore.evaluation import evaluate_ctseg2d
    from relsegcore.zoo import load_model

    stored = _real_subset(shared_data, tmp_path / "stored")
    by_hand = _real_subset(shared_data, tmp_path / "by-hand", turn={"radiopaedia_36"})
    shipped = load_model("covid-infection-2d", torch.device("cpu"))

    def with_upright(value: bool):
        return dataclasses.replace(shipped, card=dataclasses.replace(
            shipped.card, preprocessing={**shipped.card.preprocessing, "upright": value}))

    plain, upright = with_upright(False), with_upright(True)
    turned = evaluate_ctseg2d(upright, stored)
    reference = evaluate_ctseg2d(plain, by_hand)
    as_stored = evaluate_ctseg2d(plain, stored)
    assert turned["turned_upright"] == ["radiopaedia_36"] and "turned_upright" not in as_stored
    assert [c["dice"] for c in turned["per_case"]] == pytest.approx([c["dice"] for c in reference["per_case"]])
    radiopaedia = [i for i, c in enumerate(turned["per_case"]) if c["series"].startswith("radiopaedia")]
    assert len(radiopaedia) == 3 and len(turned["per_case"]) > 3
    assert any(turned["per_case"][i]["dice"] != as_stored["per_case"][i]["dice"] for i in radiopaedia)
    coronacases = [i for i in range(len(turned["per_case"])) if i not in radiopaedia]
    assert all(turned["per_case"][i]["dice"] == as_stored["per_case"][i]["dice"] for i in coronacases)


def test_pictures_scored_as_stored_by_an_upright_model_are_said_to_be(tmp_path, one_torch_thread, capsys) -> None:
    """A picture folder carries no patients, so an upright model scores its pictures as stored and says how to
    have them turned; a covid-ct-seg-2d folder, whose patients are turned, and a model trained on both
    orientations need no such note."""
    from relsegcore.cli import main

    root = make_ctseg_folder(tmp_path / "set", chest=True)
    recipe = {"recipe": "full-slice-clahe", "input_size": 32}
    upright = save_constant_model(tmp_path / "up", True, name="up", preprocessing={**recipe, "upright": True})
    plain = save_constant_model(tmp_path / "plain", True, name="plain", preprocessing=recipe)
    pictures = ["evaluate", "--images", str(root / "images"), "--masks", str(root / "masks"), "--device", "cpu"]
    note = "up was trained on slices anterior up only and these pictures were scored as they are"
    assert main([*pictures, "--model", str(upright), "--json", str(tmp_path / "pictures.json")]) == 0
    assert note in capsys.readouterr().out
    assert json.loads((tmp_path / "pictures.json").read_text())["orientation_note"].startswith(note)
    assert main([*pictures, "--model", str(plain)]) == 0
    assert "anterior up only" not in capsys.readouterr().out
    assert main(["evaluate", "--data", f"ctseg2d:{root}", "--model", str(upright), "--device", "cpu",
                 "--json", str(tmp_path / "ctseg.json")]) == 0
    assert "anterior up only" not in capsys.readouterr().out
    result = json.loads((tmp_path / "ctseg.json").read_text())
    assert "orientation_note" not in result and "turned_upright" in result
