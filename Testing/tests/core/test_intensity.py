"""HU -> model input: window, lung box, resize, paste back; the window checked against the real JPGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.stats import wasserstein_distance
from skimage.filters import threshold_otsu

from relsegcore.data.intensity import (
    DEFAULT_WINDOW,
    LUNG_WINDOW,
    lung_box,
    paste_back,
    resize_slices,
    to_model_input,
    window_hu,
)
from relsegcore.errors import InputError


def test_window_hu_maps_the_window_ends_to_0_and_255_and_clips() -> None:
    hu = np.array([-3000, -1250, -500, 250, 3000], np.int16)
    assert window_hu(hu, LUNG_WINDOW).tolist() == [0, 0, 128, 255, 255]
    assert window_hu(hu, None).tolist() == window_hu(hu, DEFAULT_WINDOW).tolist()
    with pytest.raises(InputError, match="high > low"):
        window_hu(hu, (100, 100))


def test_lung_box_encloses_both_lungs_with_the_margin_and_stays_inside() -> None:
    mask = np.zeros((100, 120), np.uint8)
    mask[20:60, 10:40] = 1
    mask[30:70, 70:110] = 2
    assert lung_box(mask, margin_fraction=0.0) == (slice(20, 70), slice(10, 110))
    assert lung_box(mask, margin_fraction=0.1) == (slice(15, 75), slice(0, 120))  # clipped at the edges
    volume = np.zeros((3, 100, 120), np.uint8)
    volume[0, 5:10, 50:60] = 1
    volume[2, 80:90, 20:30] = 2
    assert lung_box(volume, 0.0) == (slice(5, 90), slice(20, 60))  # union over slices
    with pytest.raises(InputError, match="empty"):
        lung_box(np.zeros((4, 4)))


def test_resize_slices_keeps_labels_with_nearest_and_the_dtype() -> None:
    labels = np.zeros((2, 40, 30), np.uint8)
    labels[:, 10:30, 5:15] = 2
    labels[1, 0:5, 0:5] = 1
    nearest = resize_slices(labels, 64, order=0)
    assert nearest.shape == (2, 64, 64) and nearest.dtype == np.uint8
    assert set(np.unique(nearest)) == {0, 1, 2}
    smooth = resize_slices(np.linspace(0, 255, 40 * 30).reshape(1, 40, 30).astype(np.uint8), (20, 15), order=1)
    assert smooth.shape == (1, 20, 15) and smooth.dtype == np.uint8
    assert smooth[0, 0, 0] < smooth[0, -1, -1]
    with pytest.raises(InputError):
        resize_slices(labels, 10, order=3)


def test_to_model_input_and_paste_back_round_trip_a_lesion() -> None:
    hu = np.full((200, 220), -850, np.int16)
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[40:160, 20:100] = 2
    lungs[40:160, 120:200] = 1
    lesion = np.zeros(hu.shape, np.float32)
    lesion[80:120, 40:80] = 1
    hu[lesion > 0] = -300
    image, box = to_model_input(hu, lungs, size=128, window=LUNG_WINDOW, margin_fraction=0.0)
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert box == (slice(40, 160), slice(20, 200))
    assert image.max() == window_hu(np.array([-300]), LUNG_WINDOW)[0]
    prediction = (image > 150).astype(np.float32)[None]
    pasted = paste_back(prediction, [box], hu.shape)
    assert pasted.shape == (1, 200, 220) and pasted[0, :40].max() == 0
    dice = 2 * ((pasted[0] > 0.5) & (lesion > 0)).sum() / ((pasted[0] > 0.5).sum() + lesion.sum())
    assert dice > 0.95


def test_paste_back_fills_each_class_outside_the_box() -> None:
    probabilities = np.zeros((1, 2, 8, 8), np.float32)
    probabilities[:, 1] = 1.0
    out = paste_back(probabilities, [(slice(2, 6), slice(0, 4))], (10, 10), fill=(1.0, 0.0))
    assert out.shape == (1, 2, 10, 10)
    assert out[0, 1, 2:6, 0:4].min() == 1.0 and out[0, 1, 0].max() == 0.0 and out[0, 0, 0].min() == 1.0
    with pytest.raises(InputError, match="one box per prediction"):
        paste_back(probabilities, [], (10, 10))


def test_8bit_slices_keep_their_grey_levels() -> None:
    image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    lungs = np.ones(image.shape, np.uint8)
    out, box = to_model_input(image, lungs, size=64, margin_fraction=0.0)
    assert box == (slice(0, 64), slice(0, 64))
    np.testing.assert_array_equal(out, image)


def _jpg_lung_pixels(image: np.ndarray) -> np.ndarray:
    smooth = ndimage.gaussian_filter(image.astype(float), 2)
    dark = smooth < threshold_otsu(smooth)
    labels, count = ndimage.label(dark)
    sizes = ndimage.sum(dark, labels, range(1, count + 1))
    lungs = ndimage.binary_fill_holes(np.isin(labels, np.argsort(sizes)[::-1][:2] + 1))
    return image[ndimage.binary_erosion(lungs, iterations=3)]


def test_default_window_matches_the_covid_semiseg_lungs_better_than_the_benchmark_window(shared_data) -> None:
    """The measurement behind DEFAULT_WINDOW, on a subset: lung grey levels of windowed HU vs the JPGs."""
    rng = np.random.default_rng(0)
    jpgs = sorted((shared_data / "covid-semiseg" / "train" / "images").glob("*.jpg"))[:20]
    jpg_lungs = rng.choice(np.concatenate([_jpg_lung_pixels(np.asarray(Image.open(p).convert("L"))) for p in jpgs]),
                           20000)
    hu_lungs = []
    for path in sorted((shared_data / "covid-hu-slices").glob("coronacases_001_*.npz")):
        with np.load(path) as data:
            hu_lungs.append(data["image"][ndimage.binary_erosion(data["lung_mask"] > 0, iterations=3)])
    hu_lungs = rng.choice(np.concatenate(hu_lungs), 20000)
    distance = {name: wasserstein_distance(window_hu(hu_lungs, window).astype(float), jpg_lungs)
                for name, window in (("default", DEFAULT_WINDOW), ("benchmark", LUNG_WINDOW))}
    assert distance["default"] < 0.7 * distance["benchmark"], distance


def test_real_hu_slice_becomes_a_lung_crop(shared_data) -> None:
    with np.load(shared_data / "covid-hu-slices" / "coronacases_001_slice110.npz") as data:
        hu, lungs = data["image"], data["lung_mask"]
    image, box = to_model_input(hu, lungs)
    assert image.shape == (256, 256)
    assert (box[0].stop - box[0].start) < 0.6 * hu.shape[0]  # cropped to the lungs, not the whole slice
    crop_lungs = resize_slices(lungs[box][None], 256, order=0)[0] > 0
    assert crop_lungs.mean() > 0.4 and np.median(image[crop_lungs]) < 80  # dark aerated lung fills the crop
