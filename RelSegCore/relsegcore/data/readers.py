"""Dataset layouts -> in-memory 8-bit slices at one size, ready for 2D training.

Every reader returns a ``SliceSet`` of ``size x size`` slices in the canonical layout
(anterior up, the patient's left on the image right), images 8-bit in the model's lung
window, masks class indices. HU volumes go through ``intensity.model_image``, the same
windowing/cropping the pipeline uses at inference.

Two crops:
- ``context="lungs"``: whole-chest volumes, each slice cropped to the box around both lungs
  and stretched to the square, as the COVID-SemiSeg slices were.
- ``context="lesion"``: small crops around a lesion (LIDC ~30 mm, MSD 96 mm patches). Blowing a
  30 mm crop up to 256 px would show the network nodules ten times larger than any lesion in
  a lung crop. Instead the crop is resampled to the pixel size of a typical lung crop
  (``field_mm`` / size = 300 mm / 256 px, about 1.2 mm/px) and centred on a canvas filled with
  the median of the crop's own border (aerated lung, not air, so no artificial edge).
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..fileutil import atomic_path
from ..noise import NOISE_KINDS, add_ct_noise
from .intensity import (
    DEFAULT_WINDOW,
    FULL_SLICE_CLAHE,
    LUNG_CROP,
    crop_resize,
    lung_box,
    model_image,
    render_full_slice,
    resize_slices,
    window_hu,
)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LESION_FIELD_MM = 300.0  # a lung crop spans about 300 mm: 256 px -> 1.17 mm/px
WHOLE_CHEST_MIN_MM = 150.0  # context="auto": a slice this wide is a chest, a smaller one a lesion crop
# folders and file-name suffixes tried, in order, when a pairs folder does not say which is which
PAIR_FOLDERS = (("image", "mask"), ("images", "masks"), ("imagesTr", "labelsTr"), ("images", "labels"))
PAIR_SUFFIXES = (("_ct", "_effusion"), ("_image", "_label"), ("_img", "_seg"), ("_ct", "_seg"),
                 ("_image", "_mask"), ("_ct", "_mask"), ("", "_seg"), ("", "_mask"), ("", "_label"))

LungSegmenter = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]


@dataclass
class SliceSet:
    """Slices for training: ``images`` uint8 ``(N, S, S)``, ``masks`` uint8 class indices, one name each."""

    images: np.ndarray
    masks: np.ndarray
    names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.shape != self.masks.shape or self.images.ndim != 3 or len(self.names) != len(self.images):
            raise InputError(f"a slice set needs images and masks of one (N, S, S) shape and N names, got "
                             f"{self.images.shape}, {self.masks.shape} and {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def concat(cls, sets: Sequence[SliceSet]) -> SliceSet:
        """One set of all slices; sources joined with ``+``."""
        sets = [s for s in sets if len(s)] or list(sets[:1])
        if not sets:
            raise InputError("there are no slice sets to put together")
        sizes = {s.images.shape[1:] for s in sets}
        if len(sizes) > 1:
            raise InputError(f"slice sets of different sizes {sorted(sizes)} cannot be put together")
        sources = list(dict.fromkeys(part for s in sets for part in s.source.split("+") if part))
        return cls(np.concatenate([s.images for s in sets]), np.concatenate([s.masks for s in sets]),
                   [name for s in sets for name in s.names], "+".join(sources))

    def subset(self, indices: Sequence[int] | np.ndarray) -> SliceSet:
        indices = np.asarray(indices, dtype=np.int64)
        return SliceSet(self.images[indices], self.masks[indices], [self.names[i] for i in indices], self.source)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (the cache format)."""
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, images=self.images, masks=self.masks,
                                names=np.array(self.names, dtype=str), source=np.array(self.source))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SliceSet:
        with np.load(path) as data:
            return cls(data["images"], data["masks"], [str(n) for n in data["names"]], str(data["source"]))


# ---------------------------------------------------------------- 2D pictures


