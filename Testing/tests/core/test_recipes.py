"""``RelSegCore/recipes/default_infection.py``: the default's three stages, each going on from the one before."""

from __future__ import annotations

import importlib.util
import json
import shlex
from itertools import pairwise
from pathlib import Path

import SimpleITK as sitk
from synthetic_slices import make_ctseg_folder


def _recipe(repo_root: Path):
    path = repo_root / "RelSegCore" / "recipes" / "default_infection.py"
    spec = importlib.util.spec_from_file_location("default_infection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(command: list[str]) -> dict[str, list[str]]:
    """A ``relseg train`` command as option -> its values in order (a flag -> [])."""
    options: dict[str, list[str]] = {}
    current = None
    for word in command[command.index("train") + 1:]:
        if word.startswith("--"):
            current = word
            options.setdefault(current, [])
        else:
            options[current].append(word)
    return options


def test_the_recipes_last_stage_is_the_command_in_the_shipped_defaults_card(repo_root, capsys) -> None:
    """The recipe is the shipped model's: its third stage trains as the card says 2.6.0 was trained (only where it
    starts from and writes to differ), and each stage goes on from the model the one before exported."""
    assert _recipe(repo_root).main(["--out", "work-dirs/default", "--data", "../shared/data/covid-ct-seg-2d",
                                    "--shared-data", "../shared/data", "--cache-dir", "work-dirs/cache",
                                    "--dry-run"]) == 0
    stages = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(stages) == 3 and all(stage[:2] == ["relseg", "train"] for stage in stages)
    card = json.loads((repo_root / "Resources" / "Models" / "covid-infection-2d.json").read_text())
    shipped, recipe = _options(shlex.split(card["training"]["command"])), _options(stages[2])
    for own in ("--init", "--out"):  # where each run starts from and writes to
        del shipped[own], recipe[own]
    assert recipe == shipped
    for before, after in pairwise(stages):
        assert _options(after)["--init"] == [f"{_options(before)['--out'][0]}/covid-infection-2d.pt"]
    assert "--init" not in _options(stages[0])


def test_the_recipe_trains_its_stages_in_a_row_and_resumes_after_the_last_finished_one(tmp_path, repo_root,
                                                                                         capsys) -> None:
    from relsegcore.demo import make_demo_ct

    data = make_ctseg_folder(tmp_path / "set", chest=True)
    shared = tmp_path / "shared"
    (shared / "pleural-effusion").mkdir(parents=True)
    (shared / "lung-tumor-volumes").mkdir()
    chest = make_demo_ct(shape=(32, 128, 128), spacing=(2.8, 2.8, 8.0)).image
    sitk.WriteImage(chest, str(shared / "pleural-effusion" / "LUNG1-001_ct.nii.gz"))
    sitk.WriteImage(chest, str(shared / "lung-tumor-volumes" / "lung1_image.nrrd"))
    out = tmp_path / "default"
    tiny = ["--", "--iterations", "2", "--batch-size", "2", "--size", "32", "--base-channels", "4", "--depth", "2",
            "--negative-slices", "2"]
    recipe = _recipe(repo_root)
    argv = ["--out", str(out), "--data", str(data), "--shared-data", str(shared), *tiny]
    assert recipe.main(argv) == 0
    cards = [json.loads((out / stage / "covid-infection-2d.json").read_text()) for stage in ("stage1", "stage2",
                                                                                              "stage3")]
    for before, after in pairwise(cards):
        assert f"sha256 {before['sha256'][:12]}" in after["training"]["data"]  # went on from the stage before
    assert "started from" not in cards[0]["training"]["data"]
    assert "--negative-noise 25,50,100,150 --false-negative-weight 0.6" in cards[2]["training"]["command"]
    assert cards[2]["training"]["iterations"] == 2  # the arguments after -- reach every stage

    finished = {stage: (out / stage / "covid-infection-2d.pt").stat().st_mtime_ns for stage in ("stage1", "stage2")}
    (out / "stage3" / "covid-infection-2d.pt").unlink()
    capsys.readouterr()
    assert recipe.main(argv) == 0
    printed = capsys.readouterr().out
    assert "# stage1 done" in printed and "# stage2 done" in printed and printed.count("$ relseg train") == 1
    assert {stage: (out / stage / "covid-infection-2d.pt").stat().st_mtime_ns for stage in finished} == finished
    again = json.loads((out / "stage3" / "covid-infection-2d.json").read_text())
    assert f"sha256 {cards[1]['sha256'][:12]}" in again["training"]["data"]
