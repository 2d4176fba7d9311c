"""Read a CT, check that it is a CT we can segment, and move it to and from the canonical grid.

Every problem with the input is raised as ``InputError`` with one sentence, before any
slow work starts. Computation happens on the canonical LPS grid (``to_canonical``) and
results go back on the input's exact geometry (``from_canonical``).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
CANONICAL_ORIENTATION = "LPS"
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
HU_RANGE = (-2048.0, 4095.0)  # the usual stored CT scale; below: padding outside the scan field, above: metal
PADDING_FLOOR_HU = -32768.0  # scanners pad outside the circular field with -3024, -2048 or int16's minimum
MAX_SHARE_ABOVE_SCALE = 0.001  # metal is a few voxels; a CT with more above 4095 is not in HU
AIR_PERCENTILE_MAX_HU = -500.0  # a CT always shows air (outside the body, lungs) near -1000
STORED_GREY_RANGE = (0, 255)  # a CT stored windowed as 8-bit grey values (hu_from_stored_window)
BYTES_PER_VOXEL_NEEDED = 16  # working copies (float32 HU, masks, labels) during segmentation
MAX_VOXELS_ENV = "RELSEG_MAX_VOXELS"

_TAG_SERIES_UID = "0020|000e"
_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_SERIES_NUMBER = "0020|0011"
_TAG_MODALITY = "0008|0060"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
# A gap this far off the usual slice distance (a quarter of it, and at least 0.2 mm: positions are often
# rounded to 0.1 mm) is a missing or an extra slice, not rounding.
SLICE_GAP_TOLERANCE = 0.25
SLICE_GAP_TOLERANCE_MM = 0.2


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series in a folder, as offered to the user and logged when chosen."""

    uid: str
    description: str
    number: str
    modality: str
    files: tuple[str, ...]


last_series_choice: SeriesInfo | None = None
"""The series ``read_image`` picked from the last DICOM folder it read (None for single files)."""


def read_image(path: str | os.PathLike, series: str | None = None) -> sitk.Image:
    """Read a NIfTI / NRRD / MHA file or a DICOM series folder.

    In a folder with several series, ``series`` selects one by SeriesInstanceUID,
    SeriesDescription or SeriesNumber; without it the largest CT series is taken.
    """
    global last_series_choice
    path = Path(path)
    last_series_choice = None
    if not path.exists():
        raise InputError(f"Input not found: {path}.")
    if path.is_dir():
        chosen = choose_series(list_dicom_series(path), series, path)
        last_series_choice = chosen
        logger.info(
            "Reading DICOM series %s (%s, number %s, %d files) from %s",
            chosen.uid, chosen.description or "no description", chosen.number or "?", len(chosen.files), path,
        )
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(chosen.files))
        reader.MetaDataDictionaryArrayUpdateOn()
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "non uniform sampling" goes to stderr unasked
        try:
            image = _read_or_explain(reader.Execute, path)
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        check_even_slices(
            [_tag_of_slice(reader, index, _TAG_POSITION) for index in range(len(chosen.files))],
            [_tag_of_slice(reader, index, _TAG_ORIENTATION) for index in range(len(chosen.files))],
            path,
        )
        return image
    if not path.name.lower().endswith(VOLUME_SUFFIXES):
        raise InputError(
            f"Unsupported file type for {path.name}: give a NIfTI, NRRD, MHA file or a DICOM folder."
        )
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    return _read_or_explain(lambda: sitk.ReadImage(str(path)), path)


def _check_nifti_complete(path: Path) -> None:
    """SimpleITK reads a truncated NIfTI without complaint (the rest is zeros): count the bytes.

    A gzip file's last 4 bytes give its uncompressed size (mod 2**32): when they match, the file is
    whole without decompressing it (0.9 s saved on a 512x512x300 CT); otherwise (several gzip members,
    extensions, damage) the bytes are counted by decompressing.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            header = handle.read(540)
        expected = _nifti_expected_bytes(header)
        if expected is None:
            raise InputError(f"Could not read {path}: the file is truncated or not a NIfTI image.")
        if not compressed:
            available = path.stat().st_size
        elif _gzip_stated_size(path) == expected % (1 << 32):
            return
        else:
            available = _decompressed_size(path)
    except (OSError, EOFError, zlib.error, struct.error):
        raise InputError(f"Could not read {path}: the file is damaged, truncated or not a NIfTI image.") from None
    if available < expected:
        raise InputError(f"Could not read {path}: the file is truncated or not a NIfTI image.")


def _gzip_stated_size(path: Path) -> int:
    """The ISIZE field of a gzip file's trailer: its last member's uncompressed size mod 2**32."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]


