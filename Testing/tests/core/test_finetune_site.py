"""Fine-tuning on a new site's slices: which slices are corrected, which guard it, and the card's fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_slices import squares

from relsegcore import finetune as ft
from relsegcore.cli import main
from relsegcore.data.readers import picture_fingerprint, read_gray_picture
from relsegcore.errors import InputError
from relsegcore.evaluation import seen_in_training
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.zoo import ModelCard, load_model, save_model

SIZE = 32  # the tiny model's input
STORED = 40  # the pictures on disk

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = NetworkConfig(base_channels=4, depth=3)
FAST = dict(device="cpu", iterations=4, batch_size=4, learning_rate=1e-2, augment_strength=0.0)


def test_the_guard_leaves_out_neighbours_of_corrected_slices():
    cases = ["a"] * 10 + ["b"] * 3
    orders = [*range(10), *range(3)]
    corrected = np.zeros(13, bool)
    corrected[5] = True  # a, order 5

    guard = ft.guard_candidates(cases, orders, corrected)

    assert [(cases[i], orders[i]) for i in guard] == [
        ("a", 0), ("a", 1), ("a", 2),  # 3 or more away: in
        ("a", 8), ("a", 9),  # a/3, a/4, a/6, a/7 are 1-2 away: out
        ("b", 0), ("b", 1), ("b", 2),  # another case: all in
    ]


def test_the_guard_needs_a_gap_from_every_corrected_slice_of_the_case():
    corrected = np.zeros(12, bool)
    corrected[[2, 9]] = True
    guard = ft.guard_candidates(["a"] * 12, range(12), corrected)
    assert guard.tolist() == [5, 6]  # 0 and 11 are 2 away from one of them; 5 and 6 are 3 from both


def test_another_series_of_a_corrected_patient_is_no_guard():
    cases = ["p1_s1", "p1_s1", "p1_s1", "p1_s1", "p1_s2", "p2"]
    patients = ["p1", "p1", "p1", "p1", "p1", "p2"]
    corrected = np.array([True, False, False, False, False, False])

    guard = ft.guard_candidates(cases, [0, 1, 2, 3, 0, 0], corrected, patients)

    assert guard.tolist() == [3, 5]  # p1_s2 has no order to compare with p1_s1: out


def test_corrections_and_guard_caps_the_guard_evenly_and_falls_back_to_whole_patients():
    cases = ["a"] * 4 + ["b"] * 100 + ["c"] * 100
    corrected = np.array([c == "a" for c in cases])
    trained, guard = ft.corrections_and_guard(cases, [*range(4), *range(100), *range(100)], corrected, limit=10)
    assert trained.tolist() == [0, 1, 2, 3]
    assert len(guard) == 10 and len(set(guard.tolist())) == 10
    assert {cases[i] for i in guard} == {"b", "c"} and not corrected[guard].any()

    every = ["p1_s1"] * 3 + ["p1_s2"] * 3 + ["p2"] * 3
    patients = [c.split("_")[0] for c in every]
    for seed in range(4):  # every slice corrected: whole patients held out, both series of p1 together
        trained, guard = ft.corrections_and_guard(every, [0, 1, 2] * 3, np.ones(9, bool), patients, seed=seed)
        held = {patients[i] for i in guard}
        assert len(held) == 1 and not held & {patients[i] for i in trained}
        assert sorted([*trained, *guard]) == list(range(9))
    with pytest.raises(InputError, match="no corrected slice"):
        ft.corrections_and_guard(["a"], [0], np.zeros(1, bool))


def test_corrections_of_one_patient_hold_out_spaced_slices_of_it():
    """A folder of 16 corrected slices of one patient: a quarter held out, none near a kept one."""
    cases, orders = ["p"] * 16, [6 * i for i in range(16)]  # corrections 6 slices apart
    trained, guard = ft.corrections_and_guard(cases, orders, np.ones(16, bool))
    assert len(guard) == 4 and len(trained) == 12 and not set(trained) & set(guard)
    assert min(abs(orders[g] - orders[t]) for g in guard for t in trained) >= ft.GUARD_GAP
    trained, guard = ft.corrections_and_guard(cases, orders[:4] + [100, 101, 102, 103, 104, 105, 106, 107, 108,
                                                                   109, 110, 111], np.ones(16, bool))
    assert guard.tolist() == [2]  # of the 4 chosen, those among consecutive slices would be near copies: trained
    with pytest.raises(InputError, match="one patient"):
        ft.corrections_and_guard(["p"] * 4, [0, 1, 2, 3], np.ones(4, bool))


def write_model(directory: Path, preprocessing: dict, fingerprints: list[str]) -> Path:
    """A tiny untrained model whose card says what its parent training saw."""
    torch.manual_seed(0)
    card = ModelCard(name="tiny", version="1.0.0", description="tiny test model", file="", sha256="",
                     architecture={}, classes=["background", "infection"], preprocessing=preprocessing,
                     training={"image_fingerprints": fingerprints})
    return save_model(DualEncoderUNet(TINY), card, directory)


def stored_pictures(folder: Path, names: list[str]) -> list[np.ndarray]:
    return [read_gray_picture(folder / name) for name in names]


def test_a_finetuned_card_fingerprints_its_corrected_slices_as_stored(tmp_path):
    model = write_model(tmp_path / "parent", {"input_size": SIZE}, ["parent-slice"])
    images, masks = squares(8, size=STORED)  # stored larger than the model's input: resized before training
    for sub in ("images", "masks"):
        (tmp_path / "site" / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(tmp_path / "site" / "images" / f"{i}.png")
        Image.fromarray(mask * 255).save(tmp_path / "site" / "masks" / f"{i}.png")
    data = ft.slices_from_folder(tmp_path / "site" / "images", tmp_path / "site" / "masks", SIZE)

    result = ft.finetune(model, data.images, data.masks, data.edited, tmp_path / "ft.pt", cases=data.cases,
                         fingerprints=data.fingerprints, **FAST)

    corrections = result.card.training["corrections"]
    trained = [f"{name.split('/')[1]}.png" for name in corrections["cases"]]
    held = [f"{name.split('/')[1]}.png" for name in corrections["holdout_cases"]]
    assert len(trained) == 6 and len(held) == 2
    assert result.card.training["image_fingerprints"][0] == "parent-slice"  # the parent's, kept
    assert len(result.card.training["image_fingerprints"]) == 1 + 6
    card = load_model(result.path, torch.device("cpu")).card  # as relseg evaluate reads it back
    assert seen_in_training(card, stored_pictures(tmp_path / "site" / "images", trained)) == 6
    assert seen_in_training(card, stored_pictures(tmp_path / "site" / "images", held)) == 0


CLAHE = {"recipe": "full-slice-clahe", "input_size": SIZE}
SITE = {"coronacases_001": 6, "coronacases_002": 6, "radiopaedia_7_1": 4, "radiopaedia_7_2": 4}


def write_ctseg2d(root: Path, cases: dict[str, int]) -> Path:
    """A tiny ``covid-ct-seg-2d`` folder: squares as infection, the whole frame as lungs, slices numbered
    across cases as in the real one."""
    for sub in ("images", "masks", "lungs"):
        (root / sub).mkdir(parents=True)
    rows, number = ["file,case,source,order_in_case"], 0
    for seed, (case, count) in enumerate(cases.items()):
        for order, (image, mask) in enumerate(zip(*squares(count, size=STORED, seed=seed), strict=True)):
            name = f"{number:04d}.png"
            Image.fromarray(image).save(root / "images" / name)
            Image.fromarray(mask * 255).save(root / "masks" / name)
            Image.fromarray(np.full_like(mask, 255)).save(root / "lungs" / name)
            rows.append(f"{name},{case},{case.split('_')[0]},{order}")
            number += 1
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root


def pictures_of(root: Path, cases: set[str]) -> list[np.ndarray]:
    """The stored pictures of ``cases``, as ``relseg evaluate`` reads them."""
    lines = (root / "cases.csv").read_text().splitlines()[1:]
    return [read_gray_picture(root / "images" / line.split(",")[0]) for line in lines if line.split(",")[1] in cases]


def test_ctseg2d_corrections_by_patient_and_a_guard_of_the_other_cases(tmp_path):
    root = write_ctseg2d(tmp_path / "site", SITE)
    card = ModelCard(name="clahe", version="1", description="", file="", sha256="", architecture={},
                     classes=["background", "infection"], preprocessing=CLAHE)

    corrections, guard = ft.slices_from_ctseg2d(root, card, ["radiopaedia_7"])

    assert corrections.cases == ["radiopaedia_7_1"] * 4 + ["radiopaedia_7_2"] * 4  # both series of the patient
    assert corrections.images.shape == (8, SIZE, SIZE) and corrections.edited.all()
    assert corrections.source == f"ctseg2d:{root}"
    assert corrections.fingerprints == [picture_fingerprint(p) for p in pictures_of(root, set(corrections.cases))]
    assert guard.cases == ["coronacases_001"] * 6 + ["coronacases_002"] * 6
    assert guard.masks.max() == 1 and guard.fingerprints is None

    _, guard = ft.slices_from_ctseg2d(root, card, ["radiopaedia_7_1"])
    assert set(guard.cases) == {"coronacases_001", "coronacases_002"}  # not the patient's other series

    everything, none = ft.slices_from_ctseg2d(root, card, guard=False)
    assert len(everything) == 20 and none is None


def test_ctseg2d_needs_a_full_slice_clahe_infection_model():
    def card(preprocessing: dict, classes: int = 2) -> ModelCard:
        return ModelCard(name="m", version="1", description="", file="", sha256="", architecture={},
                         classes=["background", "ground-glass", "consolidation"][:classes], preprocessing=preprocessing)

    ft.check_ctseg_model(card(CLAHE))
    for lung_crop in ({"input_size": 256}, {"recipe": "lung-crop", "input_size": 256}):
        with pytest.raises(InputError, match="m sees lung-crop slices .* ctseg2d slices are whole CLAHE slices"):
            ft.check_ctseg_model(card(lung_crop))
    with pytest.raises(InputError, match="3 classes"):
        ft.check_ctseg_model(card(CLAHE, 3))


def test_case_orders_come_from_cases_csv_or_the_position_in_the_case():
    rows = [{"file": "0.png", "case": "a", "order_in_case": "7"}, {"file": "1.png", "case": "a", "order_in_case": ""},
            {"file": "2.png", "case": "b"}]
    assert ft.case_orders(rows) == [7, 1, 0]
    with pytest.raises(InputError, match="not a whole number"):
        ft.case_orders([{"file": "0.png", "case": "a", "order_in_case": "x"}])


def finetune_cli(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--model", str(model), "--data", f"ctseg2d:{data}", "--out", str(out), *extra,
                 "--iterations", "4", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--progress", "none"])


def test_cli_finetunes_on_named_cases_of_a_ctseg2d_folder(tmp_path, capsys):
    root = write_ctseg2d(tmp_path / "site", SITE)
    model = write_model(tmp_path / "parent", CLAHE, ["parent-slice"])
    out = tmp_path / "models" / "site-ft.pt"

    assert finetune_cli(model, root, out, "--cases", "coronacases_001") == 0

    printed = capsys.readouterr().out
    assert "on 6 slices (6 edited) from 1 case(s)" in printed and "guard: 14 held-out slices of 3 case(s)" in printed
    card = load_model(out, torch.device("cpu")).card
    corrections = card.training["corrections"]
    assert corrections["cases"] == ["coronacases_001"] and corrections["slices"] == 6
    assert corrections["holdout_cases"] == ["coronacases_002", "radiopaedia_7_1", "radiopaedia_7_2"]
    assert f"--data ctseg2d:{root} --cases coronacases_001" in card.training["command"]
    assert card.training["image_fingerprints"][0] == "parent-slice" and len(card.training["image_fingerprints"]) == 7
    assert seen_in_training(card, pictures_of(root, {"coronacases_001"})) == 6
    assert seen_in_training(card, pictures_of(root, set(SITE) - {"coronacases_001"})) == 0


def test_cli_on_every_slice_holds_out_whole_patients(tmp_path):
    root = write_ctseg2d(tmp_path / "site", SITE)
    model = write_model(tmp_path / "parent", CLAHE, [])
    assert finetune_cli(model, root, tmp_path / "all.pt") == 0
    corrections = ModelCard.from_dict(json.loads((tmp_path / "all.json").read_text())).training["corrections"]
    patients = {case: case.rsplit("_", 1)[0] if case.startswith("radiopaedia") else case for case in SITE}
    assert len(corrections["cases"]) + len(corrections["holdout_cases"]) == 4
    assert not {patients[c] for c in corrections["cases"]} & {patients[c] for c in corrections["holdout_cases"]}


def test_cli_trains_on_every_correction_when_given_a_guard_folder(tmp_path, capsys):
    """A folder of corrected slices only (the radiologist's batch) and the other slices as --guard."""
    corrected = write_ctseg2d(tmp_path / "corrected", {"coronacases_001": 3, "radiopaedia_7_1": 3})
    other = write_ctseg2d(tmp_path / "other", {"coronacases_002": 5})
    model = write_model(tmp_path / "parent", CLAHE, [])
    assert finetune_cli(model, corrected, tmp_path / "g.pt", "--guard", f"ctseg2d:{other}") == 0
    printed = capsys.readouterr().out
    assert "on 6 slices (6 edited) from 2 case(s)" in printed and "guard: 5 held-out slices of 1 case(s)" in printed
    assert main(["finetune", "--model", str(model), "--images", str(other / "images"), "--masks",
                 str(other / "masks"), "--guard", f"ctseg2d:{other}"]) == 2
    assert "--guard goes with --data" in capsys.readouterr().err


def test_cli_refuses_a_lung_crop_model_and_stray_cases(tmp_path, capsys):
    root = write_ctseg2d(tmp_path / "site", {"a": 2, "b": 2})
    lung_crop = write_model(tmp_path / "parent", {"input_size": SIZE}, [])
    assert finetune_cli(lung_crop, root, tmp_path / "x.pt") == 2
    assert "ctseg2d slices are whole CLAHE slices" in capsys.readouterr().err
    clahe = write_model(tmp_path / "clahe", CLAHE, [])
    assert finetune_cli(clahe, root, tmp_path / "x.pt", "--cases", "c") == 2
    assert "no case or patient named 'c'" in capsys.readouterr().err
    assert main(["finetune", "--model", str(clahe), "--images", str(root / "images"), "--masks", str(root / "masks"),
                 "--cases", "a"]) == 2
    assert "--cases selects the corrected cases of --data" in capsys.readouterr().err
    assert main(["finetune", "--model", str(clahe), "--data", f"folder:{root}"]) == 2
    assert "reads --data ctseg2d:DIR, not folder" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