def read_image_folder(
    root: str | os.PathLike, size: int = 256, mask_dir: str = "masks", multiclass: bool = False,
    image_dir: str = "images", orientation: str = "auto", limit: int | None = None,
) -> SliceSet:
    """``root/images/*.jpg|png`` with ``root/<mask_dir>/<stem>.png`` (0/255 or 0/1 binary, or class indices).

    ``orientation``: ``"as-is"``; ``"transposed"`` for slices stored with the lungs one above the
    other (anterior on the left, the patient's right on top), as the COVID-SemiSeg / MedSeg
    slices are; ``"auto"``: see ``needs_transpose``.
    """
    root = Path(root)
    pairs = find_picture_pairs(root / image_dir, root / mask_dir)[:limit]
    pictures, labels = [], []
    for _, image_path, mask_path in pairs:
        image = read_gray_picture(image_path)
        mask = read_mask_picture(mask_path, multiclass)
        if image.shape != mask.shape:
            raise InputError(f"image {image_path.name} is {image.shape} but its mask is {mask.shape}")
        pictures.append(resize_slices(image[None], size, order=1)[0])
        labels.append(resize_slices(mask[None], size, order=0)[0])
    stacked_images, stacked_masks = np.stack(pictures), np.stack(labels)
    if needs_transpose(stacked_images, orientation, picture_recipe(pictures)):
        stacked_images = np.ascontiguousarray(stacked_images.transpose(0, 2, 1))
        stacked_masks = np.ascontiguousarray(stacked_masks.transpose(0, 2, 1))
    return SliceSet(stacked_images, stacked_masks, [f"{root.name}/{stem}" for stem, _, _ in pairs], root.name)


