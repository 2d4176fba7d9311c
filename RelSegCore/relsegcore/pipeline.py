"""CT in -> lungs, infection, report: the one code path behind the CLI, the API and Slicer.

The CT is checked, turned to the canonical LPS grid, the lungs are found from HU, and the
infection model runs only where there is lung: a 2D model on every axial slice with lung,
windowed and cropped to the lungs as its training slices were, in chunks of slices so
that memory does not grow with full-resolution probabilities of the whole volume; a 3D
model by sliding window over the box around the lungs. Infection is restricted to the
lungs; what the HU lungs' closing along z added and the model leaves unpainted (effusion, the
heart's rim) leaves the lungs. A binary model's infection is split into ground-glass and
consolidation by HU (``opacity``), and both label maps go back on the input's exact geometry.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import imageio, opacity, outputs, zoo
from .data import intensity
from .device import describe_device, select_device
from .errors import InputError, ModelError
from .inference import batches, labels_from, postprocess_slice, predict_slices, predict_volume
from .lungs import lungs_and_closing_additions, lungs_from_mask, segment_lungs_array
from .noise import estimate_noise_hu, noise_warning
from .progress import Progress

SLICES_PER_CHUNK = 32  # probabilities of one chunk at most: 32 x C x 256 x 256 float32 = 16 MB for C=2
LUNG_BOX_MARGIN_VOXELS = 8  # context around the lungs for a 3D model
VOLUME_BATCH_SIZE = 4  # 3D patches per forward pass
STAGE_SPANS = {"Reading": (0.0, 0.05), "Lungs": (0.05, 0.2), "Infection": (0.2, 0.95), "Report": (0.95, 1.0)}
LUNG_MODEL = "covid-lungs-2d"  # the learned lungs ("auto": used when installed)
# The default lungs: the HU method. Measured against covid-lungs-2d 1.0.0 (Testing/benchmarks/README.md) it
# keeps pleural effusion out of the lungs (the model counts 30-51 % of four patients' effusion as lung) and
# scores higher on the covid-hu-slices and the TotalSegmentator lung bases.
HU_LUNGS = "hu"
HU_METHOD = "hu-threshold"  # the report's lungs_method for the HU lungs
# The lungs change slowly along z: the lung model sees one slice in this many mm and each other slice takes the
# labels of the nearest slice it saw (a 1 mm CT costs a third of its slices; 2.5 mm and thicker, every slice).
LUNG_MODEL_STEP_MM = 2.5
KEPT_MODELS = 2  # an infection and a lung model
_LOADED: dict[tuple, zoo.LoadedModel] = {}  # load_model_cached's models, oldest first


@dataclass
class SegmentationResult:
    """Label maps on the input's exact grid, and the report (volumes, percentages, model, device, timing)."""

    lungs: sitk.Image  # 1 left lung, 2 right lung
    infection: sitk.Image  # 1 ground-glass, 2 consolidation (a binary model's infection split by HU)
    class_names: list[str]  # infection labels' names, label 1 first
    report: dict


