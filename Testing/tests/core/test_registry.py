"""ModelRegistry and ``relseg models`` with tiny real DualEncoderUNet models in tmp_path."""

from __future__ import annotations

import json

import pytest
import torch

from relsegcore import zoo
from relsegcore.cli import main
from relsegcore.errors import ModelError
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.registry import ModelRegistry, default_model_name


def make_model(directory, name, version="1.0", parent=None, seed=0, metrics=None):
    torch.manual_seed(seed)
    network = DualEncoderUNet(NetworkConfig(base_channels=2, depth=2, max_channels=4))
    card = zoo.ModelCard(
        name=name, version=version, description=f"tiny test model {name}", file="", sha256="",
        architecture={}, classes=["background", "infection"], parent=parent,
        metrics=metrics or {"dice": 0.5 + seed / 100}, training={"data": "none", "command": "test"},
    )
    return zoo.save_model(network, card, directory)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """RELSEG_HOME in tmp_path, two shipped models, none of the real shipped models."""
    shipped = tmp_path / "shipped"
    make_model(shipped, "covid-infection-2d", seed=1, metrics={"folds": {"dice": {"mean": 0.71, "sd": 0.1}}})
    make_model(shipped, "covid-infection-3class", seed=2)
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RELSEG_MODELS_DIR", str(shipped))
    monkeypatch.setattr(zoo, "SHIPPED_MODELS_DIRS", ())
    return tmp_path / "home"


@pytest.fixture
def finetuned(tmp_path):
    return make_model(tmp_path / "work", "covid-infection-2d-ft1", "1.1", parent="covid-infection-2d", seed=3)


def test_list_shows_shipped_models_and_the_shipped_default(home):
    registry = ModelRegistry()
    entries = {e.name: e for e in registry.list()}
    assert set(entries) == {"covid-infection-2d", "covid-infection-3class"}
    assert registry.default() == "covid-infection-2d" == default_model_name()
    assert entries["covid-infection-2d"].is_default and not entries["covid-infection-3class"].is_default
    assert {e.origin for e in entries.values()} == {"shipped"}
    assert not (home / "registry.json").exists()  # reading never writes


def test_register_copies_without_changing_the_default(home, finetuned):
    registry = ModelRegistry()
    entry = registry.register(finetuned)
    assert (entry.origin, entry.parent, entry.is_default) == ("local", "covid-infection-2d", False)
    assert entry.path == home / "models" / "covid-infection-2d-ft1.pt"
    assert entry.path.read_bytes() == finetuned.read_bytes()
    assert registry.default() == "covid-infection-2d"
    # A registered model is a normal model everywhere zoo looks.
    loaded = zoo.load_model("covid-infection-2d-ft1", torch.device("cpu"))
    assert loaded.card.version == "1.1" and loaded.card.path == entry.path
    assert registry.register(finetuned).path == entry.path  # same model again: nothing changes
    assert sorted(p.name for p in (home / "models").iterdir()) == ["covid-infection-2d-ft1.json",
                                                                    "covid-infection-2d-ft1.pt"]


def test_use_and_rollback_persist_across_instances(home, finetuned):
    ModelRegistry().register(finetuned, make_default=True)
    assert ModelRegistry().default() == "covid-infection-2d-ft1"
    ModelRegistry().use("covid-infection-3class")
    assert ModelRegistry().history() == ["covid-infection-2d", "covid-infection-2d-ft1"]

    assert ModelRegistry().rollback() == "covid-infection-2d-ft1"
    assert ModelRegistry().rollback() == "covid-infection-2d"
    with pytest.raises(ModelError, match="no earlier default"):
        ModelRegistry().rollback()
    assert ModelRegistry().default() == "covid-infection-2d"
    assert json.loads((home / "registry.json").read_text()) == {"default": "covid-infection-2d", "history": []}


def test_using_the_current_default_adds_no_history(home):
    registry = ModelRegistry()
    registry.use("covid-infection-2d")
    assert registry.history() == []


def test_use_refuses_unknown_and_corrupt_models(home, tmp_path):
    registry = ModelRegistry()
    with pytest.raises(ModelError, match="no installed model is named 'nope'"):
        registry.use("nope")
    weights = tmp_path / "shipped" / "covid-infection-3class.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.use("covid-infection-3class")
    assert registry.default() == "covid-infection-2d" and not (home / "registry.json").exists()


def test_weights_that_do_not_fit_the_card_are_refused(home, tmp_path):
    path = make_model(tmp_path / "work", "mismatched", seed=4)
    card = json.loads(path.with_suffix(".json").read_text())
    card["architecture"]["base_channels"] = 3
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit"):
        ModelRegistry().register(path, make_default=True)
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_a_different_model_cannot_take_an_installed_name(home, tmp_path, finetuned):
    registry = ModelRegistry()
    registry.register(finetuned)
    impostor = make_model(tmp_path / "other", "covid-infection-2d-ft1", seed=9)
    with pytest.raises(ModelError, match="already installed"):
        registry.register(impostor)
    shadow = make_model(tmp_path / "other", "covid-infection-2d", seed=10)
    with pytest.raises(ModelError, match="already installed"):
        registry.register(shadow)
    assert zoo.find_model("covid-infection-2d").sha256 != zoo.read_card(shadow.with_suffix(".json")).sha256


def test_a_missing_default_is_reported_not_replaced(home, finetuned):
    registry = ModelRegistry()
    registry.register(finetuned, make_default=True)
    for path in (home / "models").iterdir():
        path.unlink()
    assert registry.default() == "covid-infection-2d-ft1"
    with pytest.raises(ModelError, match="unknown model"):
        zoo.find_model(registry.default())
    assert registry.rollback() == "covid-infection-2d"


def test_unreadable_registry_file_is_a_model_error(home):
    home.mkdir(parents=True)
    (home / "registry.json").write_text("{broken")
    with pytest.raises(ModelError, match="registry.json is unreadable"):
        ModelRegistry().default()


def test_explicit_home_is_separate_from_the_environment(home, tmp_path, finetuned):
    other = ModelRegistry(tmp_path / "other-home")
    other.register(finetuned, make_default=True)
    assert other.default() == "covid-infection-2d-ft1"
    assert ModelRegistry().default() == "covid-infection-2d"
    assert "covid-infection-2d-ft1" not in {e.name for e in ModelRegistry().list()}


def test_cli_list_use_rollback_show(home, finetuned, capsys):
    assert main(["models", "register", str(finetuned)]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ORIGIN", "PARENT", "DATE", "METRIC"]
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in lines[1:]}
    assert rows["covid-infection-2d"].startswith("*") and "folds 0.710" not in rows["covid-infection-2d"]
    assert "dice 0.710" in rows["covid-infection-2d"]
    assert "local" in rows["covid-infection-2d-ft1"] and "covid-infection-2d " in rows["covid-infection-2d-ft1"]

    assert main(["models", "use", "covid-infection-2d-ft1"]) == 0
    assert "default model: covid-infection-2d-ft1 1.1" in capsys.readouterr().out
    assert main(["models", "show", "covid-infection-2d-ft1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["is_default"] and shown["parent"] == "covid-infection-2d" and shown["origin"] == "local"
    assert main(["models", "rollback"]) == 0
    assert "default model: covid-infection-2d 1.0" in capsys.readouterr().out

    assert main(["models", "use", "nope"]) == 2
    assert "no installed model is named 'nope'" in capsys.readouterr().err
    assert main(["models", "rollback"]) == 2
    assert ModelRegistry().default() == "covid-infection-2d"
