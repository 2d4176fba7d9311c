"""Learned lungs: a lung model's mask becomes left/right lungs, the pipeline says which method ran, and
lung and infection models cannot be mixed up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from synthetic_slices import make_ctseg_folder

from relsegcore import imageio, pipeline, zoo
from relsegcore.cli import main
from relsegcore.demo import make_demo_ct
from relsegcore.errors import ModelError
from relsegcore.lungs import LEFT_LUNG, RIGHT_LUNG, lungs_from_mask
from relsegcore.metrics import dice
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.registry import ModelRegistry


@pytest.fixture(scope="module")
def demo():
    return make_demo_ct(shape=(48, 128, 128), spacing=(2.6, 2.6, 6.0))


def _canonical(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(imageio.to_canonical(image))


def test_a_both_lungs_mask_becomes_left_and_right_without_airway_or_gas(demo) -> None:
    hu = _canonical(demo.image)
    known = _canonical(demo.lungs)
    spacing = imageio.to_canonical(demo.image).GetSpacing()
    mask = known > 0
    mask |= hu < -990  # a model that also paints the trachea, bronchi and the stomach gas as lung
    mask[:, :4, :] = False  # (not the air outside the body)
    mask[:, -4:, :] = False
    mask[:, :, :4] = False
    mask[:, :, -4:] = False
    labels = lungs_from_mask(mask, hu, spacing)
    for side in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(labels == side, known == side) > 0.97, side
    assert not (labels[hu < -990] > 0).mean() > 0.05  # gas and airway dropped


def _tiny_model(tmp_path, name: str, role: str) -> str:
    network = DualEncoderUNet(NetworkConfig(base_channels=4, depth=2, use_general_encoder=False))
    classes = ["background", "lung"] if role == "lungs" else ["background", "infection"]
    card = zoo.ModelCard(name=name, version="0.1", description="test", file="", sha256="", architecture={},
                         classes=classes, preprocessing={"recipe": "full-slice-clahe", "input_size": 32},
                         training={"role": role})
    return str(zoo.save_model(network, card, tmp_path))


def test_lung_model_labels_go_through_the_same_side_decisions(demo, tmp_path, monkeypatch) -> None:
    hu = _canonical(demo.image)
    known = _canonical(demo.lungs)
    spacing = imageio.to_canonical(demo.image).GetSpacing()
    lung_model = _tiny_model(tmp_path, "lungs-probe", "lungs")
    calls = []

    def known_mask(loaded, hu_volume, z_indices, lung_labels, tta=False, progress=None, span=(0.0, 1.0)):
        calls.append((loaded.card.name, len(z_indices), lung_labels is None))
        return (known > 0).astype(np.uint8), 1.5

    monkeypatch.setattr(pipeline, "slice_labels_2d", known_mask)
    labels, method, seconds = pipeline.lung_labels_for(hu, spacing, lung_model, "cpu")
    assert calls == [("lungs-probe", len(hu), True)]  # every slice, no crop: a full-slice model
    assert method == "lungs-probe 0.1, guided by the HU lungs" and seconds == 1.5
    assert dice(labels == LEFT_LUNG, known == LEFT_LUNG) > 0.97
    _, method, seconds = pipeline.lung_labels_for(hu, spacing, "hu", "cpu")
    assert method == "hu-threshold" and seconds == 0.0 and len(calls) == 1


def test_the_pipeline_drops_the_islands_a_lung_cards_component_fraction_names(demo, tmp_path, monkeypatch) -> None:
    """``slice_labels_2d`` decides each slice as ``relseg evaluate`` does: with the card's
    ``min_component_fraction`` a 4-pixel island beside two lungs is gone, without it it stays."""
    hu = _canonical(demo.image)[:2]
    foreground = np.zeros((32, 32), np.float32)
    foreground[4:28, 3:14] = foreground[4:28, 18:29] = 0.9  # two lungs at the model's input size
    foreground[29:31, 15:17] = 0.9  # a 4-pixel island (32 px at the CT's 128 x 128)

    def known_probabilities(loaded, images, batch_size=None, tta=False, progress=None, span=(0.0, 1.0)):
        return np.stack([np.stack([1.0 - foreground, foreground])] * len(images))

    monkeypatch.setattr(pipeline, "predict_slices", known_probabilities)
    island = (slice(None), slice(29 * 4, 31 * 4), slice(15 * 4, 17 * 4))
    for fraction, island_kept in [(0.0, True), (0.05, False)]:
        card_path = zoo.find_model(_tiny_model(tmp_path, "lungs-probe", "lungs")).path.with_suffix(".json")
        card = json.loads(card_path.read_text())
        card["postprocessing"] = {"min_component_fraction": fraction}
        card_path.write_text(json.dumps(card))
        loaded = zoo.load_model(card_path, torch.device("cpu"))
        labels, _ = pipeline.slice_labels_2d(loaded, hu, np.arange(len(hu)), None)
        assert labels[:, 20:100, 16:52].all()
        assert labels[island].any() == island_kept, fraction


def test_lung_and_infection_models_cannot_be_swapped(demo, tmp_path, monkeypatch) -> None:
    lung_model = _tiny_model(tmp_path, "lungs-probe", "lungs")
    infection_model = _tiny_model(tmp_path, "infection-probe", "infection")
    with pytest.raises(ModelError, match="lungs-probe is a lungs model"):
        pipeline.segment(demo.image, model=lung_model, device="cpu", lung_model="hu")
    with pytest.raises(ModelError, match="not a lung model"):
        pipeline.segment_lungs(demo.image, model=infection_model, device="cpu")
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    registry = ModelRegistry(tmp_path / "home")
    registry.register(lung_model)
    assert "lungs-probe" in {entry.name for entry in registry.list()}
    with pytest.raises(ModelError, match="not an infection model"):
        registry.use("lungs-probe")


def test_evaluate_ctseg2d_scores_lungs_upright_and_per_patient(tmp_path, capsys) -> None:
    root = make_ctseg_folder(tmp_path / "set")
    network = DualEncoderUNet(NetworkConfig(base_channels=4, depth=2, use_general_encoder=False))
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([0.0, 5.0]))  # lung everywhere
    card = zoo.ModelCard(name="everywhere", version="1", description="test", file="", sha256="", architecture={},
                         classes=["background", "lung"], preprocessing={"recipe": "full-slice-clahe",
                                                                        "input_size": 32},
                         training={"role": "lungs"})
    zoo.save_model(network, card, tmp_path)
    out = tmp_path / "lungs.json"
    assert main(["evaluate", "--model", str(tmp_path / "everywhere.pt"), "--data", f"ctseg2d:{root}",
                 "--target", "lungs", "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    expected = 2 * 24 * 24 / (24 * 24 + 32 * 32)  # the lung box against the whole slice
    assert result["mean_dice"] == pytest.approx(expected, abs=1e-4)
    assert result["transposed"] is False and result["target"] == "lungs"
    assert set(result["per_patient_dice"]) == {"coronacases_001", "coronacases_002", "radiopaedia_10",
                                               "radiopaedia_14"}
    assert "note" not in result
    assert "radiopaedia_10" in capsys.readouterr().out


def test_the_lung_model_sees_one_slice_in_2_5_mm_and_the_others_take_the_nearest() -> None:
    seen = pipeline.slices_every(10, 1.0, 2.5)
    assert seen.tolist() == [0, 2, 4, 6, 8, 9]  # the last slice always
    assert pipeline.nearest_of(seen, 10).tolist() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 9]
    assert pipeline.slices_every(5, 5.0, 2.5).tolist() == [0, 1, 2, 3, 4]  # thick slices: every one
    assert pipeline.nearest_of(np.array([0]), 3).tolist() == [0, 0, 0]


def test_the_hu_lungs_guide_drops_what_a_lung_model_paints_outside_them(demo) -> None:
    """Below the lungs a lung model may paint upper abdomen joined to a lung base only through other slices:
    in-plane components that barely touch the HU method's lungs go; the model's outline of components that
    do stays, where the HU lungs miss a rim."""
    hu = _canonical(demo.image)
    known = _canonical(demo.lungs)
    spacing = imageio.to_canonical(demo.image).GetSpacing()
    lung_slices = np.flatnonzero(known.any(axis=(1, 2)))
    z = int(lung_slices[len(lung_slices) // 3])
    rows, cols = np.nonzero(known[z])
    top, bottom = int(rows.min()), int(rows.max())
    blob = (slice(z - 3, z + 1), slice(bottom + 3, bottom + 20), slice(int(cols.min()), int(cols.max())))
    mask = known > 0
    mask[blob] = True  # soft tissue behind the lungs on slices z-3..z
    mask[z + 1, rows[rows.argmax()]:bottom + 20, int(cols[rows.argmax()])] = True  # joined to a lung on z+1
    guide = known > 0
    guide[z, top:top + 4, :] = False  # the HU lungs miss a rim the model keeps
    unguided = lungs_from_mask(mask, hu, spacing)
    assert unguided[blob].mean() > 0.9  # one 3D component with the lung: nothing else removes it
    labels = lungs_from_mask(mask, hu, spacing, guide=guide)
    assert not labels[blob].any()
    assert (labels[z] > 0).sum() == (known[z] > 0).sum()
