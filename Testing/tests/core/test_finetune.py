"""Fine-tuning on corrections: the loss falls, the guard refuses a worse model, cards, sampling, store, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from synthetic_slices import squares

from relsegcore import finetune as ft
from relsegcore import training
from relsegcore.cli import main
from relsegcore.corrections import CorrectionStore
from relsegcore.data import intensity
from relsegcore.demo import make_demo_ct
from relsegcore.errors import InputError
from relsegcore.losses import segmentation_loss
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.registry import ModelRegistry
from relsegcore.training import TrainConfig, train
from relsegcore.zoo import ModelCard, load_model, save_model

SIZE = 32
TINY = NetworkConfig(base_channels=4, depth=3)
FAST = dict(device="cpu", iterations=30, batch_size=4, learning_rate=1e-2, augment_strength=0.0)


def write_model(network: torch.nn.Module, directory: Path, name: str, version: str = "1.0.0") -> Path:
    card = ModelCard(name=name, version=version, description="tiny test model", file="", sha256="",
                     architecture={}, classes=["background", "infection"], preprocessing={"input_size": SIZE})
    return save_model(network, card, directory)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return write_model(DualEncoderUNet(TINY), tmp_path_factory.mktemp("untrained"), "tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model that already finds the squares (Dice well above chance)."""
    work = tmp_path_factory.mktemp("trained")
    images, masks = squares(16, seed=1)
    config = TrainConfig(out_dir=work / "run", network=TINY, iterations=60, batch_size=4, learning_rate=1e-2,
                         warmup_iterations=2, device="cpu", augment_strength=0.0, validate_every=60)
    return write_model(train(config, images, masks).network, work, "tiny")


def loss_on(model_path: Path, images: np.ndarray, masks: np.ndarray) -> float:
    network = load_model(model_path, torch.device("cpu")).network
    with torch.no_grad():
        logits = network(torch.from_numpy(images).float().unsqueeze(1) / 255.0)
        return float(segmentation_loss(logits, torch.from_numpy(masks).long()))


def test_finetuning_lowers_the_loss_and_writes_a_card_with_its_parent(tmp_path, untrained):
    images, masks = squares()
    result = ft.finetune(untrained, images, masks, None, tmp_path / "out" / "tiny-ft.pt", **FAST)

    assert loss_on(result.path, images, masks) < 0.7 * loss_on(untrained, images, masks)
    assert result.dice_after > result.dice_before and result.accepted
    card = json.loads(result.path.with_suffix(".json").read_text())
    parent = json.loads(untrained.with_suffix(".json").read_text())
    assert (card["name"], card["version"], card["parent"]) == ("tiny-ft", "1.0.0+ft1", "tiny")
    assert card["training"]["parent"] == {"name": "tiny", "version": "1.0.0", "sha256": parent["sha256"]}
    assert card["metrics"]["holdout_dice_before"] == pytest.approx(result.dice_before, abs=1e-4)
    assert card["metrics"]["holdout_dice_after"] == pytest.approx(result.dice_after, abs=1e-4)
    corrections = card["training"]["corrections"]
    assert corrections["slices"] + corrections["holdout_slices"] == 12 and corrections["holdout_slices"] == 3
    assert not set(corrections["cases"]) & set(corrections["holdout_cases"])
    assert card["training"]["config"]["freeze_general"] is True
    assert card["training"]["command"].startswith("relsegcore.finetune.finetune(")
    assert load_model(result.path, torch.device("cpu")).card.sha256 == card["sha256"]  # checksum verified


def test_general_encoder_stays_frozen(tmp_path, untrained):
    images, masks = squares()
    result = ft.finetune(untrained, images, masks, out=tmp_path / "f.pt", **{**FAST, "iterations": 5})
    before = load_model(untrained, torch.device("cpu")).network.state_dict()
    after = load_model(result.path, torch.device("cpu")).network.state_dict()
    general = [k for k in before if k.startswith("general_encoder.")]
    target = [k for k in before if k.startswith("target_encoder.")]
    assert general and all(torch.equal(before[k], after[k]) for k in general)
    assert any(not torch.equal(before[k], after[k]) for k in target)


