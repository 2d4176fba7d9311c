"""inference: batched 2D prediction, flip TTA, the GPU-memory policy, 3D sliding window."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from relsegcore import inference, zoo
from relsegcore.errors import Cancelled
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.progress import Progress


def save_tiny_model(directory: Path, dims: int = 2, num_classes: int = 2, input_size: int = 32,
                    name: str = "tiny-test-model", seed: int = 0, patch_size=(8, 16, 16)) -> Path:
    """A small randomly initialised model with its card, saved like a shipped one (weights path returned)."""
    torch.manual_seed(seed)
    network = DualEncoderUNet(NetworkConfig(dims=dims, num_classes=num_classes, base_channels=4, depth=3))
    classes = ["background", "infection"] if num_classes == 2 else ["background", "ground-glass", "consolidation"]
    preprocessing = {"input_size": input_size, "window": [-1250, 250]}
    if dims == 3:
        preprocessing["patch_size"] = list(patch_size)
    card = zoo.ModelCard(name=name, version="0.0.1", description="random weights, for tests", file="",
                         sha256="", architecture={}, classes=classes, preprocessing=preprocessing)
    return zoo.save_model(network, card, directory)


@pytest.fixture
def tiny_model(tmp_path: Path) -> zoo.LoadedModel:
    return zoo.load_model(save_tiny_model(tmp_path), torch.device("cpu"))


def random_images(count: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size), dtype=np.uint8)


def reference_probabilities(loaded: zoo.LoadedModel, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = loaded.network(torch.from_numpy(images).float().unsqueeze(1) / 255.0)
    return torch.softmax(logits, dim=1).numpy()


class FlakyGpuNetwork(torch.nn.Module):
    """Wraps a network; raises CUDA OOM like a small GPU would (large batches, or anything on 'meta')."""

    def __init__(self, network: torch.nn.Module, max_batch: int | None = None):
        super().__init__()
        self.network = network
        self.max_batch = max_batch
        self.calls: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.device.type, len(x)))
        if x.device.type == "meta" or (self.max_batch is not None and len(x) > self.max_batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)


def test_probabilities_match_a_plain_forward_and_do_not_depend_on_batch_size(tiny_model):
    images = random_images(7)
    expected = reference_probabilities(tiny_model, images)
    for batch_size in (1, 3, 16):
        probabilities = inference.predict_slices(tiny_model, images, batch_size=batch_size)
        assert probabilities.shape == (7, 2, 32, 32) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_flip_tta_averages_with_the_mirrored_prediction(tiny_model):
    images = random_images(4)
    plain = reference_probabilities(tiny_model, images)
    mirrored = reference_probabilities(tiny_model, images[..., ::-1].copy())[..., ::-1]
    with_tta = inference.predict_slices(tiny_model, images, tta=True)
    np.testing.assert_allclose(with_tta, 0.5 * (plain + mirrored), atol=1e-5)
    assert not np.allclose(with_tta, plain, atol=1e-3)  # the random network is not mirror-symmetric
    # Flip TTA makes the prediction commute with mirroring the input.
    flipped_input = inference.predict_slices(tiny_model, images[..., ::-1].copy(), tta=True)
    np.testing.assert_allclose(flipped_input[..., ::-1], with_tta, atol=1e-5)


def test_a_card_that_names_flip_tta_gets_it_without_asking(tiny_model):
    """``postprocessing.flip_tta``, chosen on the recipe's folds, applies to every prediction of that model."""
    images = random_images(3)
    with_tta = inference.predict_slices(tiny_model, images, tta=True)
    tiny_model.card.postprocessing["flip_tta"] = True
    np.testing.assert_allclose(inference.predict_slices(tiny_model, images), with_tta, atol=1e-6)


def test_a_card_with_upside_down_tta_averages_the_four_mirror_images(tiny_model):
    """``postprocessing.upside_down_tta`` (the lung model, trained on both orientations): the prediction is the
    mean of those on the slice as is, left-right mirrored, upside down and both, each turned back; it then
    commutes with turning the input upside down."""
    images = random_images(3)

    def turned_back(axes: tuple[int, ...]) -> np.ndarray:
        return np.flip(reference_probabilities(tiny_model, np.ascontiguousarray(np.flip(images, axes))), axes)

    four = np.mean([turned_back(axes) for axes in ((), (-1,), (-2,), (-2, -1))], axis=0)
    tiny_model.card.postprocessing.update(flip_tta=True, upside_down_tta=True)
    with_four = inference.predict_slices(tiny_model, images)
    np.testing.assert_allclose(with_four, four, atol=1e-5)
    assert not np.allclose(with_four, 0.5 * (turned_back(()) + turned_back((-1,))), atol=1e-3)
    upside_down_input = inference.predict_slices(tiny_model, np.ascontiguousarray(images[:, ::-1]))
    np.testing.assert_allclose(upside_down_input[:, :, ::-1], with_four, atol=1e-5)


