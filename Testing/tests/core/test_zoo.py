"""Model cards: weights are checked against the card's SHA-256 and loaded as weights only."""

from __future__ import annotations

import hashlib
import json
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from relsegcore import zoo
from relsegcore.errors import ModelError
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.training import TrainConfig


def tiny_card(name: str = "tiny") -> zoo.ModelCard:
    return zoo.ModelCard(name=name, version="1.0.0", description="test", file="", sha256="", architecture={},
                         classes=["background", "infection"])


def test_save_then_load_round_trips_weights(tmp_path):
    network = DualEncoderUNet(NetworkConfig(base_channels=4, depth=3))
    zoo.save_model(network, tiny_card(), tmp_path)
    loaded = zoo.load_model(tmp_path / "tiny.pt", torch.device("cpu"))
    assert loaded.card.architecture["base_channels"] == 4
    for key, value in network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])


def test_equal_weights_saved_twice_give_the_same_file_and_sha256(tmp_path):
    """A retrain that reproduces a model's weights reproduces its SHA-256 too: nothing random (such as the name of
    the temporary file written before the rename) ends up inside the saved archive."""
    network = DualEncoderUNet(NetworkConfig(base_channels=4, depth=3))
    first = zoo.save_model(network, tiny_card(), tmp_path / "a")
    second = zoo.save_model(network, tiny_card(), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    cards = [json.loads(path.with_suffix(".json").read_text()) for path in (first, second)]
    assert cards[0]["sha256"] == cards[1]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


def test_tampered_weights_are_refused_before_unpickling(tmp_path):
    zoo.save_model(DualEncoderUNet(NetworkConfig(base_channels=4, depth=3)), tiny_card(), tmp_path)
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="checksum mismatch"):
        zoo.load_model(weights, torch.device("cpu"))


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weights_only_refuses_arbitrary_objects_even_with_a_matching_checksum(tmp_path):
    zoo.save_model(DualEncoderUNet(NetworkConfig(base_channels=4, depth=3)), tiny_card(), tmp_path)
    weights = tmp_path / "tiny.pt"
    torch.save({"evil": Payload()}, weights, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    card = json.loads((tmp_path / "tiny.json").read_text())
    from relsegcore.fileutil import sha256_of

    card["sha256"] = sha256_of(weights)
    (tmp_path / "tiny.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot load model weights"):
        zoo.load_model(weights, torch.device("cpu"))


def test_card_without_required_fields_is_a_model_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"name": "bad"}))
    with pytest.raises(ModelError, match="missing"):
        zoo.find_model(tmp_path / "bad.json")


def test_unknown_model_names_the_installed_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="covid-infection-2d"):
        zoo.find_model("no-such-model")


# name -> (role, the recipe its input is rendered by, the data it names, slices it was trained on)
SHIPPED = {
    "covid-infection-2d": ("infection", "full-slice-clahe", "covid-ct-seg-2d", 1163),
    "covid-infection-2d-dual": ("infection", "full-slice-clahe", "covid-ct-seg-2d", 1163),
    "covid-lungs-2d": ("lungs", "full-slice-clahe", "covid-ct-seg-2d", 1163),
    "covid-semiseg-2d": ("infection", "lung-crop", "COVID-SemiSeg", 50),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_load_and_state_their_provenance(name, monkeypatch, tmp_path):
    from relsegcore.data.intensity import recipe_of

    role, recipe, data, slices = SHIPPED[name]
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))  # no user models shadow the shipped ones
    card = zoo.find_model(name)
    assert card.path.stat().st_size <= 25 * 1024 * 1024
    assert data in card.training["data"] and card.training["command"].startswith("relseg train")
    assert (card.role, recipe_of(card.preprocessing)) == (role, recipe)
    assert card.clinical is False
    loaded = zoo.load_model(name, torch.device("cpu"))
    assert (loaded.network.general_encoder is not None) == (name in ("covid-semiseg-2d", "covid-infection-2d-dual"))
    assert len(set(card.training["image_fingerprints"])) == slices  # its training slices
    if role == "infection":  # how it behaves on real CT, with the command that measured it (check_real_data.py)
        real = card.metrics["real_data"]
        assert "check_real_data.py --model" in real["command"] and real["command"].endswith("--card")
        assert len(real["covid_hu_slices_ggo_range_lung_flagged"]) == 4
        assert len(real["non_covid_false_positive_ml"]) == 12  # 10 effusion patients, 2 tumour volumes
        assert set(real["non_covid_false_positive_percent_of_lungs"]) == set(real["non_covid_false_positive_ml"])