@pytest.mark.parametrize("trainable", ["decoder", "norm"])
def test_only_the_chosen_layers_learn(tmp_path, untrained, trainable):
    images, masks = squares()
    result = ft.finetune(untrained, images, masks, out=tmp_path / "f.pt", trainable=trainable,
                         **{**FAST, "iterations": 5})
    before = load_model(untrained, torch.device("cpu")).network
    after = load_model(result.path, torch.device("cpu")).network.state_dict()
    norms = {name for name, module in before.named_modules() if isinstance(module, torch.nn.InstanceNorm2d)}
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    assert changed
    if trainable == "decoder":
        assert all(k.startswith(("decoder.", "head.")) for k in changed)
    else:
        assert all(k.rsplit(".", 1)[0] in norms for k in changed)
    with pytest.raises(ValueError, match="trainable must be one of"):
        training.limit_trainable(before, "encoder")


def test_replayed_slices_are_drawn_as_unedited_ones(tmp_path, untrained, monkeypatch):
    images, masks = squares(4)
    replay_images, replay_masks = squares(4, seed=3)
    replay_images[:, 0, 0] = 255  # the corner pixel marks a replayed slice
    images[:, 0, 0] = 0
    weights = []
    real_train = ft.train

    def recording_train(config, train_images, train_masks, **kwargs):
        weights.append((train_images[:, 0, 0].copy(), kwargs["sample_weights"]))
        return real_train(config, train_images, train_masks, **kwargs)

    monkeypatch.setattr(ft, "train", recording_train)
    result = ft.finetune(untrained, images, masks, out=tmp_path / "r.pt", replay=(replay_images, replay_masks),
                         holdout_images=images[:1], holdout_masks=masks[:1], **{**FAST, "iterations": 2})
    corners, drawn_weights = weights[0]
    assert corners.tolist() == [0] * 4 + [255] * 4
    assert drawn_weights.tolist() == [ft.EDITED_WEIGHT] * 4 + [1.0] * 4
    assert len(result.card.training["image_fingerprints"]) >= 4  # the corrections, not the replayed slices...
    assert not set(ft.picture_fingerprint(image) for image in replay_images) & set(
        result.card.training["image_fingerprints"])  # ...which are the parent's own


def test_the_guard_refuses_a_worse_model_and_keeps_the_default(tmp_path, trained):
    home = tmp_path / "home"
    registry = ModelRegistry(home)
    registry.register(trained, make_default=True)
    images, masks = squares(12, seed=2)
    wrong = 1 - masks  # deliberately wrong corrections: everything but the squares
    held_images, held_masks = squares(6, seed=3)
    result = ft.finetune("tiny", images, wrong, out=None, holdout_images=held_images, holdout_masks=held_masks,
                         registry_home=home, make_default=True, **FAST)

    assert not result.accepted and result.dice_after < result.dice_before
    assert registry.default() == "tiny" and not result.is_default
    assert f"{result.dice_before:.3f}" in result.message and f"{result.dice_after:.3f}" in result.message
    assert "NOT" in result.message and "WORSE" in result.message
    entry = registry.entry(result.card.name)  # written and registered all the same, with the verdict
    assert (entry.name, entry.version, entry.parent, entry.origin) == ("tiny-ft1", "1.0.0+ft1", "tiny", "local")
    assert entry.metrics["accepted"] is False and "WORSE" in entry.description


def test_an_accepted_version_becomes_default_only_when_asked(tmp_path, untrained):
    home = tmp_path / "home"
    ModelRegistry(home).register(untrained, make_default=True)
    images, masks = squares()
    kept = ft.finetune("tiny", images, masks, registry_home=home, **FAST)
    assert kept.accepted and not kept.is_default and ModelRegistry(home).default() == "tiny"
    promoted = ft.finetune(kept.card.name, images, masks, registry_home=home, make_default=True,
                           **{**FAST, "iterations": 10})
    assert promoted.is_default and ModelRegistry(home).default() == "tiny-ft2"
    assert promoted.card.version == "1.0.0+ft2" and promoted.card.parent == "tiny-ft1"
    assert ModelRegistry(home).rollback() == "tiny"


def test_edited_slices_are_drawn_more_often_and_unedited_ones_replayed(tmp_path, untrained, monkeypatch):
    images, masks = squares(8)
    images[:, 0, 0] = np.arange(8) * 30  # the corner pixel names the slice in each batch
    edited = np.zeros(8, bool)
    edited[[1, 5]] = True
    drawn: list[int] = []
    real_augment = training.augment_batch

    def recording_augment(batch_images, batch_masks, **kwargs):
        drawn.extend(int(v) for v in torch.round(batch_images[:, 0, 0, 0] * 255 / 30))
        return real_augment(batch_images, batch_masks, **kwargs)

    monkeypatch.setattr(training, "augment_batch", recording_augment)
    held_images, held_masks = squares(2, seed=5)
    ft.finetune(untrained, images, masks, edited, tmp_path / "e.pt", holdout_images=held_images,
                holdout_masks=held_masks, **{**FAST, "iterations": 40})

    counts = np.bincount(drawn, minlength=8)
    assert counts.sum() == 40 * 4
    assert counts[[1, 5]].sum() / counts.sum() > 0.38  # 2 edited of 8 at weight 3: expected 0.5 (0.25 unweighted)
    assert (counts[~edited] > 0).all()  # every unedited slice is replayed
    assert ft.sample_weights(edited).tolist() == [1, 3, 1, 1, 1, 3, 1, 1]


