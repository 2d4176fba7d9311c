"""CT noise: how much a CT carries, and CT-like noise to add to one.

Infection networks take CT noise for ground-glass. ``estimate_noise_hu`` gives 23-25 HU on the
``covid-hu-slices`` (the soft-kernel CTs the models learned from) and 3-29 HU on the 12 non-COVID
CTs of ``../shared/data``. White noise added to normal CTs (session 28, RelSegCore/EXPERIMENTS.md) made
2.4.0 paint LUNG1-026's lungs at 0.05 / 1.1 / 4.5 / 9.2 % as its noise reached 14 / 25 / 29 /
34 HU. 2.5.0 learned noisy normal lung as no infection (``relseg train --negative-noise``): on
LUNG1-001, 013 and 026 its opacity stays within 0.6 point of the clean CT's up to 110 HU of white
or sharp-kernel noise, but lung2 rises by 1.0 point at 40-60 HU and LUNG1-024 (29 HU as stored) by
0.9 point at 33 HU and 1.8 at 36 HU (session 29), hence ``NOISY_CT_HU``. 2.6.0 (session 34) first
rises by more than 1 point at the same place: LUNG1-024 +0.9 at 33 HU, +1.8 at 36 HU. ``relsegcore.segment``
reports the estimate and warns above it; ``add_ct_noise`` makes the noisy variants that
benchmarks and training use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

NOISY_CT_HU = 35.0  # above this the report warns: the default's opacity then rose by > 1 point (docstring)
SOFT_TISSUE_HU = (-50.0, 150.0)  # muscle, blood, organs: flat enough that what varies pixel to pixel is noise
NOISE_KINDS = ("white", "sharp")
PADDING_MAX_HU = -1024.0  # a CT's constant minimum at or below this is padding outside the scan field
_WHITE_GAIN = np.sqrt(8.0 / 9.0)  # std of x - mean3x3(x) for white noise of std 1
_MIN_TISSUE_PIXELS = 2000


def estimate_noise_hu(hu: np.ndarray, slices: int = 9) -> float | None:
    """Noise (HU, as the std of white noise that would give it) of a CT ``(Z, Y, X)`` or slice ``(Y, X)``.

    On up to ``slices`` slices evenly spread along z: the 3 x 3 high-pass (pixel minus its
    neighbourhood's mean) inside soft tissue (``SOFT_TISSUE_HU`` on a smoothed copy, away from
    edges), its robust std (1.4826 x median absolute deviation) over all those pixels. None when the
    slices hold too little soft tissue to say (an empty or synthetic image).
    """
    volume = np.asarray(hu)
    if volume.ndim == 2:
        volume = volume[None]
    picks = np.unique(np.linspace(0, len(volume) - 1, min(slices, len(volume))).round().astype(int))
    residuals = []
    for z in picks:  # a slice at a time: no float copy of the whole CT
        plane = volume[z].astype(np.float32)
        smooth = ndimage.gaussian_filter(plane, 2.0)
        tissue = (smooth >= SOFT_TISSUE_HU[0]) & (smooth <= SOFT_TISSUE_HU[1])
        tissue = ndimage.binary_erosion(tissue, iterations=3)
        high_pass = plane - ndimage.uniform_filter(plane, 3)
        residuals.append(high_pass[tissue])
    values = np.concatenate(residuals) if residuals else np.zeros(0, np.float32)
    if values.size < _MIN_TISSUE_PIXELS:
        return None
    return white_noise_std(values)


def white_noise_std(high_pass: np.ndarray) -> float:
    """The std of the white noise whose 3 x 3 high-pass (pixel minus its neighbourhood's mean) has these values:
    their robust std (1.4826 x median absolute deviation), scaled back through the high-pass."""
    mad = float(np.median(np.abs(high_pass - np.median(high_pass))))
    return 1.4826 * mad / _WHITE_GAIN


def noise_warning(noise_hu: float | None) -> str | None:
    """What a reader of the report must know about a noisy CT, or None."""
    if noise_hu is None or noise_hu <= NOISY_CT_HU:
        return None
    return (f"This CT is noisier ({noise_hu:.0f} HU) than {NOISY_CT_HU:.0f} HU, where the model starts to take noise "
            "for ground-glass (its COVID-19 training CTs: 23-25 HU): a sharp (lung) kernel, a low dose or a large "
            "patient? The opacity is likely overestimated; a soft-tissue kernel reconstruction of the same scan "
            "gives more reliable figures.")


def ct_noise(shape: Sequence[int], sigma_hu: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """float32 noise of std ``sigma_hu`` in each 2D plane of ``shape`` (the last two axes).

    ``white``: independent per pixel (a low dose on a soft kernel). ``sharp``: white noise minus its
    Gaussian blur (1 pixel), rescaled: the high-frequency noise of a sharp lung kernel.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, not {kind!r}")
    noise = rng.standard_normal(tuple(shape)).astype(np.float32)
    if kind == "sharp":
        blur_sigma = (0.0,) * (len(shape) - 2) + (1.0, 1.0)
        noise -= ndimage.gaussian_filter(noise, blur_sigma)
        noise /= max(float(noise.std()), 1e-6)
    return noise * np.float32(sigma_hu)


def add_ct_noise(hu: np.ndarray, sigma_hu: float, kind: str, seed: int = 0) -> np.ndarray:
    """float32 copy of ``hu`` with ``ct_noise`` added, except on the padding (voxels at the CT's minimum value
    when that is -1024 HU or below: the constant a scanner stores outside its scan field), noiseless on a real CT."""
    hu = np.asarray(hu, dtype=np.float32)
    noisy = hu + ct_noise(hu.shape, sigma_hu, kind, np.random.default_rng(seed))
    lowest = float(hu.min())
    padding = hu <= lowest if lowest <= PADDING_MAX_HU else np.zeros(hu.shape, bool)
    noisy[padding] = hu[padding]
    return noisy
