"""Ensembles: several runs as one model whose class probabilities are their mean, made by `relseg models
ensemble`, loaded and run like any model, fine-tuned member by member."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_slices import squares

from relsegcore import finetune as ft
from relsegcore import training
from relsegcore.cli import main
from relsegcore.errors import ModelError
from relsegcore.inference import predict_slices
from relsegcore.models import DualEncoderUNet, EnsembleNetwork, NetworkConfig
from relsegcore.zoo import ModelCard, find_model, load_model, save_model

SIZE = 32
TINY = NetworkConfig(base_channels=4, depth=3, use_general_encoder=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_member(directory: Path, name: str, seed: int, preprocessing: dict | None = None) -> Path:
    torch.manual_seed(seed)
    card = ModelCard(name=name, version="1.0.0", description="tiny run", file="", sha256="", architecture={},
                     classes=["background", "infection"], preprocessing=preprocessing or {"input_size": SIZE},
                     training={"command": f"relseg train --seed {seed}", "image_fingerprints": [f"slice-{seed}"]})
    return save_model(DualEncoderUNet(TINY), card, directory)


@pytest.fixture
def members(tmp_path) -> list[Path]:
    return [write_member(tmp_path, f"run{seed}", seed) for seed in (0, 1)]


def make(members: list[Path], out: Path, capsys) -> int:
    code = main(["models", "ensemble", *map(str, members), "--out", str(out), "--model-version", "2.0.0"])
    capsys.readouterr()
    return code


def test_the_ensembles_probability_is_the_mean_of_its_members():
    torch.manual_seed(0)
    ensemble = EnsembleNetwork(TINY, 3).eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(member(x), dim=1) for member in ensemble.members]).mean(0)
        assert torch.allclose(torch.softmax(ensemble(x), dim=1), expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleNetwork(TINY, 1)


def test_relseg_models_ensemble_writes_a_verified_model_that_averages_its_members(tmp_path, members, capsys):
    out = tmp_path / "made" / "both.pt"
    assert make(members, out, capsys) == 0

    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"]["members"] == 2 and card["version"] == "2.0.0"
    member_cards = [json.loads(m.with_suffix(".json").read_text()) for m in members]
    assert [m["sha256"] for m in card["training"]["ensemble_of"]] == [m["sha256"] for m in member_cards]
    assert [m["command"] for m in card["training"]["ensemble_of"]] == ["relseg train --seed 0", "relseg train --seed 1"]
    assert card["training"]["image_fingerprints"] == ["slice-0", "slice-1"]
    assert card["training"]["command"].startswith("relseg models ensemble ")

    images = squares(4, SIZE)[0]
    cpu = torch.device("cpu")
    ensemble = predict_slices(load_model(out, cpu, "torch"), images)
    singles = [predict_slices(load_model(m, cpu, "torch"), images) for m in members]
    assert np.allclose(ensemble, np.mean(singles, axis=0), atol=1e-5)
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the members differ, so the mean means something


def test_openvino_runs_an_ensemble_as_pytorch_does(tmp_path, members, capsys):
    pytest.importorskip("openvino")
    out = tmp_path / "both.pt"
    assert make(members, out, capsys) == 0
    images = squares(4, SIZE)[0]
    cpu = torch.device("cpu")
    fast = load_model(out, cpu, "openvino")
    probabilities = predict_slices(fast, images)
    assert fast.engine == "openvino"
    assert np.allclose(probabilities, predict_slices(load_model(out, cpu, "torch"), images), atol=1e-4)


def test_members_that_are_not_interchangeable_are_refused_with_the_reason(tmp_path, members, capsys):
    upright = write_member(tmp_path, "upright", 2, {"input_size": SIZE, "upright": True})
    assert main(["models", "ensemble", str(members[0]), str(upright), "--out", str(tmp_path / "e.pt")]) == 2
    assert "differ in preprocessing" in capsys.readouterr().err

    assert make(members, tmp_path / "pair.pt", capsys) == 0
    assert main(["models", "ensemble", str(tmp_path / "pair.pt"), str(members[0]), "--out",
                 str(tmp_path / "e.pt")]) == 2
    assert "is itself an ensemble" in capsys.readouterr().err

    assert main(["models", "ensemble", str(members[0]), "--out", str(tmp_path / "e.pt")]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert main(["models", "ensemble", *map(str, members), "--out", str(members[0])]) == 2
    assert "overwrite its member" in capsys.readouterr().err
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("members_field", [1, "2", True, 2.5])
def test_a_card_with_a_bad_member_count_is_a_model_error(tmp_path, members, capsys, members_field):
    out = tmp_path / "pair.pt"
    assert make(members, out, capsys) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    card["architecture"]["members"] = members_field
    out.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="architecture.members"):
        find_model(out)


def test_an_ensemble_is_fine_tuned_member_by_member_and_stays_an_ensemble(tmp_path, members, capsys):
    parent = tmp_path / "pair.pt"
    assert make(members, parent, capsys) == 0
    images, masks = squares()
    result = ft.finetune(parent, images, masks, None, tmp_path / "out" / "pair-ft.pt", device="cpu", iterations=30,
                         batch_size=4, learning_rate=1e-2, augment_strength=0.0)

    assert result.accepted and result.dice_after > result.dice_before
    assert result.card.architecture["members"] == 2
    assert {row["member"] for row in result.history} == {0, 1}
    before = load_model(parent, torch.device("cpu"), "torch").network
    after = load_model(result.path, torch.device("cpu"), "torch").network
    for old, new in zip(before.members, after.members, strict=True):
        key = "head.weight"
        assert not torch.equal(old.state_dict()[key], new.state_dict()[key])  # every member learned


def test_an_ensemble_is_refused_as_a_teacher(tmp_path, members, capsys):
    parent = tmp_path / "pair.pt"
    assert make(members, parent, capsys) == 0
    with pytest.raises(ModelError, match="name one of its members"):
        training.load_teacher(str(parent), torch.device("cpu"))