def find_picture_pairs(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for every picture in ``images_dir``, in natural order; an image without a
    mask of the same stem is an error (a silently skipped slice would change every mean)."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    images, masks = _pictures(images_dir), _pictures(masks_dir)
    if not images:
        raise InputError(f"no images (*.png, *.jpg) found in {images_dir}")
    missing = sorted(set(images) - set(masks), key=_natural_key)
    if missing:
        raise InputError(f"{len(missing)} image(s) in {images_dir} have no mask of the same name in "
                         f"{masks_dir}, for example {missing[0]!r}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images, key=_natural_key)]


def read_gray_picture(path: Path) -> np.ndarray:
    """A picture as 8-bit grey, whatever its mode (RGB screenshots of CT are grey in all channels)."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"))


def picture_fingerprint(image: np.ndarray) -> str:
    """A short hash of a picture's pixels: the same slice however its file is named or where it lies."""
    image = np.ascontiguousarray(image)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()[:16]


def folder_fingerprints(images_dir: str | os.PathLike, masks_dir: str | os.PathLike,
                        stems: set[str] | None = None) -> list[str]:
    """``picture_fingerprint`` of every image that has a mask (of those named ``stems`` only, when given: a fold
    trains on some of a folder's pictures), as model cards record their training slices."""
    pairs = find_picture_pairs(images_dir, masks_dir)
    return [picture_fingerprint(read_gray_picture(image)) for stem, image, _ in pairs if stems is None or stem in stems]


def _pictures(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"the folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICTURE_EXTENSIONS and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def read_mask_picture(path: Path, multiclass: bool) -> np.ndarray:
    """A mask picture as uint8: class indices as stored, or binary from 0/255 or 0/1 masks."""
    mask = np.asarray(Image.open(path))
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if multiclass:
        return mask.astype(np.uint8)
    return (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8)


def _natural_key(stem: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", stem)]


def needs_transpose(images: np.ndarray, orientation: str, recipe: str) -> bool:
    """Whether pictures are stored with the lungs one above the other and must be turned for the network.

    ``"auto"`` decides for the whole folder from where the mediastinum lies, for lung-window crops (``recipe``
    ``lung-crop``: COVID-SemiSeg / MedSeg store theirs transposed) only. Whole CT slices (``full-slice-clahe``) are
    axial slices as the scanner stored them, never transposed: on them the mediastinum test is unreliable (it
    votes "transposed" for every slice of coronacases_001 and 003 of covid-ct-seg-2d, whose lungs lie side by side).
    """
    if orientation not in ("auto", "as-is", "transposed"):
        raise InputError(f"orientation must be 'auto', 'as-is' or 'transposed', not {orientation!r}")
    if orientation != "auto":
        return orientation == "transposed"
    if recipe == FULL_SLICE_CLAHE:
        return False
    votes = [mediastinum_band(image) == "horizontal" for image in images]
    return sum(votes) > len(votes) / 2


CROP_FRAME_GREY = 130  # median grey of a picture's outer frame above which it is a crop of the thorax


def picture_recipe(images: Sequence[np.ndarray]) -> str:
    """Which recipe 8-bit pictures look prepared by, by the majority of their outer frames (5 % of the side).

    A whole CT slice (``full-slice-clahe``) is framed by the air and table outside the body: dark. A crop of the
    thorax in a lung window (``lung-crop``, as COVID-SemiSeg's screenshots) is framed by the chest wall: bright.
    Measured medians: 13-95 on the 1,163 slices of covid-ct-seg-2d, 165-253 on the 50 COVID-SemiSeg pictures.
    """
    votes = [float(np.median(_outer_frame(np.asarray(image)))) > CROP_FRAME_GREY for image in images]
    return LUNG_CROP if sum(votes) > len(votes) / 2 else FULL_SLICE_CLAHE


def _outer_frame(image: np.ndarray, share: float = 0.05) -> np.ndarray:
    """The pixels of ``image`` within ``share`` of its smaller side from an edge."""
    width = max(1, int(round(share * min(image.shape))))
    inner = np.ones(image.shape, bool)
    inner[:width] = inner[-width:] = inner[:, :width] = inner[:, -width:] = False
    return image[~inner]


def mediastinum_band(image: np.ndarray) -> str:
    """``"vertical"`` when the bright band between the lungs runs top to bottom (canonical),
    ``"horizontal"`` when it runs left to right (lungs one above the other)."""
    small = resize_slices(np.asarray(image, np.float32)[None], 64, order=1)[0]

    def band_contrast(profile: np.ndarray) -> float:
        return float(profile[26:38].mean() - np.concatenate([profile[10:22], profile[42:54]]).mean())

    return "vertical" if band_contrast(small.mean(axis=0)) >= band_contrast(small.mean(axis=1)) else "horizontal"


# ---------------------------------------------------------------- volumes


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes become slices (see the module docstring for the two contexts)."""

    size: int = 256
    label_map: dict[int, int] | None = None
    only_lesion_slices: bool = True
    context: str = "auto"
    field_mm: float = LESION_FIELD_MM
    window: tuple[float, float] = DEFAULT_WINDOW
    max_slices_per_volume: int | None = None
    recipe: str = LUNG_CROP  # the appearance of whole-chest slices (intensity.RECIPES)

    def describe(self) -> dict:
        return {**self.__dict__, "label_map": sorted((self.label_map or {}).items())}


def read_volume_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None, size: int = 256,
    image_suffix: str | None = None, mask_suffix: str | None = None, label_map: dict[int, int] | None = None,
    only_lesion_slices: bool = True, context: str = "auto", field_mm: float = LESION_FIELD_MM,
    window: tuple[float, float] = DEFAULT_WINDOW, max_slices_per_volume: int | None = None,
    limit: int | None = None, cache_dir: str | os.PathLike | None = None,
    lung_segmenter: LungSegmenter | None = None, pattern: str = "*", recipe: str = LUNG_CROP,
) -> SliceSet:
    """Axial slices of NIfTI/NRRD/MHA volumes and their masks, matched by name.

    Masks are found in ``masks_dir`` (or beside the images) under the image's name with
    ``image_suffix`` replaced by ``mask_suffix`` (``LUNG1-001_ct`` / ``LUNG1-001_effusion``);
    with neither given, the usual folder pairs (image/mask, imagesTr/labelsTr, ...) and suffix
    pairs (_ct/_effusion, _image/_label, ...) are tried. ``label_map`` maps mask values to
    classes (others -> 0); by default every non-zero value is class 1. ``context``: ``"lungs"``,
    ``"lesion"`` or ``"auto"`` (by the slice's physical width). ``pattern`` (a glob on the image file
    name) and ``limit`` (the first volumes only) select volumes. ``recipe``: how whole-chest slices look
    (``intensity.RECIPES``).
    """
    pairs = [pair for pair in find_volume_pairs(images_dir, masks_dir, image_suffix, mask_suffix)
             if fnmatch.fnmatch(pair[1].name, pattern)][:limit]
    options = VolumeOptions(size, label_map, only_lesion_slices, context, field_mm, tuple(window),
                            max_slices_per_volume, recipe)
    return read_pairs(pairs, options, source=Path(images_dir).name, cache_dir=cache_dir,
                      lung_segmenter=lung_segmenter)


def chosen_pairs(pairs: Sequence[tuple[str, Path, Path]], wanted: Sequence[str] | None,
                 folder: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """The ``(case, image, mask)`` pairs named in ``wanted`` (cases, or patients: ``radiopaedia_10`` selects
    both its series); all of them for None. A name matching no volume in ``folder`` is an error."""
    from .ctseg import case_selection

    if wanted is None:
        return list(pairs)
    selected, unknown = case_selection([case for case, _, _ in pairs], list(wanted))
    if unknown:
        raise InputError(f"--cases: no volume named {unknown[0]!r} in {folder}")
    return [pair for pair, chosen in zip(pairs, selected, strict=True) if chosen]


def find_volume_pairs(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None,
    image_suffix: str | None = None, mask_suffix: str | None = None,
) -> list[tuple[str, Path, Path]]:
    """``(case name, image path, mask path)`` for every image, sorted; an image without a mask is an error."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"the folder {images_dir} does not exist")
    if masks_dir is None and image_suffix is None and mask_suffix is None:
        for image_name, mask_name in PAIR_FOLDERS:
            if (images_dir / image_name).is_dir() and (images_dir / mask_name).is_dir():
                return find_volume_pairs(images_dir / image_name, images_dir / mask_name, "", "")
        names = {_volume_stem(p) for p in _volumes(images_dir)}
        for image_end, mask_end in PAIR_SUFFIXES:
            if any(n.endswith(image_end) and n[: len(n) - len(image_end)] + mask_end in names
                   for n in names if n.endswith(image_end) and not n.endswith(mask_end)):
                return find_volume_pairs(images_dir, images_dir, image_end, mask_end)
        raise InputError(f"cannot tell images from masks in {images_dir}: use image/ and mask/ folders or "
                         "name pairs like CASE_image.nii.gz + CASE_label.nii.gz")
    masks_dir = images_dir if masks_dir is None else Path(masks_dir)
    image_suffix, mask_suffix = image_suffix or "", mask_suffix or ""
    if masks_dir.resolve() == images_dir.resolve() and image_suffix == mask_suffix:
        raise InputError("images and masks in one folder need different name suffixes (e.g. _ct and _label)")
    masks = {_volume_stem(p)[: len(_volume_stem(p)) - len(mask_suffix)]: p for p in _volumes(masks_dir)
             if _volume_stem(p).endswith(mask_suffix)}
    images = {_volume_stem(p)[: len(_volume_stem(p)) - len(image_suffix)]: p for p in _volumes(images_dir)
              if _volume_stem(p).endswith(image_suffix) and not (mask_suffix and _volume_stem(p).endswith(mask_suffix))}
    if not images:
        raise InputError(f"no volumes (*{image_suffix}.nii.gz, .nrrd, .mha) found in {images_dir}")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise InputError(f"{len(missing)} volume(s) in {images_dir} have no mask in {masks_dir}, for example "
                         f"{missing[0]}{image_suffix} (looked for {missing[0]}{mask_suffix})")
    return [(case, images[case], masks[case]) for case in sorted(images)]


def _volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"the folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(VOLUME_EXTENSIONS)
                  and not p.name.startswith("."))


def _volume_stem(path: Path) -> str:
    name = path.name
    return next(name[: -len(ext)] for ext in VOLUME_EXTENSIONS + ("",) if name.lower().endswith(ext))


def read_pairs(
    pairs: Sequence[tuple[str, Path, Path]], options: VolumeOptions, source: str,
    cache_dir: str | os.PathLike | None = None, lung_segmenter: LungSegmenter | None = None,
) -> SliceSet:
    """Slices of every ``(case, image, mask)`` pair, through the cache when ``cache_dir`` is given."""
    def build() -> SliceSet:
        sets = [volume_slices(case, image, mask, options, lung_segmenter) for case, image, mask in pairs]
        empty = SliceSet(np.zeros((0, options.size, options.size), np.uint8),
                         np.zeros((0, options.size, options.size), np.uint8), [], source)
        result = SliceSet.concat([empty, *sets])
        return SliceSet(result.images, result.masks, result.names, source)

    segmenter = lung_segmenter or default_lung_segmenter()
    files = [path for _, image, mask in pairs for path in (image, mask)]
    files += _source_files(volume_slices, model_image, segmenter)  # a code change invalidates the cache too
    description = {"reader": "volumes", "source": source, "segmenter": getattr(segmenter, "__qualname__", None),
                   **options.describe()}
    return cached(cache_dir, description, files, build)


def _source_files(*functions: Callable) -> list[Path]:
    paths = []
    for function in functions:
        try:
            paths.append(Path(inspect.getsourcefile(function)))
        except TypeError:  # built-in or callable object without a source file
            continue
    return paths


def volume_slices(
    case: str, image_path: Path, mask_path: Path, options: VolumeOptions,
    lung_segmenter: LungSegmenter | None = None,
) -> SliceSet:
    """The slices of one volume (lesion slices only by default), in canonical orientation."""
    import SimpleITK as sitk  # only volume readers need it: 2D training runs without SimpleITK

    image = _read_canonical(image_path)
    mask_image = _read_canonical(mask_path)
    if mask_image.GetSize() != image.GetSize() or not np.allclose(mask_image.GetOrigin(), image.GetOrigin(), atol=1e-3):
        mask_image = sitk.Resample(mask_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    volume = sitk.GetArrayFromImage(image)
    labels = _map_labels(sitk.GetArrayFromImage(mask_image), options.label_map)
    z_indices = _chosen_slices(labels, options)
    spacing = image.GetSpacing()
    context = options.context
    if context == "auto":
        width_mm = min(volume.shape[1] * spacing[1], volume.shape[2] * spacing[0])
        context = "lungs" if width_mm >= WHOLE_CHEST_MIN_MM else "lesion"
    if context == "lungs":
        needs_lungs = z_indices and options.recipe == LUNG_CROP  # whole slices need no lung box
        lungs = (lung_segmenter or default_lung_segmenter())(volume, spacing) if needs_lungs else None
        images, masks = _lung_crops(volume, labels, z_indices, lungs, options)
    elif context == "lesion":
        windowed = [_to_uint8(volume[z], options.window) for z in z_indices]
        images, masks = place_at_scale(windowed, [labels[z] for z in z_indices], (spacing[1], spacing[0]),
                                       options.size, options.field_mm)
    else:
        raise InputError(f"context must be 'lungs', 'lesion' or 'auto', not {options.context!r}")
    return SliceSet(images, masks, [f"{case}:z{z}" for z in z_indices], case)


def _read_canonical(path: Path):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}") from error
    if image.GetDimension() == 4:  # Decathlon multi-modal: the first modality
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} is not a 3D single-channel volume")
    return sitk.DICOMOrient(image, "LPS")


def _map_labels(mask: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    if not label_map:
        return (mask > 0).astype(np.uint8)
    lookup = np.zeros(int(max(mask.max(), max(label_map))) + 1, np.uint8)
    for value, label in label_map.items():
        lookup[int(value)] = label
    return lookup[np.clip(mask, 0, None).astype(np.int64)]


def read_ct_volumes(
    folder: str | os.PathLike, size: int = 256, slices_per_volume: int = 16, limit: int | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW, cache_dir: str | os.PathLike | None = None,
    lung_segmenter: LungSegmenter | None = None, recipe: str = LUNG_CROP, noise_hu: Sequence[float] = (),
) -> SliceSet:
    """Lung slices of chest CT volumes that have no mask, all background: negatives for ``relseg train``.

    ``folder`` is a folder, one file or a glob of files (``DIR/LUNG1-00*_ct.nii.gz``). Label volumes kept beside the
    CTs (names ending in ``_label``, ``_seg``, ``_mask``, ``_effusion``...) are skipped. Each volume gives up
    to ``slices_per_volume`` slices with lung, evenly spread along z, rendered by ``recipe`` as at inference;
    every mask is empty. ``ct_volume_files`` says which files are used. Each level of ``noise_hu`` adds the same
    slices twice more, with white and with sharp-kernel noise of that std added in HU before the rendering
    (``noise.add_ct_noise``, seeded by case, level and kind): noisy normal lung, as a noisier scanner shows it.
    """
    images = ct_volume_files(folder)[:limit]
    options = VolumeOptions(size, None, True, "lungs", LESION_FIELD_MM, tuple(window), slices_per_volume, recipe)
    segmenter = lung_segmenter or default_lung_segmenter()
    source = Path(str(folder)).parent.name if _is_glob(folder) else Path(str(folder)).name

    noise_levels = tuple(float(level) for level in noise_hu)

    def build() -> SliceSet:
        sets = [_ct_lung_slices(_volume_stem(path), path, options, segmenter, noise_levels) for path in images]
        result = SliceSet.concat(sets)
        return SliceSet(result.images, result.masks, result.names, source)

    description = {"reader": "ct-volumes", "source": source, "segmenter": getattr(segmenter, "__qualname__", None),
                   **options.describe(), **({"noise_hu": list(noise_levels)} if noise_levels else {})}
    return cached(cache_dir, description, [*images, *_source_files(_ct_lung_slices, model_image, segmenter,
                                                                  render_full_slice, add_ct_noise)], build)


def ct_volume_files(folder: str | os.PathLike) -> list[Path]:
    """The CT volumes in a folder (or matching a glob), label volumes left out."""
    if _is_glob(folder):
        parent, pattern = Path(str(folder)).parent, Path(str(folder)).name
        candidates = [p for p in _volumes(parent) if fnmatch.fnmatch(p.name, pattern)]
    elif Path(folder).is_file():
        candidates = [Path(folder)]
    else:
        candidates = _volumes(Path(folder))
    mask_ends = {mask_end for _, mask_end in PAIR_SUFFIXES if mask_end}
    images = [p for p in candidates if not any(_volume_stem(p).lower().endswith(end) for end in mask_ends)]
    if not images:
        raise InputError(f"no CT volumes (.nii.gz, .nrrd, .mha; label volumes left out) found in {folder}")
    return images


def _ct_lung_slices(case: str, image_path: Path, options: VolumeOptions, lung_segmenter: LungSegmenter,
                    noise_hu: Sequence[float] = ()) -> SliceSet:
    import SimpleITK as sitk

    from ..imageio import validate_ct

    image = _read_canonical(image_path)
    try:
        validate_ct(image)
    except InputError as error:
        raise InputError(f"{image_path.name}: {error}") from None
    volume = sitk.GetArrayFromImage(image)
    lungs = lung_segmenter(volume, image.GetSpacing())
    z_indices = _chosen_slices((lungs > 0).astype(np.uint8), options)  # slices with lung, evenly spread
    if not z_indices:
        raise InputError(f"{image_path.name}: no lungs were found: is it a chest CT?")
    sets = [SliceSet(*_lung_crops(volume, None, z_indices, lungs, options), [f"{case}:z{z}" for z in z_indices], case)]
    noisy = volume.astype(np.float32) if noise_hu else None  # one copy; each variant rewrites the chosen slices
    for level in noise_hu:
        for kind in NOISE_KINDS:
            seed = zlib.crc32(f"{case}:{kind}:{level:g}".encode())
            noisy[z_indices] = add_ct_noise(volume[z_indices], level, kind, seed)
            sets.append(SliceSet(*_lung_crops(noisy, None, z_indices, lungs, options),
                                 [f"{case}:z{z}:{kind}{level:g}" for z in z_indices], case))
    return SliceSet.concat(sets)


def _chosen_slices(labels: np.ndarray, options: VolumeOptions) -> list[int]:
    z_indices = (np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)) if options.only_lesion_slices
                 else np.arange(len(labels)))
    if options.max_slices_per_volume and len(z_indices) > options.max_slices_per_volume:
        picks = np.linspace(0, len(z_indices) - 1, options.max_slices_per_volume).round().astype(int)
        z_indices = z_indices[np.unique(picks)]
    return [int(z) for z in z_indices]


def _to_uint8(slice_2d: np.ndarray, window: Sequence[float]) -> np.ndarray:
    return slice_2d if slice_2d.dtype == np.uint8 else window_hu(slice_2d, window)


def _is_glob(path: str | os.PathLike) -> bool:
    return any(c in str(path) for c in "*?[")


def _lung_crops(volume, labels, z_indices, lungs, options: VolumeOptions):
    """Each slice as the model sees it at inference: the whole slice (``full-slice-clahe``), or cropped to its
    own lung box (the volume's when the slice has no lung). ``labels`` None (a CT without a mask) gives empty
    masks."""
    size = options.size
    if not z_indices:
        return np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.uint8)
    if options.recipe == FULL_SLICE_CLAHE:
        images = np.stack([render_full_slice(volume[z], size) for z in z_indices])
        if labels is None:
            return images, np.zeros_like(images)
        return images, resize_slices(np.stack([labels[z] for z in z_indices]), size, order=0)
    whole = (slice(0, volume.shape[1]), slice(0, volume.shape[2]))
    volume_box = lung_box(lungs) if lungs.any() else whole
    boxes = [lung_box(lungs[z]) if lungs[z].any() else volume_box for z in z_indices]
    pairs = list(zip(z_indices, boxes, strict=True))
    images = np.stack([model_image(volume[z], box, size, options.window) for z, box in pairs])
    if labels is None:
        return images, np.zeros_like(images)
    masks = np.stack([crop_resize(labels[z], box, size, order=0) for z, box in pairs])
    return images, masks