@dataclass
class _Timer:
    """Wall-clock seconds per stage, in the order the stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def segment(
    image: sitk.Image,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    tta: bool = False,
    progress: Progress | None = None,
    lungs: sitk.Image | None = None,
    lung_model: str | os.PathLike = "hu",
    high_opacity_hu: float = opacity.HIGH_OPACITY_HU,
    engine: str = "auto",
) -> SegmentationResult:
    """Lungs (1 left, 2 right), infection (1 ground-glass, 2 consolidation) and report for a CT in HU.

    ``model`` is a model name or path; ``None`` is the registry's default (``relseg models use``).
    A binary model's infection is split at ``high_opacity_hu`` (see ``opacity``); a model
    with classes of its own keeps them. The report's PHO counts infection at or above
    ``high_opacity_hu`` for every model.
    ``lungs`` may give known lung labels on ``image``'s grid (skipping lung segmentation).
    ``lung_model``: ``"hu"`` (the HU method, the default), ``"auto"`` (the learned ``covid-lungs-2d`` when
    installed, else the HU method) or a lung model's name or path; the report's ``lungs_method`` says which ran.
    With the HU method, what its closing along z added stays lung only where the model paints infection.
    ``engine`` runs the networks on the CPU (``engines``: "auto" is OpenVINO when installed); the report says which.
    ``progress`` receives the stages "Lungs", "Infection", "Report" and may cancel between
    chunks of slices (``errors.Cancelled``).
    """
    progress = progress or Progress()
    timer = _Timer()
    started = time.perf_counter()
    with timer.stage("checks"):
        imageio.validate_ct(image)
        loaded = load_model_cached(model, select_device(device), engine)  # model problems surface before slow work
        _check_role(loaded.card, "infection")
        canonical = imageio.to_canonical(image)
        hu = sitk.GetArrayViewFromImage(canonical)
        noise_hu = estimate_noise_hu(hu)  # the model takes noise above its training CTs' for ground-glass
    progress.update(STAGE_SPANS["Lungs"][0], "Lungs")
    closing_added = None  # what the HU lungs' closing along z added (dropped where no infection is painted)
    with timer.stage("lungs"):
        if lungs is not None:
            lung_labels, lungs_method, lung_seconds = _canonical_lungs(lungs, image), "given", 0.0
        elif lung_model_card(lung_model) is None:
            lung_labels, closing_added = lungs_and_closing_additions(hu, canonical.GetSpacing())
            lungs_method, lung_seconds = HU_METHOD, 0.0
        else:
            lung_labels, lungs_method, lung_seconds = lung_labels_for(hu, canonical.GetSpacing(), lung_model,
                                                                      loaded.device, progress, engine)
    if not lung_labels.any():
        raise InputError("No lungs were found in the image: is it a chest CT?")
    progress.update(STAGE_SPANS["Infection"][0], "Infection")
    with timer.stage("infection"):
        infection_labels, network_seconds = infection_labels_for(loaded, hu, lung_labels, tta, progress)
    if closing_added is not None:
        # the closing is there for consolidation on the pleura, which the model paints; what it leaves unpainted
        # there is effusion, the heart's rim, the hila: out of the lungs. The infection is unchanged.
        lung_labels[closing_added & (infection_labels == 0)] = 0
        del closing_added
    timer.seconds["network"] = round(network_seconds + lung_seconds, 3)
    progress.update(STAGE_SPANS["Report"][0], "Report")
    with timer.stage("report"):
        class_names = list(loaded.card.infection_classes)
        if opacity.has_single_infection_class(class_names):
            infection_labels = opacity.split_by_attenuation(infection_labels, hu, high_opacity_hu)
            class_names = opacity.split_class_names()
        grid = _Grid.of(canonical)
        del hu, canonical  # the canonical copy of the CT is not needed any more: free it before the report
        lungs_image = _on_input_grid(lung_labels, grid, image)
        del lung_labels
        infection_image = _on_input_grid(infection_labels, grid, image)
        del infection_labels
        report = outputs.compute_report(lungs_image, infection_image, class_names, image, high_opacity_hu)
        report["warnings"] += [warning] if (warning := noise_warning(noise_hu)) else []
    timer.seconds["total"] = round(time.perf_counter() - started, 3)
    report.update(
        model={"name": loaded.card.name, "version": loaded.card.version, "sha256": loaded.card.sha256,
               "threshold": loaded.card.threshold},
        device=describe_device(loaded.device),
        engine=loaded.engine,
        tta=bool(tta or loaded.card.flip_tta),  # the card may ask for it (postprocessing.flip_tta)
        lungs_method=lungs_method,
        noise_hu=None if noise_hu is None else round(noise_hu, 1),
        timing_s=timer.seconds,
    )
    progress.update(1.0, "Report")
    return SegmentationResult(lungs_image, infection_image, class_names, report)


def load_model_cached(model: str | os.PathLike | None, device: torch.device, engine: str) -> zoo.LoadedModel:
    """``zoo.load_model``, kept for the next call with the same weights, device and engine: a batch of CTs or a
    second Segment press in Slicer neither re-reads the weights nor converts them for the engine again."""
    card = zoo.find_model(model)
    key = (str(card.path), card.sha256, str(device), engine)
    loaded = _LOADED.get(key)
    if loaded is None or loaded.device != device:  # a GPU that ran out of memory moved the network to the CPU
        while len(_LOADED) >= KEPT_MODELS:
            _LOADED.pop(next(iter(_LOADED)))  # the oldest
        _LOADED[key] = loaded = zoo.load_model(card, device, engine)
    return loaded


def lung_model_card(lung_model: str | os.PathLike = "hu") -> zoo.ModelCard | None:
    """The lung model ``lung_model`` stands for, or None for the HU method (``"hu"``, or ``"auto"`` without an
    installed ``covid-lungs-2d``)."""
    if str(lung_model) == HU_LUNGS:
        return None
    if str(lung_model) == "auto":
        return next((card for card in zoo.list_models() if card.name == LUNG_MODEL), None)
    return zoo.find_model(lung_model)


def lung_labels_for(
    hu: np.ndarray, spacing_xyz: tuple[float, float, float], lung_model: str | os.PathLike = "hu",
    device: torch.device | str = "auto", progress: Progress | None = None, engine: str = "auto",
) -> tuple[np.ndarray, str, float]:
    """Lung labels uint8 ``(z, y, x)`` (1 left, 2 right) of a canonical HU volume, the method that found them,
    and the seconds spent in a network."""
    card = lung_model_card(lung_model)
    if card is None:
        return segment_lungs_array(hu, spacing_xyz), HU_METHOD, 0.0
    _check_role(card, "lungs")
    loaded = load_model_cached(card.path or card.name, select_device(device), engine)
    seen = slices_every(len(hu), spacing_xyz[2], LUNG_MODEL_STEP_MM)
    mask, seconds = slice_labels_2d(loaded, hu, seen, None, progress=progress, span=STAGE_SPANS["Lungs"])
    mask = mask[nearest_of(seen, len(hu))]
    guide = segment_lungs_array(hu, spacing_xyz) > 0
    return (lungs_from_mask(mask > 0, hu, spacing_xyz, guide=guide),
            f"{card.name} {card.version}, guided by the HU lungs", seconds)


def slices_every(count: int, spacing_z: float, step_mm: float) -> np.ndarray:
    """Indices of one slice in ``step_mm`` (at least every slice of a thick CT), the first and last always."""
    step = max(1, int(round(step_mm / spacing_z)))
    return np.unique(np.r_[np.arange(0, count, step), count - 1])


def nearest_of(seen: np.ndarray, count: int) -> np.ndarray:
    """For each of ``count`` slices, the index of the nearest slice in ``seen`` (sorted)."""
    if len(seen) == 1:
        return np.full(count, seen[0])
    z = np.arange(count)
    after = np.clip(np.searchsorted(seen, z), 1, len(seen) - 1)
    before = after - 1
    return np.where(z - seen[before] <= seen[after] - z, seen[before], seen[after])


def _check_role(card: zoo.ModelCard, role: str) -> None:
    if card.role != role:
        raise ModelError(f"{card.name} is a {card.role} model; this step needs an {role} model"
                         if role == "infection" else f"{card.name} is a {card.role} model, not a lung model")


def segment_lungs(image: sitk.Image, model: str | os.PathLike = HU_LUNGS, device: str = "auto",
                  engine: str = "auto") -> sitk.Image:
    """Lung labels (1 left, 2 right) on ``image``'s exact grid: the HU method, or a lung model (``"auto"``: the
    learned ``covid-lungs-2d`` when installed)."""
    imageio.validate_ct(image)
    canonical = imageio.to_canonical(image)
    labels, _, _ = lung_labels_for(sitk.GetArrayViewFromImage(canonical), canonical.GetSpacing(), model, device,
                                   engine=engine)
    return _on_input_grid(labels, _Grid.of(canonical), image)


def infection_labels_for(
    loaded: zoo.LoadedModel, hu: np.ndarray, lung_labels: np.ndarray, tta: bool = False,
    progress: Progress | None = None,
) -> tuple[np.ndarray, float]:
    """Infection labels uint8 ``(z, y, x)`` inside the lungs, and the seconds spent in the network."""
    if loaded.card.architecture.get("dims", 2) == 3:
        return _infection_3d(loaded, hu, lung_labels, tta, progress)
    return _infection_2d(loaded, hu, lung_labels, tta, progress)


def _infection_2d(loaded, hu, lung_labels, tta, progress) -> tuple[np.ndarray, float]:
    slices_with_lung = np.flatnonzero(lung_labels.reshape(len(lung_labels), -1).any(axis=1))
    labels, seconds = slice_labels_2d(loaded, hu, slices_with_lung, lung_labels, tta, progress,
                                      STAGE_SPANS["Infection"])
    labels[lung_labels == 0] = 0
    return labels, seconds


def slice_labels_2d(
    loaded: zoo.LoadedModel, hu: np.ndarray, z_indices: np.ndarray, lung_labels: np.ndarray | None,
    tta: bool = False, progress: Progress | None = None, span: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, float]:
    """Labels uint8 ``(z, y, x)`` of a 2D model on the slices ``z_indices`` (0 elsewhere), each slice rendered
    as the model's card says (``intensity.model_input``; ``lung_labels`` give the crop of lung-crop models),
    and the seconds spent in the network. Chunks of slices keep memory flat."""
    labels = np.zeros(hu.shape, np.uint8)
    network_seconds = 0.0
    for chunk in batches(len(z_indices), SLICES_PER_CHUNK):
        chunk_z = z_indices[chunk]
        with _one_torch_thread():
            prepared = [intensity.model_input(hu[z], None if lung_labels is None else lung_labels[z],
                                              loaded.card.preprocessing) for z in chunk_z]
        images = np.stack([image for image, _ in prepared])
        fraction = (span[0] + (span[1] - span[0]) * chunk.start / len(z_indices),
                    span[0] + (span[1] - span[0]) * chunk.stop / len(z_indices))
        start = time.perf_counter()
        probabilities = predict_slices(loaded, images, None, tta, progress, fraction)
        network_seconds += time.perf_counter() - start
        with _one_torch_thread():
            for z, (_, box), slice_probabilities in zip(chunk_z, prepared, probabilities, strict=True):
                decided = _labels_resized(slice_probabilities, _box_shape(box), loaded.card.threshold)
                labels[z][box] = postprocess_slice(decided, hu[z][box], loaded.card)
    return labels, network_seconds


def _infection_3d(loaded, hu, lung_labels, tta, progress) -> tuple[np.ndarray, float]:
    window = loaded.card.preprocessing.get("window")
    box = _bounding_box(lung_labels > 0, LUNG_BOX_MARGIN_VOXELS)
    volume = intensity.window_hu(np.asarray(hu[box]), window).astype(np.float32) / 255.0
    start = time.perf_counter()
    probabilities = predict_volume(loaded, volume, batch_size=VOLUME_BATCH_SIZE, tta=tta, progress=progress,
                                   progress_span=STAGE_SPANS["Infection"])
    network_seconds = time.perf_counter() - start
    labels = np.zeros(hu.shape, np.uint8)
    labels[box] = labels_from(probabilities, loaded.card.threshold)
    labels[lung_labels == 0] = 0
    return labels, network_seconds


@contextmanager
def _one_torch_thread():
    """Run small per-slice torch ops on one thread: at this size, waking a thread pool costs more than the
    work (measured 36x slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _labels_resized(probabilities: np.ndarray, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Labels uint8 at ``shape`` from ``(C, S, S)`` probabilities, resized bilinearly before deciding
    (``inference.labels_from``: the argmax, or a binary model's foreground above ``threshold``).

    Resizing is linear and keeps p0 + p1 = 1, so for two classes p1 > t is the resized difference
    p1 - p0 > 2t - 1: one channel resized instead of two.
    """
    if len(probabilities) == 2:
        margin = intensity.resize_slices(probabilities[1:] - probabilities[:1], shape, order=1)[0]
        return (margin > 2.0 * threshold - 1.0).astype(np.uint8)
    return labels_from(intensity.resize_slices(probabilities, shape, order=1))


def _box_shape(box: tuple[slice, slice]) -> tuple[int, int]:
    return (box[0].stop - box[0].start, box[1].stop - box[1].start)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(slice(max(0, int(c.min()) - margin), min(n, int(c.max()) + margin + 1))
                 for c, n in zip(coords, mask.shape, strict=True))


def _canonical_lungs(lungs: sitk.Image, image: sitk.Image) -> np.ndarray:
    """User-given lung labels as a canonical array; they must lie on the CT's grid."""
    if lungs.GetSize() != image.GetSize() or not np.allclose(lungs.GetSpacing(), image.GetSpacing(), atol=1e-4):
        raise InputError("The lung labels given do not have the CT's size and spacing.")
    lungs = sitk.Cast(lungs, sitk.sitkUInt8)
    lungs.CopyInformation(image)
    return sitk.GetArrayFromImage(imageio.to_canonical(lungs))


@dataclass(frozen=True)
class _Grid:
    """Where a canonical array lies in space, kept without the image's voxels."""

    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> _Grid:
        return cls(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _on_input_grid(labels: np.ndarray, grid: _Grid, image: sitk.Image) -> sitk.Image:
    """Canonical labels as an image on ``image``'s exact grid."""
    result = sitk.GetImageFromArray(labels)
    result.SetOrigin(grid.origin)
    result.SetSpacing(grid.spacing)
    result.SetDirection(grid.direction)
    return imageio.from_canonical(result, image)


# --- files in, files out ---------------------------------------------------------------------------------


def case_name(path: str | os.PathLike) -> str:
    """An output name from an input path: ``ct.nii.gz`` -> ``ct``, a DICOM folder -> its folder name."""
    path = Path(path)
    name = path.name
    lowered = name.lower()
    for suffix in sorted(imageio.VOLUME_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def segment_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    tta: bool = False,
    series: str | None = None,
    progress: Progress | None = None,
    name: str | None = None,
    lung_model: str | os.PathLike = "hu",
    high_opacity_hu: float = opacity.HIGH_OPACITY_HU,
    engine: str = "auto",
    stored_window: tuple[float, float] | None = None,
) -> dict[str, Path]:
    """Read a CT file or DICOM folder, segment it and write all outputs (all or nothing). ``stored_window``:
    the CT is stored windowed as grey values 0..255 in this window (``imageio.hu_from_stored_window``)."""
    progress = progress or Progress()
    progress.update(0.0, "Reading")
    image = imageio.read_image(path, series)
    if stored_window is not None:
        image = imageio.hu_from_stored_window(image, stored_window)
    result = segment(image, model=model, device=device, tta=tta, progress=progress, high_opacity_hu=high_opacity_hu,
                     lung_model=lung_model, engine=engine)
    result.report["input"] = str(path)
    if stored_window is not None:
        result.report["stored_window_hu"] = [float(value) for value in stored_window]
    chosen = imageio.last_series_choice
    if chosen is not None:  # say which DICOM series was segmented
        result.report["dicom_series"] = {"uid": chosen.uid, "description": chosen.description,
                                         "number": chosen.number, "files": len(chosen.files)}
    return write_result(out_dir, name or case_name(path), image, result)


def write_result(out_dir: str | os.PathLike, name: str, image: sitk.Image,
                 result: SegmentationResult) -> dict[str, Path]:
    """Write every output of one case into ``out_dir`` (all of them, or none: see ``outputs.write_outputs``)."""
    return outputs.write_outputs(out_dir, name, image, result.lungs, result.infection, result.class_names,
                                 result.report)