def test_drop_small_components_keeps_each_slice_large_pieces_and_their_labels():
    labels = np.zeros((30, 30), np.uint8)
    labels[0:10, 0:10] = 1  # 100 px: the largest
    labels[0:10, 20:23] = 2  # 30 px, another label
    labels[25:27, 25:27] = 1  # 4 px: a stray island
    labels[20, 0] = labels[21, 1] = 1  # 2 px touching diagonally: one 8-connected component
    assert inference.drop_small_components(labels, 0.0) is labels
    kept = inference.drop_small_components(labels, 0.05)  # below 5 px goes
    assert kept.dtype == np.uint8
    np.testing.assert_array_equal(kept[:10], labels[:10])
    assert not kept[20:].any()
    kept = inference.drop_small_components(labels, 0.5)  # below 50 px goes
    assert kept.sum() == 100 and (kept[0:10, 0:10] == 1).all()
    assert inference.drop_small_components(np.zeros((5, 5), np.uint8), 0.5).sum() == 0


def _chest_slice(centre_x: float = 64.0) -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 128 rendered chest: dark air, a grey body (an ellipse around ``centre_x``) with two dark lungs in
    it; and the lungs' labels (1 left, 2 right)."""
    y, x = np.mgrid[:128, :128]
    image = np.full((128, 128), 10, np.uint8)
    image[((x - centre_x) / 50.0) ** 2 + ((y - 64) / 40.0) ** 2 <= 1] = 150
    labels = np.zeros((128, 128), np.uint8)
    for label, lung_x in ((1, centre_x + 22), (2, centre_x - 22)):
        lung = ((x - lung_x) / 14.0) ** 2 + ((y - 64) / 25.0) ** 2 <= 1
        image[lung], labels[lung] = 20, label
    return image, labels


def test_components_outside_the_body_are_dropped_and_the_lungs_kept():
    """Lung painted in the air beside the body (as fold models do on some slices) goes; the lungs stay, also
    where the body is cut by the image's edge (a small field of view: the hull, not the region, is the body)."""
    image, lungs = _chest_slice()
    assert inference.drop_outside_body(lungs, image) is lungs  # nothing outside: unchanged
    painted = lungs.copy()
    painted[2:20, 2:30] = 1  # air in a corner
    painted[100:128, 60:70] = 2  # air below the body, touching the image's edge
    kept = inference.drop_outside_body(painted, image)
    np.testing.assert_array_equal(kept, lungs)

    cut_image, cut_lungs = _chest_slice(centre_x=20.0)  # the body runs out of the image on the left
    assert cut_lungs[:, 0].any() and cut_image[:, 0].max() == 150  # lung and body both cut by the edge
    np.testing.assert_array_equal(inference.drop_outside_body(cut_lungs, cut_image), cut_lungs)
    # across the body's edge (x = 114 on these rows): mostly outside goes, mostly inside stays
    mostly_out, mostly_in = lungs.copy(), lungs.copy()
    mostly_out[60:68, 108:124] = 1  # 6 of 16 columns inside
    mostly_in[60:68, 104:118] = 1  # 10 of 14 columns inside
    np.testing.assert_array_equal(inference.drop_outside_body(mostly_out, image), lungs)
    np.testing.assert_array_equal(inference.drop_outside_body(mostly_in, image), mostly_in)
    flat = np.full((32, 32), 7, np.uint8)
    blob = np.zeros((32, 32), np.uint8)
    blob[5:9, 5:9] = 1
    assert inference.drop_outside_body(blob, flat) is blob  # no body to judge by: unchanged


@pytest.mark.parametrize("dropped", [False, True])
def test_a_cards_outside_body_dropped_is_followed_on_2d_slices(tmp_path, dropped):
    """A model painting every pixel paints one component, mostly air around the body: the card's
    ``outside_body_dropped`` takes it away in ``relseg evaluate``'s decision (``evaluation.predict_image``)."""
    from synthetic_slices import save_constant_model

    from relsegcore.evaluation import predict_image

    path = save_constant_model(tmp_path, True, postprocessing={"outside_body_dropped": dropped})
    loaded = zoo.load_model(zoo.find_model(path), torch.device("cpu"), "torch")
    image, _ = _chest_slice()
    labels = predict_image(loaded, image)
    assert loaded.card.outside_body_dropped is dropped
    assert labels.sum() == (0 if dropped else image.size)


