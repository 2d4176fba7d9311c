"""Fine-tuning on a new site's slices: which slices are corrected, which guard it, and the card's fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_slices import squares

from relsegcore import finetune as ft
from relsegcore.data.readers import read_gray_picture
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
