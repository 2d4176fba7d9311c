"""Model selector and versions through relsegcore's registry; extra models from a models index over real HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from COVIDInfectionSegLib import models


@pytest.fixture
def relseg_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RELSEG_HOME", str(home))
    monkeypatch.setenv("RELSEG_MODELS_DIR", "")
    return home


@pytest.fixture
def index_server(tmp_path, test_model):
    """A real HTTP server on 127.0.0.1 serving a models index, the weights and the card."""
    served = tmp_path / "served"
    served.mkdir()
    card = json.loads(Path(test_model).read_text())
    card["name"], card["version"] = "covid-infection-2d-site", "2.0.0"
    card["description"] = "Fine-tuned at the site.\nSecond line not shown."
    shutil.copyfile(Path(test_model).with_name(card["file"]), served / "site.pt")
    (served / "site.json").write_text(json.dumps(card))
    entry = {"name": card["name"], "version": card["version"], "url": "site.pt", "sha256": card["sha256"]}
    (served / "index.json").write_text(json.dumps([entry]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.json"
    server.shutdown()


def test_shipped_models_folder_is_searched(relseg_home):
    folders = models.configure_model_search()
    assert folders == models.shipped_models_dirs()
    assert os.environ["RELSEG_MODELS_DIR"].split(os.pathsep) == [str(path) for path in folders]
    assert models.configure_model_search() == folders  # idempotent


def test_download_from_index_then_select_use_and_roll_back(relseg_home, index_server, test_model):
    from relsegcore.registry import ModelRegistry

    first = ModelRegistry().register(test_model).name
    models.use_model(first)
    entries = models.models_in_index(index_server)
    assert [entry["name"] for entry in entries] == ["covid-infection-2d-site"]
    seen = []
    models.download_model_entry(entries[0], progress=lambda fraction, stage: seen.append((fraction, stage)))
    assert seen and seen[-1][0] == 1.0 and seen[-1][1].startswith("Downloading")
    assert (relseg_home / "models" / "covid-infection-2d-site.pt").is_file()
    choice = next(c for c in models.model_choices() if c.name == "covid-infection-2d-site")
    assert choice.label == "covid-infection-2d-site 2.0.0 - Fine-tuned at the site."
    assert not choice.is_default

    models.use_model("covid-infection-2d-site")
    assert models.default_model() == "covid-infection-2d-site"
    assert models.model_choices()[0].name == "covid-infection-2d-site"  # default listed first
    assert models.roll_back() == first
    assert models.default_model() == first


def test_a_model_whose_card_always_flips_is_offered_at_accurate_only(relseg_home, test_model):
    from COVIDInfectionSegLib import panel
    from relsegcore.registry import ModelRegistry

    flipping = relseg_home.parent / "flipping"
    flipping.mkdir()
    card = json.loads(Path(test_model).read_text())
    card["name"], card["postprocessing"] = "tiny-flipping", {"flip_tta": True, "threshold": 0.3}
    shutil.copyfile(Path(test_model).with_name(card["file"]), flipping / "tiny-flipping.pt")
    card["file"] = "tiny-flipping.pt"
    (flipping / "tiny-flipping.json").write_text(json.dumps(card))
    ModelRegistry().register(test_model)
    ModelRegistry().register(flipping / "tiny-flipping.pt")

    choices = {choice.name: choice for choice in models.model_choices()}
    assert choices["tiny-flipping"].always_tta and not choices["tiny-slicer-test"].always_tta
    assert panel.quality_for(choices["tiny-flipping"], "free") == (True, panel.ALWAYS_TTA_TOOLTIP)
    assert panel.quality_for(choices["tiny-slicer-test"], "free") == (False, "free")
    assert panel.quality_for(None, "free") == (False, "free")