def default_lung_segmenter() -> LungSegmenter:
    """The project's lung segmentation (``relsegcore.lungs``), imported when first needed."""
    from ..lungs import segment_lungs_array

    return segment_lungs_array


def place_at_scale(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], pixel_mm: tuple[float, float],
    size: int = 256, field_mm: float = LESION_FIELD_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Small 8-bit crops resampled to ``field_mm / size`` mm per pixel and centred on a ``size`` canvas
    filled with each crop's border median (larger crops are cut to the canvas)."""
    out_images = np.zeros((len(images), size, size), np.uint8)
    out_masks = np.zeros((len(images), size, size), np.uint8)
    if not len(images):
        return out_images, out_masks
    target_mm = field_mm / size
    height, width = np.shape(images[0])
    shape = (max(1, round(height * pixel_mm[0] / target_mm)), max(1, round(width * pixel_mm[1] / target_mm)))
    scaled = resize_slices(np.stack(images), shape, order=1)
    scaled_masks = resize_slices(np.stack(masks), shape, order=0)
    rows, cols = _centred(shape[0], size), _centred(shape[1], size)
    for index, image in enumerate(scaled):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        out_images[index] = np.uint8(np.median(border))
        out_images[index][rows[1], cols[1]] = image[rows[0], cols[0]]
        out_masks[index][rows[1], cols[1]] = scaled_masks[index][rows[0], cols[0]]
    return out_images, out_masks