def _decompressed_size(path: Path) -> int:
    with gzip.open(path, "rb") as handle:
        return sum(len(block) for block in iter(lambda: handle.read(1 << 22), b""))


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header offset plus voxel data size, from a NIfTI-1 or NIfTI-2 header (None if neither)."""
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif size == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        voxels = int(np.prod([max(1, d) for d in dims[1 : 1 + max(0, min(dims[0], 7))]], dtype=np.int64))
        return max(offset, size) + voxels * bitpix // 8
    return None


def dicom_series_ids(folder: str | os.PathLike) -> tuple[str, ...]:
    """The SeriesInstanceUIDs of the DICOM files directly in ``folder``, () for none, without ITK's
    "No Series were found" warning on stderr (a folder of NIfTI cases is not a mistake)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_dicom_series(folder: Path) -> list[SeriesInfo]:
    """All DICOM series directly in ``folder``."""
    if not any(folder.iterdir()):
        raise InputError(f"The folder {folder} is empty.")
    series_ids = dicom_series_ids(folder)
    if not series_ids:
        raise InputError(f"No DICOM series found in {folder}.")
    found = []
    for uid in series_ids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        header.LoadPrivateTagsOff()
        _read_or_explain(header.ReadImageInformation, Path(files[0]))

        def tag(key: str, reader: sitk.ImageFileReader = header) -> str:
            return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

        found.append(SeriesInfo(uid, tag(_TAG_SERIES_DESCRIPTION), tag(_TAG_SERIES_NUMBER), tag(_TAG_MODALITY), files))
    return found


def _tag_of_slice(reader: sitk.ImageSeriesReader, index: int, key: str) -> str:
    return reader.GetMetaData(index, key).strip() if reader.HasMetaDataKey(index, key) else ""


def _numbers(text: str) -> list[float]:
    return [float(value) for value in text.split("\\")]


def check_even_slices(positions: list[str], orientations: list[str], folder: Path) -> None:
    """Raise ``InputError`` when a DICOM series' slices are not evenly spaced along their normal.

    ITK stacks the files at their mean distance whatever the gaps, so a series with a missing file (an
    incomplete transfer) or two reconstructions under one UID would be read with the anatomy beyond the gap
    shifted and every volume wrong, with only a warning on stderr. Files without positions are not checked.
    """
    if len(positions) < 3 or not all(positions) or not all(orientations):
        return
    try:
        directions = np.array([_numbers(text) for text in orientations])
        points = np.array([_numbers(text) for text in positions])
    except ValueError:  # unreadable tags: ITK's stacking is all there is to go by
        return
    if directions.ndim != 2 or directions.shape[1] != 6 or points.ndim != 2 or points.shape[1] != 3:
        return
    if not np.allclose(directions, directions[0], atol=1e-3):
        raise InputError(
            f"The DICOM series in {folder} mixes slice orientations: it is not one stack of parallel slices "
            "(export the axial series alone)."
        )
    normal = np.cross(directions[0, :3], directions[0, 3:])
    along = points @ normal
    gaps = np.diff(np.sort(along))
    usual = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - usual)))
    stacked_in_order = bool(np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0))
    if usual > 0 and abs(gaps[worst] - usual) <= max(SLICE_GAP_TOLERANCE * usual, SLICE_GAP_TOLERANCE_MM):
        if stacked_in_order:
            return
        raise InputError(f"The files of the DICOM series in {folder} could not be put in slice order.")
    what = "a slice is missing" if gaps[worst] > usual else "duplicate slices, or two reconstructions in one series"
    raise InputError(
        f"The DICOM series in {folder} has unevenly spaced slices: {gaps[worst]:.2f} mm between slices "
        f"{worst + 1} and {worst + 2} of {len(positions)} (in position order) where the others are {usual:.2f} mm "
        f"apart ({what}?). "
        "Export the complete series again, or load it in 3D Slicer, harden the acquisition transform it adds "
        "(which resamples the slices evenly) and segment it there."
    )


def choose_series(candidates: list[SeriesInfo], wanted: str | None, folder: Path) -> SeriesInfo:
    """The series the user asked for, else the largest CT series (or largest of any, if none says CT)."""
    if wanted is not None:
        for info in candidates:
            if wanted.strip() in (info.uid, info.description, info.number):
                return info
        offered = "; ".join(f"{info.uid} ({info.description or 'no description'})" for info in candidates)
        raise InputError(f"No series '{wanted}' in {folder}; it holds: {offered}.")
    ct_series = [info for info in candidates if info.modality.upper() == "CT"] or candidates
    return max(ct_series, key=lambda info: len(info.files))