@pytest.mark.parametrize("bad", [1.0, -0.1, "most"])
def test_a_component_fraction_outside_0_1_is_refused_when_the_card_is_read(tmp_path, bad):
    weights = save_tiny_model(tmp_path)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["postprocessing"] = {"min_component_fraction": bad}
    card_path.write_text(json.dumps(card))
    with pytest.raises(zoo.ModelError, match="min_component_fraction must lie in"):
        zoo.find_model(card_path)


def test_out_of_memory_halves_the_batch_and_keeps_the_result(tiny_model):
    images = random_images(10)
    expected = reference_probabilities(tiny_model, images)
    flaky = FlakyGpuNetwork(tiny_model.network, max_batch=3)
    tiny_model.network = flaky
    probabilities = inference.predict_slices(tiny_model, images, batch_size=16)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert [size for _, size in flaky.calls[:4]] == [10, 5, 2, 2]  # 16 > 10 slices, then halved to 5, then 2


def test_out_of_memory_at_batch_one_falls_back_to_the_cpu_with_a_message(tiny_model, caplog):
    images = random_images(3)
    expected = reference_probabilities(tiny_model, images)
    flaky = FlakyGpuNetwork(tiny_model.network)
    tiny_model.network = flaky
    tiny_model.device = torch.device("meta")  # stands in for a GPU that is always full
    with caplog.at_level(logging.WARNING, logger="relsegcore.inference"):
        probabilities = inference.predict_slices(tiny_model, images, batch_size=4)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert [call for call in flaky.calls if call[0] == "meta"] == [("meta", 3), ("meta", 1)]
    assert {size for device, size in flaky.calls if device == "cpu"} == {1}
    assert tiny_model.device.type == "cpu"
    assert "continuing on the CPU" in caplog.text


def test_errors_other_than_out_of_memory_are_not_swallowed(tiny_model):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    tiny_model.network = Broken()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        inference.predict_slices(tiny_model, random_images(2))


def test_progress_is_reported_per_batch_and_cancel_stops_between_batches(tiny_model):
    seen: list[float] = []
    progress = Progress(callback=lambda fraction, stage: seen.append(fraction))
    inference.predict_slices(tiny_model, random_images(10), batch_size=4, progress=progress, progress_span=(0.2, 0.6))
    assert seen == pytest.approx([0.2 + 0.4 * f for f in (0.4, 0.8, 1.0)])

    calls: list[int] = []
    cancelling = Progress(callback=lambda fraction, stage: calls.append(1), should_cancel=lambda: len(calls) >= 1)
    with pytest.raises(Cancelled):
        inference.predict_slices(tiny_model, random_images(10), batch_size=4, progress=cancelling)
    assert len(calls) == 1


def test_sliding_window_covers_the_volume_and_matches_a_single_patch(tmp_path):
    loaded = zoo.load_model(save_tiny_model(tmp_path, dims=3), torch.device("cpu"))
    volume = np.random.default_rng(2).random((8, 16, 16), dtype=np.float32)
    with torch.no_grad():
        expected = torch.softmax(loaded.network(torch.from_numpy(volume)[None, None]), dim=1)[0].numpy()
    np.testing.assert_allclose(inference.predict_volume(loaded, volume), expected, atol=1e-5)

    larger = np.random.default_rng(3).random((13, 30, 21), dtype=np.float32)  # not multiples of the patch
    probabilities = inference.predict_volume(loaded, larger, tta=True)
    assert probabilities.shape == (2, 13, 30, 21)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)

    small = np.random.default_rng(4).random((5, 10, 40), dtype=np.float32)  # smaller than the patch: padded
    assert inference.predict_volume(loaded, small).shape == (2, 5, 10, 40)


def test_gaussian_importance_peaks_in_the_centre_and_never_vanishes():
    weights = inference.gaussian_importance((8, 16, 16))
    assert weights.shape == (8, 16, 16)
    assert weights.max() == pytest.approx(1.0) and weights.min() > 0
    assert weights[4, 8, 8] > weights[0, 0, 0]
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])
