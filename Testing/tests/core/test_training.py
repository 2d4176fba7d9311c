"""Training: the loss falls, runs resume exactly, DDP replicas agree, the CLI exports a model card."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from synthetic_slices import squares

from relsegcore.errors import Cancelled
from relsegcore.models import NetworkConfig
from relsegcore.progress import Progress
from relsegcore.training import (
    RelationConfig,
    TrainConfig,
    encoder_state_from,
    load_checkpoint,
    save_checkpoint,
    train,
)

TINY = NetworkConfig(base_channels=4, depth=3)


def config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(out_dir=tmp_path, network=TINY, iterations=40, batch_size=4, learning_rate=1e-2,
                  validate_every=20, checkpoint_every=20, device="cpu", augment_strength=0.0, warmup_iterations=2)
    values.update(overrides)
    return TrainConfig(**values)


def test_short_training_lowers_the_loss_and_writes_logs(tmp_path):
    images, masks = squares()
    result = train(config(tmp_path, iterations=60), images, masks, images[:4], masks[:4])
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.final_val_dice is not None and result.final_val_dice > 0.5
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [20, 40, 60]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "checkpoint.pt").is_file()


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    images, masks = squares()
    whole = train(config(tmp_path / "whole"), images, masks)
    stop_halfway = Progress(should_cancel=lambda: (tmp_path / "split" / "checkpoint.pt").is_file())
    with pytest.raises(Cancelled):
        train(config(tmp_path / "split"), images, masks, progress=stop_halfway)
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    state["history"][-1]["seconds"] = 1000.0  # as if the first part had taken 1000 s
    save_checkpoint(checkpoint, state)
    resumed = train(config(tmp_path / "split"), images, masks)  # picks up the iteration-20 checkpoint
    assert [r["iteration"] for r in resumed.history] == [20, 40]
    # the run's seconds include the part before the interruption (model cards report them)
    assert resumed.seconds >= 1000 and resumed.history[1]["seconds"] >= 1000
    for key, value in whole.network.state_dict().items():
        assert torch.allclose(value, resumed.network.state_dict()[key], atol=1e-5), key


@pytest.mark.parametrize("reading", ["encoders", "ema"])
def test_dual_training_with_relation_loss_keeps_general_encoder_fixed(tmp_path, reading):
    images, masks = squares()
    stage1 = train(config(tmp_path / "stage1", iterations=20, network=NetworkConfig(
        base_channels=4, depth=3, use_general_encoder=False)), images, masks)
    general = encoder_state_from(tmp_path / "stage1" / "checkpoint.pt")
    assert all(torch.equal(general[k], v) for k, v in stage1.network.target_encoder.state_dict().items())
    dual = train(config(tmp_path / "dual", iterations=20, general_encoder=tmp_path / "stage1" / "checkpoint.pt",
                        relation=RelationConfig(reading=reading, weight=1.0, ramp_up_fraction=0.0)),
                 images, masks)
    assert all(torch.equal(general[k], v) for k, v in dual.network.general_encoder.state_dict().items())
    assert all(row["relation_loss"] >= 0 for row in dual.history)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from synthetic_slices import squares
    from test_training import TINY
    from relsegcore.training import TrainConfig, train
    images, masks = squares(16)
    cfg = TrainConfig(out_dir={out!r}, network=TINY, iterations=6, batch_size=2, device="cpu",
                      validate_every=3, checkpoint_every=3, augment_strength=1.0, warmup_iterations=1)
    result = train(cfg, images, masks)
    rank = dist.get_rank()
    torch.save(result.network.state_dict(), {out!r} + f"/rank{{rank}}.pt")
    dist.destroy_process_group()
""")


def test_ddp_with_two_gloo_processes_keeps_replicas_identical(tmp_path, two_gloo_processes):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    two_gloo_processes(script)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    initial = train(TrainConfig(out_dir=tmp_path / "init", network=TINY, iterations=0, device="cpu"),
                    *squares(4)).network.state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)  # it trained
    for key in rank0:
        assert torch.allclose(rank0[key], rank1[key], atol=1e-6), key  # and the replicas agree
    assert (tmp_path / "checkpoint.pt").is_file()  # rank 0 alone wrote it


def write_picture_folder(folder: Path, images, masks) -> Path:
    from PIL import Image

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(folder / "images" / f"{i}.png")
        Image.fromarray(mask * 255).save(folder / "masks" / f"{i}.png")
    return folder