def _centred(length: int, size: int) -> tuple[slice, slice]:
    """(source slice, canvas slice) centring ``length`` pixels on a ``size`` canvas."""
    if length <= size:
        start = (size - length) // 2
        return slice(0, length), slice(start, start + length)
    start = (length - size) // 2
    return slice(start, start + size), slice(0, size)


# ---------------------------------------------------------------- other layouts


def read_decathlon(root: str | os.PathLike, size: int = 256, cache_dir: str | os.PathLike | None = None,
                   limit: int | None = None, **options) -> SliceSet:
    """Medical Segmentation Decathlon layout: ``dataset.json`` listing ``imagesTr``/``labelsTr`` pairs."""
    root = Path(root)
    listing = root / "dataset.json"
    if not listing.is_file():
        raise InputError(f"{root} has no dataset.json, so it is not a Decathlon dataset folder")
    try:
        training = json.loads(listing.read_text(encoding="utf-8"))["training"]
        pairs = [(_volume_stem(Path(item["image"])), root / item["image"], root / item["label"]) for item in training]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{listing} does not list training pairs as {{'image': ..., 'label': ...}}") from error
    for _, image, mask in pairs:
        if not image.is_file() or not mask.is_file():
            raise InputError(f"{listing} lists {image.name} / {mask.name}, which are not both in {root}")
    return read_pairs(sorted(pairs)[:limit], VolumeOptions(size=size, **options), source=root.name,
                      cache_dir=cache_dir)


