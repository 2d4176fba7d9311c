"""Batched augmentation: identity at strength 0, exact flips, labels kept, determinism, 3D, throughput."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from relsegcore.data.augment import AugmentParams, apply_augmentation, augment_batch, sample_params
from relsegcore.errors import InputError


def _square_batch(batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(batch, 1, size, size)
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    images[:, 0, 4:12, 2:10] = 0.8
    masks[:, 4:12, 2:10] = 2
    return images, masks


def test_strength_zero_is_identity_and_identity_params_change_nothing() -> None:
    images, masks = _square_batch()
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(1), strength=0.0)
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)
    warped_images, warped_masks = apply_augmentation(images, masks, AugmentParams.identity(len(images)))
    assert torch.allclose(warped_images, images, atol=1e-5) and torch.equal(warped_masks, masks)


@pytest.mark.parametrize(("field", "axis"), [("flip", -1), ("vertical_flip", -2)])
def test_a_flipped_square_is_the_mirrored_square(field: str, axis: int) -> None:
    """Left/right (``flip``) mirrors the columns, upside down (``vertical_flip``) the rows; only the chosen sample."""
    images, masks = _square_batch()
    params = dataclasses.replace(AugmentParams.identity(2), **{field: torch.tensor([True, False])})
    out_images, out_masks = apply_augmentation(images, masks, params)
    assert torch.equal(out_masks[0], masks[0].flip(axis)) and torch.equal(out_masks[1], masks[1])
    assert torch.allclose(out_images[0], images[0].flip(axis), atol=1e-5)


def test_a_squeezed_grey_range_maps_black_and_white_onto_its_ends() -> None:
    images, masks = _square_batch()
    images[:, 0, 20:, 20:] = 1.0
    params = dataclasses.replace(AugmentParams.identity(2), range_low=torch.tensor([0.15, 0.0]),
                                 range_high=torch.tensor([0.75, 1.0]))
    out_images, out_masks = apply_augmentation(images, masks, params)
    assert torch.equal(out_masks, masks)
    assert out_images[0, 0, 0, 0] == pytest.approx(0.15, abs=1e-5)  # black
    assert out_images[0, 0, 30, 30] == pytest.approx(0.75, abs=1e-5)  # white
    assert out_images[0, 0, 5, 5] == pytest.approx(0.15 + 0.8 * 0.6, abs=1e-5)
    assert torch.allclose(out_images[1], images[1], atol=1e-5)


def test_series_variation_is_drawn_after_the_base_parameters_and_only_when_asked() -> None:
    base = sample_params(4000, torch.Generator().manual_seed(0))
    series = sample_params(4000, torch.Generator().manual_seed(0), series=True)
    assert torch.equal(base.angle, series.angle) and base.noise_seed == series.noise_seed  # old recipes unchanged
    assert base.vertical_flip is None and base.range_low is None
    assert 0.45 < series.vertical_flip.float().mean() < 0.55
    squeezed = series.range_high < 1
    assert 0.45 < squeezed.float().mean() < 0.55 and torch.equal(squeezed, series.range_low > 0)
    assert series.range_low.max() <= 0.2 and series.range_high.min() >= 0.7


def test_rotation_by_90_degrees_turns_the_square_with_its_mask() -> None:
    images, masks = _square_batch(1)
    params = dataclasses.replace(AugmentParams.identity(1), angle=torch.tensor([math.pi / 2]))
    out_images, out_masks = apply_augmentation(images, masks, params)
    assert torch.equal(out_masks[0], torch.rot90(masks[0], k=-1, dims=(0, 1))) or torch.equal(
        out_masks[0], torch.rot90(masks[0], k=1, dims=(0, 1)))
    assert torch.equal(out_images[0, 0] > 0.4, out_masks[0] > 0)


def test_random_augmentation_keeps_labels_range_and_pairs_image_with_mask() -> None:
    images, masks = _square_batch(8, 64)
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(3), strength=1.0)
    assert out_images.shape == images.shape and out_masks.dtype == torch.long
    assert set(out_masks.unique().tolist()) <= {0, 2}
    assert 0.0 <= out_images.min() and out_images.max() <= 1.0
    assert not torch.equal(out_masks, masks)  # something moved
    for image, mask in zip(out_images, out_masks, strict=True):  # the square still lies under its label
        if mask.any():
            assert image[0][mask > 0].mean() > image[0][mask == 0].mean() + 0.3


def test_same_generator_seed_gives_the_same_batch() -> None:
    images, masks = _square_batch(4, 48)
    first = augment_batch(images, masks, torch.Generator().manual_seed(7))
    second = augment_batch(images, masks, torch.Generator().manual_seed(7))
    third = augment_batch(images, masks, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])


def test_parameter_ranges_scale_with_strength() -> None:
    params = sample_params(2000, torch.Generator().manual_seed(0), strength=1.0)
    assert params.angle.abs().max() <= math.radians(15) + 1e-6
    assert 0.85 - 1e-6 <= params.scale.min() and params.scale.max() <= 1.15 + 1e-6
    assert 0.4 < params.flip.float().mean() < 0.6
    half = sample_params(2000, torch.Generator().manual_seed(0), strength=0.5)
    assert half.angle.abs().max() <= math.radians(7.5) + 1e-6


def test_3d_batches_are_warped_in_plane_alike_for_every_slice() -> None:
    images, masks = _square_batch(2, 32)
    volume_images = images[:, :, None].repeat(1, 1, 5, 1, 1)
    volume_masks = masks[:, None].repeat(1, 5, 1, 1)
    params = dataclasses.replace(AugmentParams.identity(2), flip=torch.tensor([True, False]),
                                 noise_sigma=torch.zeros(2))
    out_images, out_masks = apply_augmentation(volume_images, volume_masks, params)
    assert out_images.shape == volume_images.shape and out_masks.shape == volume_masks.shape
    for depth in range(5):
        assert torch.equal(out_masks[0, depth], masks[0].flip(-1)) and torch.equal(out_masks[1, depth], masks[1])
    random_images, random_masks = augment_batch(volume_images, volume_masks, torch.Generator().manual_seed(2))
    assert all(torch.equal(random_masks[:, 0], random_masks[:, d]) for d in range(5))


def test_shapes_are_checked() -> None:
    with pytest.raises(InputError, match="augment_batch needs"):
        augment_batch(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))


def test_throughput_on_cpu_is_reported() -> None:
    images = torch.rand(16, 1, 256, 256)
    masks = (torch.rand(16, 256, 256) > 0.9).long()
    generator = torch.Generator().manual_seed(0)
    augment_batch(images, masks, generator)
    start = time.perf_counter()
    for _ in range(3):
        augment_batch(images, masks, generator)
    per_second = 3 / (time.perf_counter() - start)
    print(f"augment_batch: {per_second:.1f} batches of 16x256x256 per second on CPU "
          f"({torch.get_num_threads()} threads)")
    assert per_second > 0
