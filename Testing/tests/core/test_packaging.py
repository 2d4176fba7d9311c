"""`pip install ./RelSegCore` (not editable) must give a relseg that finds and verifies its shipped models.

The models live in the repository's top-level Resources/Models, outside the package; setup.py
copies them into the wheel and the sdist. Built here from a copy of the checkout (so the build
leaves nothing in the working tree), without build isolation (setuptools comes with torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

PACKAGED = "relsegcore/shipped_models"


@pytest.fixture(scope="module")
def shipped_cards(repo_root) -> dict[str, dict]:
    """The checkout's model cards by weights file name; skips when the checkout ships no model."""
    cards = {}
    for card_path in sorted((repo_root / "Resources" / "Models").glob("*.json")):
        card = json.loads(card_path.read_text())
        cards[card["file"]] = card
    if not cards:
        pytest.skip("no shipped model in Resources/Models")
    return cards


@pytest.fixture(scope="module")
def source_copy(repo_root, tmp_path_factory) -> Path:
    """RelSegCore and Resources/Models copied as they sit in the repository, without build leftovers."""
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "shipped_models")
    shutil.copytree(repo_root / "RelSegCore", root / "RelSegCore", ignore=ignore)
    shutil.copytree(repo_root / "Resources" / "Models", root / "Resources" / "Models")
    return root / "RelSegCore"


def build_wheel(source: Path, out_dir: Path) -> Path:
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement (SPDX license)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(out_dir), str(source)], check=True, capture_output=True)
    (wheel,) = out_dir.glob("relsegcore-*.whl")
    return wheel


def test_wheel_installs_a_relseg_that_loads_its_verified_default_model(source_copy, shipped_cards, tmp_path):
    wheel = build_wheel(source_copy, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {Path(name).name for name in archive.namelist() if name.startswith(PACKAGED + "/")}
    assert packaged == set(shipped_cards) | {Path(name).with_suffix(".json").name for name in shipped_cards}

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RELSEG_")}
    environment.update(PYTHONPATH=str(site), RELSEG_HOME=str(tmp_path / "home"))
    probe = ("import torch; from relsegcore import zoo; m = zoo.load_model(None, torch.device('cpu')); "
             "print(m.card.name, m.card.sha256, m.card.path)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    name, sha256, path = result.stdout.split()
    assert name == "covid-infection-2d"
    assert sha256 == shipped_cards[f"{name}.pt"]["sha256"]  # load_model checked the file against it
    assert Path(path).parent == site / PACKAGED  # the wheel's copy, not the checkout's


def test_sdist_carries_the_models_into_a_wheel_built_away_from_the_checkout(source_copy, shipped_cards, tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build_sdist, str(tmp_path)], cwd=source_copy,
                            check=True, capture_output=True, text=True)
    sdist = tmp_path / result.stdout.split()[-1]
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (source,) = unpacked.iterdir()
    assert not (source.parent / "Resources").exists()  # nothing to copy from: the sdist must hold them
    wheel = build_wheel(source, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        weights = {Path(name).name: archive.read(name) for name in archive.namelist()
                   if name.startswith(PACKAGED + "/") and name.endswith(".pt")}
    assert set(weights) == set(shipped_cards)
    for file_name, data in weights.items():
        assert hashlib.sha256(data).hexdigest() == shipped_cards[file_name]["sha256"]
