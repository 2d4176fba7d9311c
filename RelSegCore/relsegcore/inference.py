"""Run a loaded model over 2D slices (batched) or a 3D volume (sliding window).

Both entry points take model-ready inputs (uint8 images for 2D, 0..1 floats for 3D) and
return class probabilities; reading, windowing, cropping and pasting back are the
pipeline's job. Batches run under ``torch.inference_mode`` with bf16/fp16 autocast on
CUDA. A CUDA out-of-memory error halves the batch and retries; at batch size 1 the
network moves to the CPU, with a logged warning, and the job goes on there.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from scipy import ndimage

from .device import autocast, is_cuda_oom
from .engines import forward_of
from .progress import Progress
from .zoo import LoadedModel, ModelCard

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16  # on a GPU
# On the CPU one slice at a time is fastest: 63 ms a 256x256 slice against 112-130 ms in batches of 16 (2 cores,
# covid-infection-2d, Testing/benchmarks/bench_engines.py): a batch's activations outgrow the caches.
CPU_BATCH_SIZE = 1
DEFAULT_OVERLAP = 0.5


def batch_size_for(device: torch.device) -> int:
    """Slices per forward pass: what the device runs fastest (``CPU_BATCH_SIZE``, ``DEFAULT_BATCH_SIZE``)."""
    return CPU_BATCH_SIZE if device.type == "cpu" else DEFAULT_BATCH_SIZE


def predict_slices(
    loaded: LoadedModel,
    images: np.ndarray,
    batch_size: int | None = None,
    tta: bool = False,
    progress: Progress | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Class probabilities float32 ``(N, C, S, S)`` for uint8 images ``(N, S, S)``.

    ``batch_size`` defaults to ``batch_size_for`` the model's device. ``tta`` (or the card's ``flip_tta``)
    averages with the horizontally flipped prediction, and the card's ``upside_down_tta`` with the predictions on
    the images turned upside down. ``progress`` gets updates
    mapped into ``progress_span`` and is asked about cancelling between batches.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected uint8 images (N, S, S), got shape {images.shape}")
    num_classes = loaded.card.architecture.get("num_classes", len(loaded.card.classes))
    probabilities = np.empty((len(images), num_classes, *images.shape[1:]), dtype=np.float32)
    runner = _BatchRunner(loaded, batch_size or batch_size_for(loaded.device))
    tta = tta or loaded.card.flip_tta
    upside_down = loaded.card.upside_down_tta
    done = 0
    while done < len(images):
        if progress is not None:
            progress.check_cancelled()
        stop = min(done + runner.batch_size, len(images))
        batch = torch.from_numpy(np.ascontiguousarray(images[done:stop])).unsqueeze(1)
        result = runner.run(batch, tta, upside_down)
        if result is None:
            continue  # batch was too large for the GPU: retried next turn with the halved size
        probabilities[done:stop] = result
        done = stop
        _report(progress, progress_span, done / len(images))
    return probabilities


def labels_from(probabilities: np.ndarray, threshold: float = 0.5, axis: int = 0) -> np.ndarray:
    """uint8 labels from class probabilities along ``axis``: the argmax, except that a binary model's foreground
    needs a probability above ``threshold`` (the card's ``threshold``; 0.5 is the argmax)."""
    if probabilities.shape[axis] == 2:
        return (np.take(probabilities, 1, axis=axis) > threshold).astype(np.uint8)
    return probabilities.argmax(axis=axis).astype(np.uint8)


def drop_small_components(labels: np.ndarray, fraction: float) -> np.ndarray:
    """A 2D label map without the foreground components (8-connected, any label) smaller than ``fraction`` of
    its largest one (the card's ``min_component_fraction``); ``labels`` itself when nothing is dropped."""
    if fraction <= 0.0:
        return labels
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    if count < 2:
        return labels
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    small = sizes < fraction * sizes.max()
    small[0] = False
    if not small.any():
        return labels
    return np.where(small[components], 0, labels).astype(labels.dtype)


def drop_outside_body(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A 2D label map without the foreground components (8-connected) of which at least half lies outside the
    body of ``image`` (the same slice, any grey scale: HU or a rendered picture); ``labels`` itself when nothing
    is dropped. The body is the convex hull of the largest region above the slice's Otsu threshold: the hull,
    not the region, so that lungs are inside it however the tissue around them is cut, and a body cut by the
    image's edge (a small field of view) keeps every lung in it (Testing/benchmarks/README.md, session 27)."""
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    if count == 0:
        return labels
    body = _largest_bright_region(image)
    if body is None:  # a flat slice: no body to judge by
        return labels
    sizes = np.bincount(components.ravel(), minlength=count + 1)

    def outside(region: np.ndarray) -> np.ndarray:
        inside = np.bincount(components[region].ravel(), minlength=count + 1)
        return (inside < 0.5 * sizes) & (np.arange(count + 1) > 0)

    # the region with its holes filled lies inside its hull: what is inside it is inside the hull, and the
    # hull (tens of milliseconds a slice) is only needed when something is not
    if not outside(ndimage.binary_fill_holes(body)).any():
        return labels
    from skimage.morphology import convex_hull_image

    dropped = outside(convex_hull_image(body))
    if not dropped.any():
        return labels
    return np.where(dropped[components], 0, labels).astype(labels.dtype)


def postprocess_slice(labels: np.ndarray, image: np.ndarray, card: ModelCard) -> np.ndarray:
    """A 2D slice's decided labels after its card's postprocessing: small components dropped
    (``min_component_fraction``) and, when the card says ``outside_body_dropped``, those lying mostly outside the
    body of ``image`` (the same slice). The one place ``relseg evaluate`` and the pipeline's 2D step share."""
    labels = drop_small_components(labels, card.min_component_fraction)
    return drop_outside_body(labels, image) if card.outside_body_dropped else labels


def _largest_bright_region(image: np.ndarray) -> np.ndarray | None:
    """The largest region of a 2D slice above its Otsu threshold (None for a flat slice)."""
    from skimage.filters import threshold_otsu

    image = np.asarray(image, np.float32)
    if image.max() <= image.min():
        return None
    regions, count = ndimage.label(image > threshold_otsu(image))
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == sizes.argmax()


def predict_volume(
    loaded: LoadedModel,
    volume: np.ndarray,
    patch_size: tuple[int, int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    batch_size: int = 2,
    tta: bool = False,
    progress: Progress | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Class probabilities float32 ``(C, D, H, W)`` for a 3D model on a 0..1 volume ``(D, H, W)``.

    Patches (``patch_size`` or the card's ``preprocessing["patch_size"]``) overlap by
    ``overlap`` and are blended with a Gaussian importance map, so patch borders, where
    the network sees least context, weigh least.
    """
    volume = np.asarray(volume, dtype=np.float32)
    patch = tuple(int(p) for p in (patch_size or loaded.card.preprocessing["patch_size"]))
    padded, pad = _pad_to_at_least(volume, patch)
    num_classes = loaded.card.architecture.get("num_classes", len(loaded.card.classes))
    accumulated = np.zeros((num_classes, *padded.shape), dtype=np.float32)
    weights = np.zeros(padded.shape, dtype=np.float32)
    importance = gaussian_importance(patch)
    starts = [_window_starts(n, p, overlap) for n, p in zip(padded.shape, patch, strict=True)]
    corners = list(itertools.product(*starts))
    runner = _BatchRunner(loaded, batch_size)
    tta = tta or loaded.card.flip_tta
    upside_down = loaded.card.upside_down_tta
    done = 0
    while done < len(corners):
        if progress is not None:
            progress.check_cancelled()
        chunk = corners[done:done + runner.batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True)) for corner in chunk]
        batch = torch.from_numpy(np.stack([padded[w] for w in windows])).unsqueeze(1)
        result = runner.run(batch, tta, upside_down)
        if result is None:
            continue
        for window, probs in zip(windows, result, strict=True):
            accumulated[(slice(None), *window)] += probs * importance
            weights[window] += importance
        done += len(chunk)
        _report(progress, progress_span, done / len(corners))
    accumulated /= np.maximum(weights, 1e-8)
    depth, height, width = volume.shape
    return accumulated[:, pad[0]:pad[0] + depth, pad[1]:pad[1] + height, pad[2]:pad[2] + width]


def gaussian_importance(patch: tuple[int, ...], sigma_fraction: float = 0.125) -> np.ndarray:
    """A Gaussian bump over the patch (sigma = 1/8 of each side), max 1, never 0."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / max(n * sigma_fraction, 1e-3)) ** 2) for n in patch]
    bump = np.ones(patch, dtype=np.float32)
    for axis, values in enumerate(axes):
        shape = [1] * len(patch)
        shape[axis] = len(values)
        bump = bump * values.reshape(shape).astype(np.float32)
    bump /= bump.max()
    return np.maximum(bump, 1e-3).astype(np.float32)


def tta_views(flip: bool, upside_down: bool) -> list[tuple[int, ...]]:
    """The axes each averaged view of test-time augmentation mirrors (``()``: the input as it is), in the order
    ``class_probabilities`` sums them: left-right is the last axis, upside down the one before it."""
    return [(-2,) * turned + (-1,) * mirrored for turned in range(1 + upside_down) for mirrored in range(1 + flip)]


def class_probabilities(network, x: torch.Tensor, flip: bool = False, upside_down: bool = False) -> torch.Tensor:
    """Softmax of ``network`` (a module or an engine's forward) on the float batch ``x``; with ``flip``, averaged
    with the prediction on the left-right mirrored batch, mirrored back (flip test-time augmentation); with
    ``upside_down``, also with those on the batch turned upside down (a card's ``upside_down_tta``, for networks
    trained on both orientations). The last axis is left-right and the one before it anterior-posterior in both
    (N, 1, H, W) and (N, 1, D, H, W)."""
    views = tta_views(flip, upside_down)
    probabilities = torch.softmax(network(x).float(), dim=1)
    for axes in views[1:]:
        probabilities += torch.flip(torch.softmax(network(torch.flip(x, dims=axes)).float(), dim=1), dims=axes)
    return probabilities / len(views)


class _BatchRunner:
    """Forward passes with the GPU-memory policy: halve the batch on OOM, then fall back to the CPU."""

    def __init__(self, loaded: LoadedModel, batch_size: int):
        self.loaded = loaded
        self.batch_size = max(1, int(batch_size))

    def run(self, batch: torch.Tensor, tta: bool, upside_down: bool = False) -> np.ndarray | None:
        """Probabilities for ``batch``, or None when it did not fit and the caller must resend it smaller."""
        try:
            return self._forward(batch, tta, upside_down)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_cuda_oom(error):
                raise
            if len(batch) == 1 and self.loaded.device.type == "cpu":
                raise
        _release_cuda_cache()
        if len(batch) > 1:
            self.batch_size = max(1, len(batch) // 2)
            log.info("GPU out of memory: retrying with batches of %d", self.batch_size)
        else:
            self._fall_back_to_cpu()
        return None

    def _forward(self, batch: torch.Tensor, tta: bool, upside_down: bool) -> np.ndarray:
        device = self.loaded.device
        x = batch.to(device, non_blocking=True).float()
        if batch.dtype == torch.uint8:
            x = x / 255.0
        with torch.inference_mode(), autocast(device, allow_float16=True):
            probs = class_probabilities(forward_of(self.loaded), x, tta, upside_down)
        return probs.cpu().numpy()

    def _fall_back_to_cpu(self) -> None:
        log.warning(
            "The GPU ran out of memory even for one input at a time; continuing on the CPU (slower). "
            "Close other GPU programs, or use --device cpu to start there."
        )
        self.loaded.network.to("cpu")
        self.loaded.device = torch.device("cpu")
        self.loaded.engine = "torch"


def _release_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _report(progress: Progress | None, span: tuple[float, float], fraction: float) -> None:
    if progress is not None:
        progress.update(span[0] + (span[1] - span[0]) * fraction)


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` covering ``size``, the last one flush with the end."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return sorted({min(i * step, size - patch) for i in range(count)})


def _pad_to_at_least(volume: np.ndarray, patch: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad (centred, with the volume's minimum) so that each side is at least the patch size."""
    before = tuple(max(0, p - n) // 2 for n, p in zip(volume.shape, patch, strict=True))
    widths = [(b, max(0, p - n) - b) for b, n, p in zip(before, volume.shape, patch, strict=True)]
    if not any(w for pair in widths for w in pair):
        return volume, before
    return np.pad(volume, widths, mode="constant", constant_values=float(volume.min())), before


def batches(count: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` items over ``count`` items."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