def test_shipped_cards_fingerprint_exactly_their_training_slices(shared_data, monkeypatch, tmp_path):
    from relsegcore.data.readers import folder_fingerprints

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    train = shared_data / "covid-semiseg" / "train"
    assert zoo.find_model("covid-semiseg-2d").training["image_fingerprints"] == folder_fingerprints(
        train / "images", train / "masks")
    ctseg = shared_data / "covid-ct-seg-2d"
    expected = sorted(folder_fingerprints(ctseg / "images", ctseg / "masks"))
    for name in ("covid-infection-2d", "covid-infection-2d-dual", "covid-lungs-2d"):
        assert sorted(zoo.find_model(name).training["image_fingerprints"]) == expected


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_card_command_still_means_its_recorded_training(name, monkeypatch, tmp_path):
    """The card's command is how the model is reproduced: today's ``relseg`` must read it as the same
    configuration the model was trained with (a renamed flag or a changed default would break that)."""
    from relsegcore.cli import build_parser
    from relsegcore.cli.train import stage2_config

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    training = zoo.find_model(name).training
    args = build_parser().parse_args(shlex.split(training["command"])[1:])
    current, recorded = stage2_config(args).to_dict(), training["config"]
    assert {key: current[key] for key in recorded} == recorded
    defaults = TrainConfig(out_dir=Path(recorded["out_dir"])).to_dict()
    assert all(current[key] == defaults[key] for key in set(current) - set(recorded))  # options added since
    for command in (training.get("general_encoder") or {}).values():
        if isinstance(command, str) and command.startswith("relseg "):
            assert build_parser().parse_args(shlex.split(command)[1:]).command == "pretrain-general"


def test_default_model_is_the_registry_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    assert zoo.find_model(None).name == zoo.DEFAULT_MODEL


def test_relseg_models_use_changes_the_model_segment_runs_and_rollback_restores_it(monkeypatch, tmp_path):
    from relsegcore.registry import ModelRegistry

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path))
    registry = ModelRegistry()
    registry.use("covid-semiseg-2d")
    assert zoo.find_model(None).name == "covid-semiseg-2d"
    registry.rollback()
    assert zoo.find_model(None).name == "covid-infection-2d"


def test_the_default_scores_lung_window_crops_with_the_shipped_screenshot_model(monkeypatch, tmp_path, shared_data):
    """`relseg evaluate --model covid-infection-2d --images` on COVID-SemiSeg pictures: the default's network never
    saw that appearance (0.18 on them), so its card names covid-semiseg-2d, which was trained on them."""
    import json
    import shutil

    from relsegcore.cli import main
    from relsegcore.data.intensity import recipe_of

    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    card = zoo.find_model("covid-infection-2d")
    named = zoo.find_model(card.model_for_recipe("lung-crop"))
    assert (named.name, recipe_of(named.preprocessing), named.role) == ("covid-semiseg-2d", "lung-crop", "infection")
    source = shared_data / "covid-semiseg" / "train"
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for stem in ("0", "1", "2", "3"):
        shutil.copy(source / "images" / f"{stem}.jpg", tmp_path / "images")
        shutil.copy(source / "masks" / f"{stem}.png", tmp_path / "masks")
    assert main(["evaluate", "--model", "covid-infection-2d", "--images", str(tmp_path / "images"), "--masks",
                 str(tmp_path / "masks"), "--device", "cpu", "--json", str(tmp_path / "result.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["model"]["name"], result["asked_model"]["name"]) == ("covid-semiseg-2d", "covid-infection-2d")
    assert result["recipe"] == "lung-crop" and result["mean_dice"] > 0.6  # its own training pictures