def validate_ct(image: sitk.Image) -> None:
    """Raise ``InputError`` unless ``image`` is a 3D scalar CT in HU that fits in memory.

    Real series hold padding outside the circular scan field (-3024, -2048) and metal above 4095: both are
    accepted (the model input neutralises them, ``intensity.robust_hu``); many voxels above 4095 are not.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The image has {image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector): "
            "a CT has one HU value per voxel."
        )
    if image.GetDimension() != 3:
        raise InputError(f"The image is {image.GetDimension()}D: a CT volume must be 3D (x, y, slices).")
    spacing = image.GetSpacing()
    if any(not MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(
            f"Voxel spacing {tuple(round(s, 4) for s in spacing)} mm is not plausible for a CT "
            f"(each must be between {MIN_SPACING_MM} and {MAX_SPACING_MM} mm)."
        )
    _check_fits_in_memory(image)
    hu = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(hu).all():
        raise InputError("The image contains NaN or infinite voxel values.")
    low, high = float(hu.min()), float(hu.max())
    if low == high:
        raise InputError(f"The image is empty: every voxel has the value {low:g}.")
    above = float(np.count_nonzero(hu > HU_RANGE[1])) / hu.size if high > HU_RANGE[1] else 0.0
    if low < PADDING_FLOOR_HU or above > MAX_SHARE_ABOVE_SCALE:
        raise InputError(
            f"Voxel values {low:g}..{high:g} ({above:.1%} above {HU_RANGE[1]:g}) are outside the CT range "
            f"{HU_RANGE[0]:g}..{HU_RANGE[1]:g} HU beyond padding and metal (is this a CT in Hounsfield units?)."
        )
    first_percentile = float(np.percentile(_sample(hu), 1))
    if first_percentile > AIR_PERCENTILE_MAX_HU:
        raise InputError(
            f"The image shows no air near -1000 HU (1st percentile {first_percentile:g}): "
            "it does not look like a CT in Hounsfield units (MR or rescaled data?)."
            + (" If it is a CT stored windowed as grey values 0..255 (as the Radiopaedia cases of COVID-19-CT-Seg, "
               "window -1250..250 HU), give its window: relseg segment --stored-window=-1250,250 "
               "(Python: relsegcore.imageio.hu_from_stored_window)." if in_grey_range(low, high) else "")
        )


def hu_from_stored_window(image: sitk.Image, window: tuple[float, float]) -> sitk.Image:
    """A CT stored windowed as grey values 0..255 back in HU, grey ``g`` -> ``low + g / 255 * (high - low)``.

    COVID-19-CT-Seg stores its Radiopaedia cases so, in the window -1250..250 HU: what the window clipped (bone,
    metal) stays at its edge, which the lungs and the infection do not need. An image with other values is
    refused rather than guessed at."""
    low, high = checked_window(window)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The image has several values per voxel (colour): a windowed CT has one grey value.")
    voxels = sitk.GetArrayViewFromImage(image)
    smallest, largest = float(np.min(voxels)), float(np.max(voxels))
    if not in_grey_range(smallest, largest):
        raise InputError(f"Voxel values {smallest:g}..{largest:g} are not grey values "
                         f"{STORED_GREY_RANGE[0]}..{STORED_GREY_RANGE[1]}: this CT is not stored windowed.")
    hu = sitk.GetImageFromArray(np.round(voxels / 255.0 * (high - low) + low).astype(np.int16))
    hu.CopyInformation(image)
    return hu


def checked_window(window: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` in HU as floats, refused unless both are finite and LOW is below HIGH."""
    low, high = (float(value) for value in window)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InputError(f"A stored window {low:g},{high:g} HU is not one: LOW must be below HIGH, both finite.")
    return low, high


def in_grey_range(smallest: float, largest: float) -> bool:
    """Whether voxel values ``smallest..largest`` fit the grey values a windowed CT is stored in."""
    return STORED_GREY_RANGE[0] <= smallest and largest <= STORED_GREY_RANGE[1]


def _check_fits_in_memory(image: sitk.Image) -> None:
    voxels = int(np.prod(image.GetSize(), dtype=np.int64))
    override = os.environ.get(MAX_VOXELS_ENV)
    if override:
        limit = int(override)
    else:
        limit = available_memory_bytes() // BYTES_PER_VOXEL_NEEDED
    if voxels > limit:
        raise InputError(
            f"The image has {voxels:,} voxels, more than this machine can segment ({limit:,}); "
            "crop or resample it first."
        )


def available_memory_bytes() -> int:
    """RAM available now (MemAvailable), falling back to total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _sample(values: np.ndarray, size: int = 1_000_000) -> np.ndarray:
    """A strided subset, so percentiles stay fast on large volumes."""
    flat = values.reshape(-1)
    step = max(1, flat.size // size)
    return flat[::step]


def to_canonical(image: sitk.Image) -> sitk.Image:
    """The image resampled without interpolation onto LPS axes: row 0 anterior, x to the patient's left."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def from_canonical(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A result computed on ``to_canonical(reference)`` put back on ``reference``'s exact grid.

    Axis-aligned cases are an exact permutation/flip (no interpolation). Anything else is
    resampled with nearest neighbour, which keeps labels as labels.
    """
    oriented = sitk.DICOMOrient(image, _orientation_code(reference))
    if same_grid(oriented, reference):
        oriented.CopyInformation(reference)
        return oriented
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def _orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def same_grid(image: sitk.Image, reference: sitk.Image, tolerance: float = 1e-4) -> bool:
    """Whether two images share size, origin (to 0.01 mm), spacing and direction."""
    return (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=tolerance * 100)
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=tolerance)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=tolerance)
    )


def _read_or_explain(read, path: Path):
    """Run a SimpleITK read, turning its RuntimeError into one sentence about the file."""
    try:
        return read()
    except RuntimeError as error:
        logger.debug("SimpleITK could not read %s: %s", path, error)
        raise InputError(f"Could not read {path}: the file is damaged, truncated or not an image.") from None