def read_patches_npz(
    path: str | os.PathLike, size: int = 256, spacing_mm: float = 2.0, field_mm: float = LESION_FIELD_MM,
    only_lesion_slices: bool = True, limit: int | None = None,
) -> SliceSet:
    """Already-windowed patches (``images`` (N,1,h,w) float 0..1 or uint8, ``labels``/``masks``) placed
    at the lung-crop scale; grey levels pass through (float 0..1 -> 0..255)."""
    path = Path(path)
    try:
        with np.load(path) as data:
            images = data["images"]
            labels = data["labels"] if "labels" in data else data["masks"]
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path} is not an .npz with 'images' and 'labels' arrays") from error
    images, labels = _squeeze_channel(images), _squeeze_channel(labels)
    if images.shape != labels.shape or images.ndim != 3:
        raise InputError(f"{path.name}: images {images.shape} and labels {labels.shape} must be matching (N, h, w)")
    if images.dtype != np.uint8:
        if images.min() < -0.01 or images.max() > 1.01:
            raise InputError(f"{path.name}: float patches must be windowed to 0..1, "
                             f"found {images.min():.1f}..{images.max():.1f}")
        images = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
    keep = np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1)) if only_lesion_slices else np.arange(len(labels))
    keep = keep[:limit]
    placed, masks = place_at_scale(list(images[keep]), list((labels[keep] > 0).astype(np.uint8)),
                                   (spacing_mm, spacing_mm), size, field_mm)
    return SliceSet(placed, masks, [f"{path.stem}:{i}" for i in keep], path.stem)


def _squeeze_channel(array: np.ndarray) -> np.ndarray:
    return array[:, 0] if array.ndim == 4 and array.shape[1] == 1 else array


# ---------------------------------------------------------------- cache


def cached(cache_dir: str | os.PathLike | None, description: dict, files: Sequence[Path],
           build: Callable[[], SliceSet]) -> SliceSet:
    """``build()``, or its saved result when the arguments and the files (names, sizes, mtimes) are unchanged."""
    if cache_dir is None:
        return build()
    stats = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([description, stats], sort_keys=True, default=str).encode()).hexdigest()[:20]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{description.get('reader', 'set')}-{description.get('source', '')}")
    path = Path(cache_dir) / f"{label}-{key}.npz"
    if path.is_file():
        try:
            return SliceSet.load(path)
        except (OSError, ValueError, KeyError, InputError):
            path.unlink(missing_ok=True)  # unreadable cache: rebuild it
    result = build()
    result.save(path)
    return result
