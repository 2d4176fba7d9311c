"""HU -> the appearance of the slices a 2D model was trained on (the card's ``preprocessing``).

Two recipes, named by ``preprocessing["recipe"]`` in a model card:

- ``full-slice-clahe`` (the ``covid-ct-seg-2d`` slices, models 2.x): the whole axial slice,
  bicubic resize to 256 (OpenCV), min-max over the resized slice to 0..255, CLAHE (OpenCV,
  clip limit 7.0, 8x8 tiles). ``render_full_slice`` reproduces the data set's PNGs bit for
  bit from HU (tested on three ``covid-hu-slices``). Real CT holds what those training
  slices did not, and min-max would let one voxel change the whole picture, so before the
  recipe the slice is made robust: everything below -1024 HU (scanner padding outside the
  circular field of view at -3024 or -2048) takes values drawn from the air of the band just inside
  it (the scanner's own air around the body), and voxels above 3071 HU (the top
  of the 12-bit CT scale: metal) take the median of the slice's tissue. A slice without such
  voxels is left exactly as it is.
- ``lung-crop`` (the COVID-SemiSeg screenshots, models 1.x): lung window, cropped to the
  box around both lungs, stretched to the square; measured as follows.

The COVID-SemiSeg slices are 8-bit lung-window images cropped to the box around both
lungs and stretched to a square. ``to_model_input`` reproduces that from an HU slice and
its lung mask; it is the single function used for training slices read from HU volumes
and for inference, so the two cannot drift apart.

Window measurement (``DEFAULT_WINDOW``): the 50 COVID-SemiSeg training JPGs were compared
with the 3 chest slices of ``covid-hu-slices`` windowed by candidate windows. Lung region:
the npz lung masks (eroded 3 px); in the JPGs the two largest dark (Otsu) components,
holes filled, eroded 3 px. Soft tissue: non-lung pixels of the lung box in [-200, 200] HU
vs the bright non-lung JPG pixels below 250. Wasserstein-1 distances in grey levels
(lung / soft tissue): [-1250, 250] 17.4 / 8.0; [-1350, 150] 34.2 / 20.2;
[-1000, 0] 8.8 / 38.5; [-1200, 600] 11.4 / 39.3; [-1100, 100] 6.4 / 23.8;
[-1100, 300] 7.8 / 11.5; a 50 HU grid search put the minimum of the sum at
[-1100, 250] 6.6 / 6.1 (matching only the darkest quarter of the lungs, which lesions do
not shift, gives [-1050, 200], next to it). Two patients only, so brightness/contrast
augmentation covers the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

FULL_SLICE_CLAHE = "full-slice-clahe"
LUNG_CROP = "lung-crop"
RECIPES = (FULL_SLICE_CLAHE, LUNG_CROP)
AIR_HU = -1024.0  # padding below this (-2048, -3024 outside the scan field) becomes the slice's air (robust_hu)
PADDING_BAND_PIXELS = 3  # robust_hu fills padding with the air of this band just inside it...
PADDING_AIR_BELOW_HU = -900.0  # ...air being below this (not the table, not the skin)
CT_SCALE_MAX_HU = 3071.0  # above: metal or corrupt voxels, which must not set the slice's maximum
CLAHE_CLIP_LIMIT = 7.0
ROBUST = {"below_hu": AIR_HU,
          "below_to": "values drawn from the air (< -900 HU) of the 3-pixel band just inside the padding (seed 0)",
          "above_hu": CT_SCALE_MAX_HU, "above_to": "median of the slice's tissue (0..3071 HU)"}  # robust_hu, in cards
CLAHE_TILES = (8, 8)
LUNG_WINDOW = (-1250.0, 250.0)  # the benchmark lung window (W1500 / L-500)
DEFAULT_WINDOW = (-1100.0, 250.0)  # measured against the COVID-SemiSeg JPGs (module docstring)
LUNG_BOX_MARGIN = 0.02  # COVID-SemiSeg crops touch the lungs: measured margins 0-3 % of the box
Box = tuple[slice, slice]


def window_hu(hu: np.ndarray, window: Sequence[float] | None = DEFAULT_WINDOW) -> np.ndarray:
    """8-bit image of ``hu`` in ``window`` (low, high): low -> 0, high -> 255, clipped outside."""
    low, high = (DEFAULT_WINDOW if window is None else window)
    if not high > low:
        raise InputError(f"the intensity window {tuple(window)} must have high > low")
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def lung_box(mask: np.ndarray, margin_fraction: float = LUNG_BOX_MARGIN) -> Box:
    """In-plane box around all non-zero voxels of a 2D or 3D ``mask`` (both lungs together).

    The margin is a fraction of the box's own height/width on each side, clipped to the slice.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise InputError(f"a lung mask must be 2D or 3D, not {mask.ndim}D")
    plane = mask.reshape(-1, *mask.shape[-2:]).any(axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        raise InputError("the lung mask is empty, so there is no lung box to crop")
    return _grow(rows[0], rows[-1] + 1, plane.shape[0], margin_fraction), _grow(
        cols[0], cols[-1] + 1, plane.shape[1], margin_fraction)


def _grow(start: int, stop: int, length: int, margin_fraction: float) -> slice:
    margin = int(round((stop - start) * margin_fraction))
    return slice(max(0, int(start) - margin), min(length, int(stop) + margin))


def resize_slices(arr: np.ndarray, size: int | tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize ``(N, H, W)`` (or ``(N, C, H, W)``) to ``size``: order 1 bilinear (images,
    probabilities), order 0 nearest (label masks). Keeps the dtype; integers are rounded."""
    arr = np.asarray(arr)
    target = (size, size) if isinstance(size, int) else tuple(size)
    if arr.ndim not in (3, 4) or 0 in arr.shape:
        raise InputError(f"resize_slices expects non-empty (N, H, W) or (N, C, H, W), got {arr.shape}")
    if tuple(arr.shape[-2:]) == target:
        return arr.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    tensor = tensor.unsqueeze(1) if arr.ndim == 3 else tensor
    if order == 0:
        resized = F.interpolate(tensor, size=target, mode="nearest-exact")
    elif order == 1:
        resized = F.interpolate(tensor, size=target, mode="bilinear", align_corners=False, antialias=True)
    else:
        raise InputError(f"resize order must be 0 (nearest) or 1 (bilinear), not {order}")
    out = resized[:, 0] if arr.ndim == 3 else resized
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = out.round().clamp(info.min, info.max)
    return out.numpy().astype(arr.dtype, copy=False)


def crop_resize(image: np.ndarray, box: Box, size: int, order: int = 1) -> np.ndarray:
    """``image[box]`` stretched to ``size x size``, as the COVID-SemiSeg crops were (no aspect kept)."""
    return resize_slices(np.asarray(image)[box][None], size, order)[0]


def model_image(slice_2d: np.ndarray, box: Box, size: int = 256, window: Sequence[float] | None = None) -> np.ndarray:
    """The 8-bit model image of ``slice_2d[box]``: HU is windowed, 8-bit input keeps its grey levels."""
    cropped = np.asarray(slice_2d)[box]
    image = cropped if cropped.dtype == np.uint8 else window_hu(cropped, window)
    return resize_slices(image[None], size, order=1)[0]


def to_model_input(
    hu_slice: np.ndarray, lung_mask_slice: np.ndarray, size: int = 256,
    window: Sequence[float] | None = None, margin_fraction: float = LUNG_BOX_MARGIN,
) -> tuple[np.ndarray, Box]:
    """Window, crop to the lungs and resize one canonical HU slice: ``(uint8 (size, size), box)``.

    ``box`` is where the image came from in the slice; ``paste_back`` maps predictions there.
    8-bit input is taken as already windowed and keeps its grey levels. ``window=None`` means
    ``DEFAULT_WINDOW``.
    """
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2 or hu_slice.shape != np.shape(lung_mask_slice):
        raise InputError(f"slice {hu_slice.shape} and lung mask {np.shape(lung_mask_slice)} must be the same 2D shape")
    box = lung_box(lung_mask_slice, margin_fraction)
    return model_image(hu_slice, box, size, window), box


def paste_back(
    pred: np.ndarray, boxes: Sequence[Box], shape: tuple[int, int], fill: float | Sequence[float] = 0.0,
) -> np.ndarray:
    """Inverse of ``to_model_input`` for predictions: ``(N, S, S)`` or ``(N, C, S, S)`` probabilities ->
    float32 ``(N, H, W)`` / ``(N, C, H, W)`` on the slice grid, ``fill`` (per class) outside each box."""
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim not in (3, 4) or len(pred) != len(boxes):
        raise InputError(f"paste_back needs one box per prediction, got {len(boxes)} boxes for {pred.shape}")
    out = np.empty((*pred.shape[:-2], *shape), np.float32)
    out[...] = np.asarray(fill, np.float32).reshape(-1, 1, 1) if pred.ndim == 4 else fill
    for index, box in enumerate(boxes):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        out[(index, Ellipsis, *box)] = resize_slices(pred[index][None], (height, width), order=1)[0]
    return out


def recipe_of(preprocessing: dict) -> str:
    """The appearance recipe a model card's ``preprocessing`` names (1.x cards name none: lung crops)."""
    recipe = preprocessing.get("recipe", LUNG_CROP)
    if recipe not in RECIPES:
        raise InputError(f"unknown preprocessing recipe {recipe!r}; this relsegcore knows {', '.join(RECIPES)}")
    return recipe


def robust_hu(hu_slice: np.ndarray) -> np.ndarray:
    """float32 copy of an HU slice with padding made the slice's own air and metal made soft tissue.

    Padding (below -1024 HU: -3024 or -2048 outside the circular scan field) takes values drawn from the
    air (below -900 HU) of the band just inside it: the scanner's air around the body, noise and all
    (deterministic, seed 0). The networks' instance norms see the whole slice, so the corners nudge what
    lies near the threshold even where the lungs' pixels are unchanged. Measured against the same CT
    unpadded (session 25, six CTs, RelSegCore/EXPERIMENTS.md): real COVID-19 infection Dice 0.993-0.994, the
    opacity of five non-COVID CTs moved by at most 0.6 point; -1024 everywhere suits CTs whose own
    padding is -1024 (within 0.2 point) but gives 0.983-0.985 on the COVID-19 CT, whose corners are air.
    Metal (ECG electrodes, wires, clips) becomes the median of the slice's tissue (0..3071 HU): set to the
    slice's highest other value instead, a 3x3 electrode survives the resize brighter than any thin bone
    and still rescales the whole picture (measured on LUNG1-013: mean change 2.4 grey levels)."""
    import cv2

    hu = np.asarray(hu_slice, dtype=np.float32).copy()
    padding = hu < AIR_HU
    if padding.any():
        near = cv2.dilate(padding.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=PADDING_BAND_PIXELS)
        band = hu[(near > 0) & ~padding]
        band = band[band < PADDING_AIR_BELOW_HU]
        hu[padding] = np.random.default_rng(0).choice(band, int(padding.sum())) if band.size else AIR_HU
    too_high = hu > CT_SCALE_MAX_HU
    if too_high.any():
        tissue = hu[(hu >= 0) & ~too_high]
        hu[too_high] = np.median(tissue) if tissue.size else 0.0
    return hu


def render_full_slice(hu_slice: np.ndarray, size: int = 256, clip_limit: float = CLAHE_CLIP_LIMIT) -> np.ndarray:
    """The ``full-slice-clahe`` image (uint8 ``(size, size)``) of one canonical HU slice.

    8-bit input (an already rendered slice) is only resized, if needed.
    """
    import cv2  # OpenCV: the data set was made with its bicubic resize and CLAHE, which others do not match

    slice_2d = np.asarray(hu_slice)
    if slice_2d.ndim != 2:
        raise InputError(f"a slice must be 2D, got shape {slice_2d.shape}")
    if slice_2d.dtype == np.uint8:
        return slice_2d.copy() if slice_2d.shape == (size, size) else resize_slices(slice_2d[None], size)[0]
    resized = cv2.resize(robust_hu(slice_2d), (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    low, high = resized.min(), resized.max()
    if not high > low:
        return np.zeros((size, size), np.uint8)
    scaled = ((resized - low) / (high - low) * 255.0).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=CLAHE_TILES).apply(scaled)


def model_input(
    hu_slice: np.ndarray, lung_mask_slice: np.ndarray | None, preprocessing: dict,
) -> tuple[np.ndarray, Box]:
    """A model's uint8 input for one canonical slice as its card's ``preprocessing`` says, and the box of the
    slice it shows (the whole slice for ``full-slice-clahe``). The one function for training and inference."""
    size = int(preprocessing.get("input_size", 256))
    if recipe_of(preprocessing) == FULL_SLICE_CLAHE:
        shape = np.shape(hu_slice)
        return render_full_slice(hu_slice, size, float(preprocessing.get("clip_limit", CLAHE_CLIP_LIMIT))), (
            slice(0, shape[0]), slice(0, shape[1]))
    if lung_mask_slice is None:
        raise InputError("the lung-crop recipe needs the slice's lung mask")
    return to_model_input(hu_slice, lung_mask_slice, size, preprocessing.get("window"))


def preprocessing_for(recipe: str, size: int = 256) -> dict:
    """The ``preprocessing`` entry of a model card for a recipe."""
    if recipe == FULL_SLICE_CLAHE:
        return {"recipe": FULL_SLICE_CLAHE, "input_size": size, "clip_limit": CLAHE_CLIP_LIMIT,
                "robust": ROBUST}
    if recipe == LUNG_CROP:
        return {"recipe": LUNG_CROP, "input_size": size, "window": list(DEFAULT_WINDOW), "crop": "lungs"}
    raise InputError(f"unknown preprocessing recipe {recipe!r}; choose from {', '.join(RECIPES)}")
