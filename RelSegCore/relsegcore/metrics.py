"""Segmentation metrics on binary masks (numpy/scipy only, 2D and 3D).

Spacing convention: every function here takes ``spacing`` in the *array's axis order*
(``(row, col)`` for 2D, ``(z, y, x)`` for a SimpleITK array), because these functions see
arrays, not images. Convert SimpleITK's ``(x, y, z)`` with ``image.GetSpacing()[::-1]``.
``spacing=None`` means 1 per axis (distances in voxels).

Empty masks: Dice and surface Dice are 1.0 when both masks are empty and 0.0 when only one
is; HD95 is 0.0 when both are empty and ``inf`` when only one is. Sensitivity (no positive
reference voxel) and specificity (no negative reference voxel) are ``nan`` when undefined.
``summarise`` leaves non-finite values out and says how many it used (``n``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError


def _as_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise InputError(f"Prediction shape {pred.shape} does not match reference shape {ref.shape}.")
    if pred.ndim not in (2, 3):
        raise InputError(f"Masks must be 2D or 3D, got {pred.ndim} dimensions.")
    return pred, ref


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not s > 0 for s in spacing):
        raise InputError(f"Spacing {spacing} must have {ndim} positive values in the array's axis order.")
    return spacing


def confusion(pred: np.ndarray, ref: np.ndarray) -> dict[str, int]:
    """Voxel counts ``tp``, ``fp``, ``fn``, ``tn`` of ``pred`` against ``ref``."""
    pred, ref = _as_pair(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size - tp - fp - fn)}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P|+|R|); 1.0 when both masks are empty (nothing to find, nothing found)."""
    counts = confusion(pred, ref)
    denominator = 2 * counts["tp"] + counts["fp"] + counts["fn"]
    return 2 * counts["tp"] / denominator if denominator else 1.0


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FN); ``nan`` when the reference has no positive voxel."""
    counts = confusion(pred, ref)
    return _ratio(counts["tp"], counts["tp"] + counts["fn"])


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """TN / (TN + FP); ``nan`` when the reference has no negative voxel."""
    counts = confusion(pred, ref)
    return _ratio(counts["tn"], counts["tn"] + counts["fp"])


def _border(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the image edge counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel (never past the image edge).

    Borders and border-to-border distances are unchanged, and the distance transforms of a
    small lesion no longer run over the whole CT.
    """
    coords = np.nonzero(pred | ref)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    return pred[box], ref[box]


def _border_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]):
    """Distances (mm) from each border voxel of one mask to the nearest border voxel of the other."""
    pred, ref = _crop_to_union(pred, ref)
    pred_border, ref_border = _border(pred), _border(ref)
    to_ref = ndimage.distance_transform_edt(~ref_border, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    return to_ref[pred_border], to_pred[ref_border]


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None, tolerance_mm: float
) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) at ``tolerance_mm``.

    The fraction of both borders lying within the tolerance of the other border. Borders are
    voxel sets (as in MONAI's ``compute_surface_dice``); DeepMind's ``surface-distance``
    package weights the same distances by surfel area, which differs only slightly.
    """
    pred, ref = _as_pair(pred, ref)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    pred_to_ref, ref_to_pred = _border_distances(pred, ref, _spacing(spacing, pred.ndim))
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return float(within / (pred_to_ref.size + ref_to_pred.size))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None) -> float:
    """Robust Hausdorff distance: max of the two directed 95th-percentile border distances (mm).

    As DeepMind's ``compute_robust_hausdorff(..., 95)`` and MONAI. 0.0 when both masks are
    empty, ``inf`` when exactly one is.
    """
    pred, ref = _as_pair(pred, ref)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return math.inf
    pred_to_ref, ref_to_pred = _border_distances(pred, ref, _spacing(spacing, pred.ndim))
    return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))


def _binary_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None, tolerance_mm: float
) -> dict[str, float]:
    return {
        "dice": dice(pred, ref),
        "sensitivity": sensitivity(pred, ref),
        "specificity": specificity(pred, ref),
        "nsd": surface_dice(pred, ref, spacing, tolerance_mm),
        "hd95": hd95(pred, ref, spacing),
    }


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 3.0,
    labels: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """All metrics of one case.

    ``pred`` and ``ref`` are label arrays. Keys ``dice``, ``sensitivity``, ``specificity``,
    ``nsd``, ``hd95`` compare the foreground (label > 0). With ``labels`` (for example
    ``{"ground_glass": 1, "consolidation": 2}``) each class adds ``<metric>_<name>`` keys.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    result = _binary_metrics(pred > 0, ref > 0, spacing, tolerance_mm)
    for name, value in (labels or {}).items():
        per_class = _binary_metrics(pred == value, ref == value, spacing, tolerance_mm)
        result.update({f"{metric}_{name}": score for metric, score in per_class.items()})
    return result


def summarise(per_case: list[dict]) -> dict:
    """Mean, sample SD and count of finite values per metric, and ``mean_dice`` over cases.

    Returns ``{"cases": N, "mean_dice": float, "metrics": {name: {"mean", "sd", "n"}}}``;
    non-numeric keys (a case name) are ignored, and a metric with no finite value has
    ``mean`` and ``sd`` ``None``.
    """
    names = sorted({key for case in per_case for key, value in case.items() if _is_number(value)})
    metrics = {}
    for name in names:
        values = np.array([case[name] for case in per_case if _is_number(case.get(name))], dtype=float)
        values = values[np.isfinite(values)]
        metrics[name] = {
            "mean": float(values.mean()) if values.size else None,
            "sd": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else None),
            "n": int(values.size),
        }
    mean_dice = metrics.get("dice", {}).get("mean")
    return {"cases": len(per_case), "mean_dice": mean_dice, "metrics": metrics}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
