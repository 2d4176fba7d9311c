"""A synthetic chest CT with known lung and infection masks: the built-in demo input.

It is drawn from simple shapes (never clinical data, never to be read as such) so that
``relseg segment`` can run, and the lung segmenter can be tested, without any download.
It has what the pipeline must cope with: air outside the body, fat, muscle, bone, the
heart, a trachea and main bronchi (air that is not lung), stomach gas under the left
diaphragm, branching vessels, ground-glass lesions and consolidation against the pleura.

Anatomy is laid out in millimetres around the centre of the field of view, so a finer
grid (``shape``, ``spacing``) draws the same chest at a higher resolution.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

GROUND_GLASS = 1
CONSOLIDATION = 2
LEFT_LUNG = 1
RIGHT_LUNG = 2

DEFAULT_SHAPE = (80, 256, 256)  # (z, y, x)
DEFAULT_SPACING = (1.4, 1.4, 4.0)  # (x, y, z) mm: an adult chest in a small array

BODY_SEMI_AXES = (165.0, 115.0)  # x, y
FAT_MM, MUSCLE_MM = 12.0, 10.0
LUNG_CENTRE_X, LUNG_SEMI_AXES = 72.0, (52.0, 72.0)
LUNG_BASE_Z, DOME_HEIGHT, APEX_Z, APEX_START_Z = -110.0, 40.0, 120.0, 20.0
TRACHEA_Y, TRACHEA_RADIUS, CARINA_Z = -15.0, 9.0, 35.0
HU = {"air": -1000.0, "fat": -100.0, "muscle": 40.0, "tissue": 35.0, "liver": 60.0, "heart": 45.0,
      "bone": 700.0, "lung": -850.0, "vessel": 40.0}
NOISE_HU = 20.0


class DemoCase(NamedTuple):
    """The synthetic CT in HU and its ground truth, all on the same grid."""

    image: sitk.Image
    lungs: sitk.Image  # 1 left lung, 2 right lung (lesions included, airways excluded)
    infection: sitk.Image  # 1 ground-glass, 2 consolidation


def make_demo_ct(
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> DemoCase:
    """A deterministic synthetic chest CT (by ``seed``) with its lung and infection masks."""
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    hu = np.full(shape, HU["air"], np.float32)
    _draw_body(hu, grid)
    lungs = _lung_masks(grid)
    lung_any = lungs > 0
    hu[lung_any] = HU["lung"]
    infection = _draw_lesions(hu, grid, lungs, rng)
    _draw_vessels(hu, grid, lung_any, rng)
    airway = _airway_mask(grid)
    hu[airway] = HU["air"]
    wall = ndimage.binary_dilation(airway, iterations=max(1, int(round(2.0 / spacing[0]))))
    lungs[wall] = 0
    infection[wall] = 0
    hu = _scanner_blur_and_noise(hu, spacing, rng)
    return DemoCase(
        image=grid.to_image(np.clip(np.round(hu), -1024, 3071).astype(np.int16)),
        lungs=grid.to_image(lungs),
        infection=grid.to_image(infection),
    )


class _Grid:
    """Physical coordinates (mm, LPS, centred on the field of view) as broadcastable axes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        self.x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)[None, None, :]
        self.y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
        self.z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)[:, None, None]
        self.origin = (float(self.x.ravel()[0]), float(self.y.ravel()[0]), float(self.z.ravel()[0]))

    def to_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return image

    def ellipsoid(self, centre: tuple[float, float, float], semi_axes: tuple[float, float, float]) -> np.ndarray:
        """Boolean ellipsoid, computed only in its bounding box."""
        mask = np.zeros(self.shape, bool)
        box = self._box(centre, semi_axes)
        if box is None:
            return mask
        x, y, z = self.x[..., box[2]], self.y[:, box[1]], self.z[box[0]]
        mask[box] = (
            ((x - centre[0]) / semi_axes[0]) ** 2
            + ((y - centre[1]) / semi_axes[1]) ** 2
            + ((z - centre[2]) / semi_axes[2]) ** 2
        ) <= 1.0
        return mask

    def segment_tube(self, start: np.ndarray, end: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
        """Boolean tube from ``start`` to ``end`` whose radius tapers linearly."""
        mask = np.zeros(self.shape, bool)
        low = np.minimum(start, end) - max(radius)
        high = np.maximum(start, end) + max(radius)
        centre, half = (low + high) / 2, (high - low) / 2
        box = self._box(tuple(centre), tuple(half))
        if box is None:
            return mask
        x, y, z = self.x[..., box[2]], self.y[:, box[1]], self.z[box[0]]
        direction = end - start
        length_sq = float(direction @ direction) or 1.0
        t = ((x - start[0]) * direction[0] + (y - start[1]) * direction[1] + (z - start[2]) * direction[2])
        t = np.clip(t / length_sq, 0.0, 1.0)
        distance_sq = ((x - start[0] - t * direction[0]) ** 2 + (y - start[1] - t * direction[1]) ** 2
                       + (z - start[2] - t * direction[2]) ** 2)
        mask[box] = distance_sq <= (radius[0] + t * (radius[1] - radius[0])) ** 2
        return mask

    def _box(self, centre, half) -> tuple[slice, slice, slice] | None:
        bounds = []
        for axis, spacing_index in ((self.z, 2), (self.y, 1), (self.x, 0)):
            values = axis.ravel()
            c, h = centre[spacing_index], half[spacing_index] + self.spacing[spacing_index]
            lo = int(np.searchsorted(values, c - h))
            hi = int(np.searchsorted(values, c + h, side="right"))
            if hi <= lo:
                return None
            bounds.append(slice(lo, hi))
        return tuple(bounds)


def _ellipse_radius(grid: _Grid, centre_x: float, centre_y: float, semi_x: float, semi_y: float) -> np.ndarray:
    """Normalised in-plane elliptic radius, shape (1, y, x)."""
    return np.sqrt(((grid.x - centre_x) / semi_x) ** 2 + ((grid.y - centre_y) / semi_y) ** 2)


def _diaphragm_z(grid: _Grid, side_x: float) -> np.ndarray:
    """Height of the diaphragm dome under one lung, shape (1, y, x)."""
    r = _ellipse_radius(grid, side_x, 0.0, *LUNG_SEMI_AXES)
    return LUNG_BASE_Z + DOME_HEIGHT * np.clip(1.0 - r**2, 0.0, 1.0)


def _lung_masks(grid: _Grid) -> np.ndarray:
    """1 left (positive x in LPS), 2 right: domed bases, rounded apices, a cardiac notch."""
    taper = np.sqrt(np.clip(1.0 - ((grid.z - APEX_START_Z) / (APEX_Z - APEX_START_Z)) ** 2, 0.0, 1.0))
    scale = np.where(grid.z < APEX_START_Z, 1.0, taper)
    heart = _heart(grid)
    lungs = np.zeros(grid.shape, np.uint8)
    for label, side_x in ((LEFT_LUNG, LUNG_CENTRE_X), (RIGHT_LUNG, -LUNG_CENTRE_X)):
        inside = _ellipse_radius(grid, side_x, 0.0, *LUNG_SEMI_AXES) < scale
        inside &= grid.z > _diaphragm_z(grid, side_x)
        lungs[inside & ~heart] = label
    return lungs


def _heart(grid: _Grid) -> np.ndarray:
    """Sits on the diaphragm (its lower half lies in the abdomen), so no lung lies under it."""
    return grid.ellipsoid((15.0, -30.0, -85.0), (58.0, 50.0, 85.0))


def _draw_body(hu: np.ndarray, grid: _Grid) -> None:
    """Fat, muscle, mediastinal tissue, abdomen below the diaphragm, heart and bones."""
    a, b = BODY_SEMI_AXES
    for depth, value in ((0.0, "fat"), (FAT_MM, "muscle"), (FAT_MM + MUSCLE_MM, "tissue")):
        inside = _ellipse_radius(grid, 0.0, 0.0, a - depth, b - depth) <= 1.0
        hu[np.broadcast_to(inside, hu.shape)] = HU[value]
    inner = np.broadcast_to(_ellipse_radius(grid, 0.0, 0.0, a - FAT_MM - MUSCLE_MM, b - FAT_MM - MUSCLE_MM) <= 1.0,
                            hu.shape)
    liver = inner & (grid.z < _diaphragm_z(grid, -LUNG_CENTRE_X)) & (grid.x < 15.0)
    hu[liver] = HU["liver"]
    stomach = grid.ellipsoid((60.0, -20.0, -125.0), (45.0, 40.0, 30.0))
    hu[stomach & inner] = HU["tissue"]
    gas = grid.ellipsoid((60.0, -35.0, -128.0), (32.0, 22.0, 10.0)) & stomach
    hu[gas] = HU["air"]
    hu[_heart(grid)] = HU["heart"]
    hu[_bones(grid)] = HU["bone"]


def _bones(grid: _Grid) -> np.ndarray:
    """Spine, sternum and ribs (in the muscle layer, in bands along z)."""
    spine = np.broadcast_to(_ellipse_radius(grid, 0.0, 82.0, 20.0, 18.0) <= 1.0, grid.shape)
    sternum = np.broadcast_to(_ellipse_radius(grid, 0.0, -98.0, 16.0, 6.0) <= 1.0, grid.shape)
    a, b = BODY_SEMI_AXES
    ring = _ellipse_radius(grid, 0.0, 0.0, a - FAT_MM - 2.0, b - FAT_MM - 2.0)
    rib_ring = (ring <= 1.0) & (ring >= 0.94) & (np.abs(grid.x) > 25.0)
    rib_bands = (np.mod(grid.z, 28.0) < 9.0) & (grid.z > LUNG_BASE_Z - 20.0)
    return spine | sternum | (rib_ring & rib_bands)


def _airway_mask(grid: _Grid) -> np.ndarray:
    """Trachea from the top of the field down to the carina, then the two main bronchi."""
    top = float(grid.z.max()) + grid.spacing[2]
    carina = np.array([0.0, TRACHEA_Y, CARINA_Z])
    airway = grid.segment_tube(np.array([0.0, TRACHEA_Y, top]), carina, (TRACHEA_RADIUS, TRACHEA_RADIUS))
    for side in (1.0, -1.0):
        hilum = np.array([side * 42.0, TRACHEA_Y + 5.0, CARINA_Z - 25.0])
        airway |= grid.segment_tube(carina, hilum, (6.5, 5.0))
    return airway


def _draw_vessels(hu: np.ndarray, grid: _Grid, lung: np.ndarray, rng: np.random.Generator) -> None:
    """Branching, tapering vessels from each hilum, visible only inside the lungs."""
    vessels = np.zeros(grid.shape, bool)
    trunks = ((1.0, 0.0, 0.0), (0.6, 0.0, 0.8), (0.6, 0.0, -0.8), (0.5, 0.7, -0.3))
    for side in (1.0, -1.0):
        stack = [(np.array([side * 38.0, 5.0, -5.0]), np.array([side * tx, ty, tz]), 3.5, 0) for tx, ty, tz in trunks]
        while stack:
            start, direction, radius, depth = stack.pop()
            direction = direction + rng.normal(0.0, 0.4, 3)
            direction /= np.linalg.norm(direction)
            end = start + (40.0 - 7.0 * depth) * direction
            vessels |= grid.segment_tube(start, end, (radius, radius * 0.8))
            if depth < 3:
                stack.extend((end, direction, radius * 0.7, depth + 1) for _ in range(2))
    hu[vessels & lung] = HU["vessel"]


def _draw_lesions(hu: np.ndarray, grid: _Grid, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Peripheral, posterior ground-glass blobs and consolidation against the pleura."""
    infection = np.zeros(grid.shape, np.uint8)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, grid.shape).astype(np.float32), 2.0)
    texture /= max(float(texture.std()), 1e-6)
    kinds = ((GROUND_GLASS, 3, (14.0, 24.0), 0.8), (CONSOLIDATION, 2, (9.0, 14.0), 0.97))
    for kind, count, radius_range, depth in kinds:
        for _ in range(count):
            side_x = LUNG_CENTRE_X * rng.choice([-1.0, 1.0])
            angle = rng.uniform(0.1 * np.pi, 0.7 * np.pi)
            centre_x = side_x + depth * LUNG_SEMI_AXES[0] * np.cos(angle) * np.sign(side_x)
            centre_y = depth * LUNG_SEMI_AXES[1] * abs(np.sin(angle))
            centre_z = rng.uniform(LUNG_BASE_Z + DOME_HEIGHT + 10.0, APEX_START_Z + 20.0)
            blob = np.zeros(grid.shape, bool)
            for _ in range(3):
                offset = rng.normal(0.0, 0.35, 3) * radius_range[0]
                radius = rng.uniform(*radius_range)
                blob |= grid.ellipsoid((centre_x + offset[0], centre_y + offset[1], centre_z + offset[2]),
                                       (radius, radius * rng.uniform(0.7, 1.0), radius * rng.uniform(0.8, 1.3)))
            blob &= lungs > 0
            infection[blob] = kind
    ground_glass = infection == GROUND_GLASS
    hu[ground_glass] = np.clip(-450.0 + 60.0 * texture[ground_glass], -600.0, -300.0)
    consolidation = infection == CONSOLIDATION
    hu[consolidation] = np.clip(-25.0 + 25.0 * texture[consolidation], -100.0, 50.0)
    return infection


def _scanner_blur_and_noise(
    hu: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Partial-volume blur (about 0.7 mm in-plane) and slightly correlated noise of about NOISE_HU."""
    sigma = (0.3, 0.7 / spacing[1], 0.7 / spacing[0])
    blurred = ndimage.gaussian_filter(hu, sigma)
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, hu.shape).astype(np.float32), (0.0, 0.6, 0.6))
    noise *= NOISE_HU / max(float(noise.std()), 1e-6)
    return blurred + noise