def test_holdout_split_keeps_whole_cases_apart_and_is_deterministic():
    cases = ["a", "a", "b", "b", "b", "c", "d", "d"]
    train_idx, held_idx = ft.holdout_split(cases, 0.25, seed=0)
    assert sorted([*train_idx, *held_idx]) == list(range(8))
    assert not {cases[i] for i in train_idx} & {cases[i] for i in held_idx}
    assert len({cases[i] for i in held_idx}) == 1
    again = ft.holdout_split(cases, 0.25, seed=0)
    assert np.array_equal(again[1], held_idx)
    with pytest.raises(InputError, match="at least 2 cases"):
        ft.holdout_split(["only", "only"])


def test_versions_and_registry_names():
    assert ft.child_version("1.0.0") == "1.0.0+ft1"
    assert ft.child_version("1.0.0+ft1") == "1.0.0+ft2"
    card = ModelCard(name="covid-infection-2d-ft1", version="1.0.0+ft1", description="", file="", sha256="",
                     architecture={}, classes=["background", "infection"])
    assert ft.registry_name(card, {"covid-infection-2d-ft2"}) == ("covid-infection-2d-ft3", "1.0.0+ft3")


def demo_case(seed: int) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A small synthetic chest CT in HU; the correction adds the lesions to an empty prediction."""
    case = make_demo_ct(seed, shape=(12, 64, 64), spacing=(6.0, 6.0, 25.0))
    corrected = sitk.Cast(case.infection > 0, sitk.sitkUInt8)
    original = sitk.Image(case.image.GetSize(), sitk.sitkUInt8)
    original.CopyInformation(case.image)
    return case.image, corrected, original


def test_finetune_from_a_correction_store_with_two_cases(tmp_path, untrained):
    store = CorrectionStore(tmp_path / "store")
    records = [store.save(f"case-{seed}", *demo_case(seed), {"name": "tiny"}) for seed in (0, 1)]
    data = ft.slices_from_store(store.root, {"input_size": SIZE})

    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (SIZE, SIZE)
    assert set(data.cases) == {"case-0", "case-1"}
    for record in records:
        rows = [i for i, c in enumerate(data.cases) if c == record.case_id]
        assert 0 < len(rows) < 12  # only slices with lung, as the pipeline predicts them
        assert data.edited[rows].sum() == len(record.edited_slices)  # every edited slice has lung
        assert all(data.masks[i].any() for i in rows if data.edited[i])
    result = ft.finetune(untrained, data.images, data.masks, data.edited, tmp_path / "s.pt", cases=data.cases,
                         source=data.source, **{**FAST, "iterations": 5})
    corrections = result.card.training["corrections"]
    assert len(corrections["cases"]) == 1 and len(corrections["holdout_cases"]) == 1  # split by case
    assert corrections["source"] == str(store.root)


def test_store_of_windowed_slices_is_used_as_is(tmp_path):
    images, masks = squares(3, size=48)
    ct = sitk.GetImageFromArray(images)
    corrected = sitk.GetImageFromArray(masks)
    corrected.CopyInformation(ct)
    original = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    original.CopyInformation(ct)
    CorrectionStore(tmp_path / "store").save("slices", ct, corrected, original, {"name": "tiny"})
    data = ft.slices_from_store(tmp_path / "store", {"input_size": 48})
    assert np.array_equal(data.images, images) and np.array_equal(data.masks, masks)
    assert data.edited.all()
    with pytest.raises(InputError, match="does not exist"):
        ft.slices_from_store(tmp_path / "absent", {"input_size": 48})

    clahe = ft.slices_from_store(tmp_path / "store", intensity.preprocessing_for(intensity.FULL_SLICE_CLAHE, 64))
    assert clahe.images.shape == (3, 64, 64)  # 8-bit slices of a full-slice model: only resized


def test_store_slices_of_a_full_slice_model_are_its_input_as_segment_renders_it(tmp_path):
    """The default 2.x models see whole CLAHE slices: the radiologist's corrections must train them on
    exactly that input, not on the 1.x lung-window crops."""
    from relsegcore import imageio, pipeline

    store = CorrectionStore(tmp_path / "store")
    store.save("case-0", *demo_case(0), {"name": "covid-infection-2d"})
    preprocessing = intensity.preprocessing_for(intensity.FULL_SLICE_CLAHE, 256)
    data = ft.slices_from_store(store.root, preprocessing)
    hu = sitk.GetArrayFromImage(imageio.to_canonical(demo_case(0)[0]))
    with_lung = np.flatnonzero(pipeline.segment_lungs_array(hu, demo_case(0)[0].GetSpacing()).any(axis=(1, 2)))
    assert len(data) == len(with_lung)
    for image, z in zip(data.images, with_lung, strict=True):
        assert np.array_equal(image, intensity.model_input(hu[z], None, preprocessing)[0])
    assert data.masks.shape[1:] == (256, 256) and data.masks[data.edited].any()


def write_folder(root: Path, images: np.ndarray, masks: np.ndarray) -> tuple[Path, Path]:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"{i}.jpg", quality=95)
        Image.fromarray(mask * 255).save(root / "masks" / f"{i}.png")
    return root / "images", root / "masks"


def test_cli_writes_the_model_and_reports_dice(tmp_path, untrained, capsys):
    images_dir, masks_dir = write_folder(tmp_path / "data", *squares(8))
    out = tmp_path / "models" / "tiny-site.pt"
    code = main(["finetune", "--model", str(untrained), "--images", str(images_dir), "--masks", str(masks_dir),
                 "--out", str(out), "--iterations", "20", "--batch-size", "4", "--lr", "0.01", "--device", "cpu",
                 "--progress", "none"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    card = json.loads(out.with_suffix(".json").read_text())
    assert "Dice on held-out slices: before" in printed[-2] and card["name"] in printed[-1]
    assert card["training"]["command"].startswith("relseg finetune --model ")
    assert f"--out {out}" in card["training"]["command"]
    assert card["training"]["corrections"]["slices"] == 6


TORCHRUN_SCRIPT = """
import json, sys
import torch.distributed as dist
from relsegcore.cli import main
from relsegcore.finetune import finetune, slices_from_folder