def test_train_cli_exports_a_model_card_with_the_command(tmp_path):
    from relsegcore.cli import main
    from relsegcore.zoo import find_model

    write_picture_folder(tmp_path / "data", *squares(6, size=40))
    code = main(["train", "--images", str(tmp_path / "data/images"), "--masks", str(tmp_path / "data/masks"),
                 "--out", str(tmp_path / "run"), "--iterations", "4", "--batch-size", "2", "--size", "32",
                 "--base-channels", "4", "--depth", "3", "--validate-every", "2", "--device", "cpu",
                 "--export", "tiny-test"])
    assert code == 0
    card = find_model(tmp_path / "run" / "tiny-test.pt")
    assert card.classes == ["background", "infection"]
    assert "--export tiny-test" in card.training["command"]
    saved = json.loads((tmp_path / "run" / "tiny-test.json").read_text())
    assert len(saved["sha256"]) == 64 and saved["architecture"]["base_channels"] == 4
    assert len(set(saved["training"]["image_fingerprints"])) == 6  # relseg evaluate spots these slices


@pytest.mark.parametrize("command", ["train", "pretrain-general"])
def test_the_training_help_lists_each_option_under_what_it_is_for(command, capsys):
    """``relseg train`` has about fifty options: each is in a titled group (data, folds, schedule...), none left
    in the untitled list but help and the device every command has."""
    from relsegcore.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    sections, title = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
        elif title and line.startswith("  -"):
            sections.setdefault(title, []).append(line.split()[0].rstrip(","))
    assert sections.pop("options") == ["-h", "--device"]
    assert len(sections) >= 4 and all(sections.values())
    options = [option for listed in sections.values() for option in listed]
    assert "--out" in options and "--iterations" in options and len(options) == len(set(options))


def test_share_weights_give_the_members_their_share_of_the_draws():
    from relsegcore.training import share_weights

    weights = share_weights([True, False, False, False, True], 0.25)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[[0, 4]].sum() == pytest.approx(0.25) and weights[0] == weights[4]
    assert share_weights([False, False], 0.25).tolist() == [0.5, 0.5]


def test_negatives_are_learnt_as_no_infection_at_their_share_of_each_batch(tmp_path):
    """The same squares given again as --negatives (their masks ignored), 90 % of every batch: the model
    must learn that squares are mostly not infection, and validation (positives only) must show it."""
    from relsegcore.cli import main

    images, masks = squares(12, size=32)
    data = write_picture_folder(tmp_path / "data", images, masks)
    write_picture_folder(tmp_path / "negatives", images, masks)  # lesion masks that must be ignored
    common = ["train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--iterations", "120",
              "--batch-size", "4", "--size", "32", "--base-channels", "4", "--depth", "3", "--lr", "1e-2",
              "--augment", "0", "--validate-every", "60", "--device", "cpu", "--fold", "0", "--folds", "3"]

    def validation_dice(out: Path, *extra: str) -> float:
        assert main([*common, "--out", str(out), *extra]) == 0
        return json.loads((out / "fold_result.json").read_text())["val_dice"]

    plain = validation_dice(tmp_path / "plain")
    with_negatives = validation_dice(tmp_path / "negatives-run", "--negatives", f"folder:{tmp_path / 'negatives'}",
                                     "--negative-fraction", "0.9")
    assert plain > 0.5
    assert with_negatives < 0.5 * plain

    from relsegcore.zoo import find_model

    exported = [*common[:common.index("--iterations")], "--iterations", "2", "--size", "32", "--base-channels", "4",
                "--depth", "3", "--device", "cpu", "--out", str(tmp_path / "final"), "--export", "with-negatives",
                "--negatives", f"folder:{tmp_path / 'negatives'}"]
    assert main(exported) == 0
    assert main([*exported, "--negative-fraction", "1", "--cross-validate"]) == 2  # refused before any fold runs
    assert not (tmp_path / "final" / "fold0").exists()
    card = find_model(tmp_path / "final" / "with-negatives.pt")
    assert "negatives (no infection): folder:" in card.training["data"]
    assert "(12 slices, 0.25 of each batch)" in card.training["data"]


def test_init_starts_from_the_models_weights_and_a_fold_refuses_a_model_that_saw_its_held_out_pictures(tmp_path,
                                                                                                          capsys):
    """--init loads the model's weights (at a vanishing learning rate the export equals them), names the model and
    keeps its fingerprints in the card; a fold whose held-out pictures the model trained on, or another
    architecture, is refused with one message and no model written."""
    from relsegcore.cli import main
    from relsegcore.zoo import find_model, load_state_dict_verified

    images, masks = squares(9, size=32)
    data = write_picture_folder(tmp_path / "data", images, masks)
    common = ["train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--batch-size", "2",
              "--size", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu", "--folds", "3",
              "--no-validation"]
    assert main([*common, "--iterations", "2", "--fold", "0", "--seed", "1", "--export", "m",
                 "--out", str(tmp_path / "m")]) == 0  # another seed: other weights than a plain run's
    start = find_model(tmp_path / "m" / "m.pt")
    start_state = load_state_dict_verified(start.path, start.sha256)

    def continued(name: str, *extra: str) -> Path | None:  # None: the command was refused
        return tmp_path / name / "c.pt" if main([*common, "--iterations", "3", "--lr", "1e-12", "--export", "c",
                                                  "--out", str(tmp_path / name), *extra]) == 0 else None

    plain = find_model(continued("plain", "--fold", "0"))
    plain_state = load_state_dict_verified(plain.path, plain.sha256)
    card = find_model(continued("init", "--fold", "0", "--init", str(start.path)))
    state = load_state_dict_verified(card.path, card.sha256)
    assert all(torch.allclose(state[key], start_state[key], atol=1e-6) for key in start_state)
    assert not all(torch.allclose(plain_state[key], start_state[key], atol=1e-3) for key in start_state)
    assert card.training["data"].startswith(f"started from m 1.0.0 (sha256 {start.sha256[:12]}")
    assert set(card.training["image_fingerprints"]) == set(start.training["image_fingerprints"])
    capsys.readouterr()

    assert continued("leak", "--fold", "1", "--init", str(start.path)) is None  # fold 0 trained on fold 1's
    assert capsys.readouterr().err.strip() == ("relseg: error: --init m was trained on 3 of the 3 slices fold 1 "
                                               "holds out; start the fold from a model trained without them")
    assert continued("deeper", "--fold", "0", "--depth", "3", "--init", str(start.path)) is None
    assert "--init m has another architecture" in capsys.readouterr().err
    assert not (tmp_path / "leak" / "c.pt").exists() and not (tmp_path / "deeper" / "c.pt").exists()


