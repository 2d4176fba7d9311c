"""Batched augmentation on the training device: one affine warp plus intensity changes.

Everything runs on the tensors' device (the GPU when training there), so data loading
never starves the network. Random numbers come from ``generator`` only, so a seeded
generator gives the same batch every time.

Choices: flips are left/right only. Slices are in the canonical layout (anterior up), the
lungs are roughly mirror images and a mirrored chest is still a chest; an upside-down one
(vertical flip) never occurs at inference. Rotation +-15 deg, scale 0.85-1.15 and shifts of
up to 8 % of the size cover how differently the lung box can sit; the border is mirrored
(image and mask alike) so no black wedges appear. Intensity: gamma, contrast, brightness,
light blur and Gaussian noise, covering the window and scanner differences that a fixed
window cannot remove (the measured window fits the COVID-SemiSeg slices only on average).

``series=True`` adds what differs between the series of ``covid-ct-seg-2d`` and a 2D benchmark
prepared like it: every Radiopaedia series there is stored posterior-up (a vertical flip, half
the samples), and the recipe's min-max over each slice squeezes the grey range when a slice holds
outliers (a middle slice of coronacases_003: 99th percentile at 166 of 255, one of each other
series: 229-252), mimicked by mapping 0..1 onto a narrower ``low..high`` for half the samples.
Off by default: an HU volume fed by the pipeline is always upright and its outliers are clamped
before the min-max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import InputError

MAX_ROTATION_DEG = 15.0
MAX_SCALE_CHANGE = 0.15
MAX_SHIFT_FRACTION = 0.08
MAX_GAMMA_LOG = 0.3
MAX_CONTRAST_CHANGE = 0.2
MAX_BRIGHTNESS = 0.1
MAX_NOISE_SIGMA = 0.03
BLUR_PROBABILITY = 0.25
MAX_RANGE_FLOOR = 0.2  # series=True: the squeezed range starts at up to 0.2 ...
MIN_RANGE_CEILING = 0.7  # ... and ends at 0.7 or above


@dataclass
class AugmentParams:
    """Per-sample parameters, each a ``(B,)`` tensor (``shift`` ``(B, 2)``: x, y in [-1, 1] units)."""

    flip: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    gamma: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    blur: torch.Tensor
    noise_sigma: torch.Tensor
    noise_seed: int = 0
    vertical_flip: torch.Tensor | None = None  # (B,) bool; None: no sample flipped
    range_low: torch.Tensor | None = None  # (B,) grey range 0..1 mapped onto low..high; None: unchanged
    range_high: torch.Tensor | None = None

    @classmethod
    def identity(cls, batch: int) -> AugmentParams:
        zeros, ones = torch.zeros(batch), torch.ones(batch)
        return cls(torch.zeros(batch, dtype=torch.bool), zeros, ones, torch.zeros(batch, 2), ones, ones, zeros,
                   zeros, zeros)

    def to(self, device: torch.device) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                               else getattr(self, f.name) for f in fields(self)))

    def repeat_each(self, times: int) -> AugmentParams:
        """Every sample's parameters ``times`` times (the slices of a 3D sample share them)."""
        return AugmentParams(*(getattr(self, f.name).repeat_interleave(times, dim=0)
                               if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
                               for f in fields(self)))