model, images, masks, home, out = sys.argv[1:]
assert main(["finetune", "--model", model, "--images", images, "--masks", masks, "--iterations", "6",
             "--batch-size", "2", "--lr", "0.01", "--device", "cpu", "--progress", "none"]) == 0
data = slices_from_folder(images, masks, 32, False)
result = finetune(model, data.images, data.masks, out=out, iterations=4, batch_size=2, device="cpu")
with open(f"{home}/rank{dist.get_rank()}.json", "w") as handle:
    json.dump([str(result.path), result.dice_before, result.dice_after, result.card.sha256], handle)
"""


def test_under_torchrun_every_rank_trains_and_rank_0_alone_writes_and_speaks(tmp_path, untrained,
                                                                            two_gloo_processes):
    """Sites with several GPUs fine-tune with ``torchrun --nproc_per_node N -m relsegcore.cli finetune``: a real
    two-process gloo run. The ranks train one model together (DDP); one version is registered, its lines printed
    once, and the API returns rank 0's result on both ranks."""
    images_dir, masks_dir = write_folder(tmp_path / "data", *squares(8))
    home, out = tmp_path / "home", tmp_path / "out" / "site.pt"
    home.mkdir()
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    run = two_gloo_processes(script, str(untrained), str(images_dir), str(masks_dir), str(home), str(out),
                             env={"RELSEG_HOME": str(home)})
    assert run.stdout.count("fine-tuning tiny 1.0.0 on") == 1 and run.stdout.count("model written:") == 1
    assert sorted(path.name for path in (home / "models").iterdir()) == ["tiny-ft1.json", "tiny-ft1.pt"]
    rank0, rank1 = (json.loads((home / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0 == rank1 and rank0[0] == str(out) and out.is_file()
    assert load_model(out, torch.device("cpu")).card.sha256 == rank0[3]


def test_cli_registers_by_default_and_rejects_bad_arguments(tmp_path, untrained, monkeypatch, capsys):
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    images_dir, masks_dir = write_folder(tmp_path / "data", *squares(4))
    assert main(["finetune", "--model", str(untrained), "--images", str(images_dir), "--masks", str(masks_dir),
                 "--iterations", "2", "--device", "cpu", "--progress", "lines"]) == 0
    output = capsys.readouterr().out
    assert "PROGRESS 1.0000" in output
    assert (tmp_path / "home" / "models" / "tiny-ft1.pt").is_file()
    assert ModelRegistry().default() != "tiny-ft1"

    assert main(["finetune", "--model", str(untrained), "--images", str(images_dir), "--device", "cpu"]) == 2
    assert "--images and --masks together" in capsys.readouterr().err
    assert main(["finetune", "--model", str(untrained), "--store", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_from_a_store_as_the_slicer_module_runs_it(tmp_path, untrained, monkeypatch, capsys):
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    store = CorrectionStore(tmp_path / "store")
    for seed in (0, 1):
        images, masks = squares(3, seed=seed)
        ct, corrected = sitk.GetImageFromArray(images), sitk.GetImageFromArray(masks)
        corrected.CopyInformation(ct)
        original = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        original.CopyInformation(ct)
        store.save(f"case-{seed}", ct, corrected, original, {"name": "tiny"})
    code = main(["finetune", "--model", str(untrained), "--corrections", str(store.root), "--device", "cpu",
                 "--progress", "lines", "--iterations", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("PROGRESS ")]
    assert code == 0 and "held-out Dice" in lines[-1]  # the Slicer module shows the last line
    assert "6 slices (6 edited) from 2 case(s)" in lines[0]
    card = ModelRegistry().card("tiny-ft1")
    assert card.training["corrections"]["holdout_cases"] in (["case-0"], ["case-1"])
    assert card.training["command"].startswith("relseg finetune --model ") and "--store" in card.training["command"]


def test_a_parents_threshold_decides_the_guard_scores_and_passes_to_the_child(tmp_path, untrained):
    """The guard scores parent and child as the pipeline will run them: at the parent card's threshold, which
    the fine-tuned card keeps (fine-tuning starts from the parent's calibration)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    shutil.copy(untrained, parent / untrained.name)
    card = json.loads(untrained.with_suffix(".json").read_text())
    card["postprocessing"] = {"threshold": 0.999}
    (parent / untrained.with_suffix(".json").name).write_text(json.dumps(card))
    images, masks = squares()
    result = ft.finetune(parent / untrained.name, images, masks, None, tmp_path / "out" / "tiny-ft.pt", **FAST)
    child = json.loads(result.path.with_suffix(".json").read_text())
    assert child["postprocessing"] == {"threshold": 0.999}
    # at 0.999 the untrained parent calls nothing infection: the Dice of an empty prediction (at the argmax it
    # finds part of the squares: test_finetuning_lowers_the_loss_and_writes_a_card_with_its_parent)
    assert result.dice_before == 0.0
    assert child["metrics"]["holdout_dice_before"] == 0.0


def test_a_parent_that_flips_is_guarded_with_the_mirror_as_the_pipeline_runs_it(tmp_path, untrained, monkeypatch):
    """A card with flip_tta segments every slice averaged with its mirror, so the guard scores parent and child so."""
    parent = tmp_path / "parent"
    parent.mkdir()
    shutil.copy(untrained, parent / untrained.name)
    card = json.loads(untrained.with_suffix(".json").read_text())
    card["postprocessing"] = {"flip_tta": True, "threshold": 0.3}
    (parent / untrained.with_suffix(".json").name).write_text(json.dumps(card))
    scored = []
    real = ft.predict_labels
    monkeypatch.setattr(ft, "predict_labels", lambda *args, **kwargs: scored.append(kwargs) or real(*args, **kwargs))
    images, masks = squares()
    ft.finetune(parent / untrained.name, images, masks, None, tmp_path / "out" / "tiny-ft.pt", **FAST)
    assert scored == [{"threshold": 0.3, "flip": True}] * 2  # before and after


def test_predict_labels_with_flip_decides_on_the_probability_averaged_with_the_mirror():
    torch.manual_seed(0)
    network = DualEncoderUNet(TINY).eval()
    images = torch.from_numpy(squares(4, SIZE)[0]).unsqueeze(1)
    x = images.float() / 255.0
    with torch.no_grad():
        mirrored = torch.flip(torch.softmax(network(torch.flip(x, dims=(-1,))), dim=1), dims=(-1,))
        expected = (0.5 * (torch.softmax(network(x), dim=1) + mirrored))[:, 1] > 0.5
        plain = torch.softmax(network(x), dim=1)[:, 1] > 0.5
    flipped = training.predict_labels(network, images, flip=True).bool()
    assert torch.equal(flipped, expected)
    assert not torch.equal(flipped, plain)  # the mirror changes labels of this untrained network