def test_cuda_out_of_memory_during_training_is_one_clear_message(monkeypatch, capsys, tmp_path):
    import relsegcore.cli.train as train_command
    from relsegcore.cli import main

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_command, "run_train", out_of_memory)
    code = main(["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == "relseg: error: the GPU ran out of memory; lower --batch-size or run with --device cpu"


def test_a_fold_model_of_a_picture_folder_fingerprints_its_training_pictures_only(tmp_path):
    """relseg evaluate must not call the fold's held-out pictures training data."""
    from relsegcore.cli import main
    from relsegcore.data.readers import folder_fingerprints

    images, masks = squares(9, size=32)
    data = write_picture_folder(tmp_path / "data", images, masks)
    out = tmp_path / "fold"
    assert main(["train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--iterations", "2",
                 "--batch-size", "2", "--size", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu",
                 "--fold", "0", "--folds", "3", "--no-validation", "--export", "m", "--out", str(out)]) == 0
    trained = json.loads((out / "m.json").read_text())["training"]["image_fingerprints"]
    every = folder_fingerprints(data / "images", data / "masks")
    assert len(trained) == json.loads((out / "fold_result.json").read_text())["train_slices"] == 6
    assert set(trained) < set(every)


def _constant_teacher(directory: Path, foreground: bool, recipe: str = "lung-crop") -> Path:
    """A model that predicts the same class everywhere, shipped with its card (a teacher to distil)."""
    from synthetic_slices import save_constant_model

    return save_constant_model(directory, foreground, name="teacher",
                               preprocessing={"recipe": recipe, "input_size": 32})


def test_a_distilled_network_learns_its_teachers_predictions(tmp_path):
    """Masks all background, a teacher that says infection everywhere: with the teacher's loss weighted far
    above the masks' the network follows the teacher, without it the masks."""
    from relsegcore.training import predict_labels

    images, masks = squares(12, size=32)
    background = masks * 0
    teacher = _constant_teacher(tmp_path / "teacher", foreground=True)
    shares = {}
    for name, extra in (("plain", {}), ("distilled", {"teacher": str(teacher), "distill_weight": 20.0})):
        result = train(config(tmp_path / name, iterations=40, **extra), images, background)
        predicted = predict_labels(result.network.eval(), torch.from_numpy(images)[:, None])
        shares[name] = float(predicted.float().mean())
        assert ("distill_loss" in result.history[-1]) == (name == "distilled")
    assert shares["plain"] < 0.05 and shares["distilled"] > 0.9


def test_train_cli_refuses_a_teacher_of_another_recipe_and_names_it_in_the_card(tmp_path, capsys):
    from relsegcore.cli import main
    from relsegcore.zoo import find_model

    data = write_picture_folder(tmp_path / "data", *squares(6, size=40))
    common = ["train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--iterations", "2",
              "--batch-size", "2", "--size", "32", "--base-channels", "4", "--depth", "3", "--validate-every", "2",
              "--device", "cpu", "--export", "student"]
    other = _constant_teacher(tmp_path / "other", foreground=True, recipe="full-slice-clahe")
    assert main([*common, "--out", str(tmp_path / "refused"), "--teacher", str(other)]) != 0
    assert "--teacher teacher sees full-slice-clahe slices" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "student.pt").exists()
    teacher = _constant_teacher(tmp_path / "teacher", foreground=True)
    assert main([*common, "--out", str(tmp_path / "run"), "--teacher", str(teacher)]) == 0
    card = find_model(tmp_path / "run" / "student.pt")
    assert "distilled from teacher 1 (sha256 " in card.training["data"]
    assert card.training["config"]["teacher"] == str(teacher)