def sample_params(batch: int, generator: torch.Generator | None = None, strength: float = 1.0,
                  series: bool = False, max_noise_sigma: float = MAX_NOISE_SIGMA) -> AugmentParams:
    """Random parameters; ``strength`` scales every range (0 = identity, 1 = the ranges above); ``series`` adds
    the vertical flip and the squeezed grey range (drawn after the others, so a seed gives the same base
    parameters either way); ``max_noise_sigma`` is the noise range's top (the same draws, scaled)."""
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=device) * 2 - 1

    def chance(probability: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device) < probability

    level = min(max(strength, 0.0), 1.0)
    params = AugmentParams(
        flip=chance(0.5 * level),
        angle=uniform(batch) * math.radians(MAX_ROTATION_DEG) * strength,
        scale=1 + uniform(batch) * MAX_SCALE_CHANGE * strength,
        shift=uniform(batch, 2) * 2 * MAX_SHIFT_FRACTION * strength,
        gamma=torch.exp(uniform(batch) * MAX_GAMMA_LOG * strength),
        contrast=1 + uniform(batch) * MAX_CONTRAST_CHANGE * strength,
        brightness=uniform(batch) * MAX_BRIGHTNESS * strength,
        blur=chance(BLUR_PROBABILITY * level) * (uniform(batch) + 1) / 2,
        noise_sigma=(uniform(batch) + 1) / 2 * max_noise_sigma * strength,
        noise_seed=int(torch.randint(0, 2**62, (1,), generator=generator, device=device)),
    )
    if series:
        squeezed = chance(0.5 * level)
        params.vertical_flip = chance(0.5 * level)
        params.range_low = torch.where(squeezed, (uniform(batch) + 1) / 2 * MAX_RANGE_FLOOR * strength, 0.0)
        params.range_high = torch.where(
            squeezed, 1 - (uniform(batch) + 1) / 2 * (1 - MIN_RANGE_CEILING) * strength, 1.0)
    return params


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0,
    series: bool = False, max_noise_sigma: float = MAX_NOISE_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of float ``images`` (B,1,H,W) or (B,1,D,H,W) in [0, 1] and long ``masks`` (B,H,W) /
    (B,D,H,W); 3D samples are warped in-plane, every slice of a sample alike. ``series``: see the module;
    ``max_noise_sigma``: see ``sample_params``."""
    if strength <= 0:
        return images, masks
    params = sample_params(len(images), generator, strength, series, max_noise_sigma)
    return apply_augmentation(images, masks, params)


def apply_augmentation(
    images: torch.Tensor, masks: torch.Tensor, params: AugmentParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` and ``masks`` warped and recoloured by ``params`` (one entry per sample)."""
    if images.ndim not in (4, 5) or images.shape[1] != 1 or tuple(masks.shape) != (images.shape[0], *images.shape[2:]):
        raise InputError(f"augment_batch needs images (B,1,[D,]H,W) and masks (B,[D,]H,W), got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    params = params.to(images.device)
    if images.ndim == 5:  # in-plane: each slice of a sample gets the sample's parameters
        batch, _, depth, height, width = images.shape
        flat_images, flat_masks = apply_augmentation(
            images.permute(0, 2, 1, 3, 4).reshape(batch * depth, 1, height, width),
            masks.reshape(batch * depth, height, width), params.repeat_each(depth))
        return (flat_images.reshape(batch, depth, 1, height, width).permute(0, 2, 1, 3, 4).contiguous(),
                flat_masks.reshape(batch, depth, height, width))
    warped_images, warped_masks = _warp(images.float(), masks, params)
    return _recolour(warped_images, params), warped_masks


def _warp(images: torch.Tensor, masks: torch.Tensor, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One affine grid for image and mask: bilinear for the image, nearest for the labels."""
    cos, sin = torch.cos(params.angle) / params.scale, torch.sin(params.angle) / params.scale
    mirror = 1.0 - 2.0 * params.flip.float()  # output x -> input -x: a left/right flip
    upside_down = 1.0 if params.vertical_flip is None else 1.0 - 2.0 * params.vertical_flip.float()
    theta = torch.stack([
        torch.stack([cos * mirror, -sin * upside_down, params.shift[:, 0]], dim=1),
        torch.stack([sin * mirror, cos * upside_down, params.shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    labels = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", padding_mode="reflection",
                           align_corners=False)
    return warped, labels[:, 0].round().to(masks.dtype)


def _recolour(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return values.to(images.dtype).view(-1, 1, 1, 1)

    images = images.clamp(0, 1)
    if params.range_low is not None and params.range_high is not None:
        low = per_sample(params.range_low)
        images = low + images * (per_sample(params.range_high) - low)
    images = images ** per_sample(params.gamma)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * per_sample(params.contrast) + mean + per_sample(params.brightness)
    blurred = torch.nonzero(params.blur > 0).flatten()
    if len(blurred):  # only the few samples drawn for blurring pay for it
        chosen = images[blurred]
        weight = params.blur[blurred].to(images.dtype).view(-1, 1, 1, 1)
        images = images.index_copy(0, blurred, chosen + weight * (_gaussian_blur(chosen) - chosen))
    noise_generator = torch.Generator(device=images.device)
    noise_generator.manual_seed(params.noise_seed)
    noise = torch.randn(images.shape, generator=noise_generator, device=images.device, dtype=images.dtype)
    return (images + per_sample(params.noise_sigma) * noise).clamp(0, 1)


def _gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """5-tap separable Gaussian as shifted sums (much faster than a one-channel conv2d on the CPU)."""
    taps = [math.exp(-(offset**2) / (2 * sigma**2)) for offset in range(-2, 3)]
    taps = [tap / sum(taps) for tap in taps]
    height, width = images.shape[-2:]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    rows = sum(tap * padded[..., :, i:i + width] for i, tap in enumerate(taps))
    return sum(tap * rows[..., i:i + height, :] for i, tap in enumerate(taps))
