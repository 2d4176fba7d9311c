"""The radiologist's corrected cases, kept so the site's model can learn from them.

A store is a folder with one sub-folder per case: the CT, the corrected labelmap, the model's
original prediction (so the edit can be measured) and ``case.json`` (when, which model, which
slices were edited, voxel counts, Dice of the original against the correction).

Crash safety: a case is written into ``.tmp-<case>-<pid>-<token>`` beside the cases, each
file fsynced, then renamed into place. An update renames the old case to
``.trash-<case>-<pid>-<token>``, renames the new one in and deletes the trash. Opening the
store clears what dead writers left: a trash whose case is missing (killed between the two
renames) is put back, everything else is deleted. So after a crash at any point a case is
either the old one or the new one, complete, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, RelSegError
from .fileutil import _fsync_dir, atomic_path, sha256_of
from .imageio import to_canonical
from .metrics import dice

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CT_FILE = "ct.nrrd"
CORRECTED_FILE = "corrected.nrrd"
ORIGINAL_FILE = "original.nrrd"
META_FILE = "case.json"
IMAGE_FILES = {"ct": CT_FILE, "corrected": CORRECTED_FILE, "original": ORIGINAL_FILE}
GEOMETRY_TOLERANCE = 1e-3
STALE_SCRATCH_SECONDS = 3600  # where a writer's liveness cannot be asked (Windows)

_SCRATCH = re.compile(r"^\.(?P<kind>tmp|trash)-(?P<folder>[a-z0-9_-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class CorrectionRecord:
    """One stored case: its folder and the metadata of ``case.json``."""

    case_id: str
    path: Path
    metadata: dict

    @property
    def edited(self) -> bool:
        return bool(self.metadata["edited"])

    @property
    def edited_slices(self) -> list[int]:
        """Axial slice indices (canonical LPS grid, z increasing superiorly) the user changed."""
        return list(self.metadata["edited_slices"])

    @property
    def model(self) -> dict:
        return dict(self.metadata["model"])

    @property
    def saved(self) -> str:
        return self.metadata["saved"]

    def read_ct(self) -> sitk.Image:
        return self._read(CT_FILE)

    def read_corrected(self) -> sitk.Image:
        return self._read(CORRECTED_FILE)

    def read_original(self) -> sitk.Image:
        return self._read(ORIGINAL_FILE)

    def verify(self) -> None:
        """Raise ``CorruptCase`` unless every file matches the checksum written with it."""
        for name, expected in self.metadata["files"].items():
            path = self.path / name
            if not path.is_file() or sha256_of(path) != expected["sha256"]:
                raise CorruptCase(f"correction case {self.case_id!r}: {name} is missing or changed")

    def _read(self, name: str) -> sitk.Image:
        try:
            return sitk.ReadImage(str(self.path / name))
        except RuntimeError as error:
            raise CorruptCase(f"correction case {self.case_id!r}: cannot read {name} ({error})") from None


class CorruptCase(RelSegError):
    """A stored case's files were changed or removed outside the store."""


@dataclass
class CaseSlices:
    """A case's axial slices on the canonical grid, for fine-tuning.

    ``images`` keep the CT's values and type (HU, or 8-bit for windowed 2D slices), ``masks``
    are the corrected labels, ``edited[k]`` says whether the user changed slice ``k``.
    """

    case_id: str
    images: np.ndarray  # (N, H, W)
    masks: np.ndarray  # (N, H, W) uint8
    edited: np.ndarray  # (N,) bool
    spacing: tuple[float, float, float]  # SimpleITK order (x, y, z)
    model: dict


class CorrectionStore:
    """A folder of corrected cases; opening it recovers from any interrupted write."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    def save(
        self, case_id: str, ct: sitk.Image, corrected: sitk.Image, original: sitk.Image, model: dict
    ) -> CorrectionRecord:
        """Store (or replace) a case. ``record.edited`` is False when nothing was changed: warn the user."""
        folder = case_folder_name(case_id)
        ct = _as_volume(ct, "CT")
        corrected = _as_label_volume(corrected, "corrected segmentation", ct)
        original = _as_label_volume(original, "original segmentation", ct)
        model = _checked_model(model)
        previous = self._read_record(self.root / folder)
        metadata = _describe(case_id, ct, corrected, original, model)
        metadata["created"] = previous.metadata["created"] if previous else metadata["saved"]
        metadata["revision"] = previous.metadata["revision"] + 1 if previous else 1

        staged = self._scratch("tmp", folder)
        try:
            staged.mkdir()
            images = {CT_FILE: ct, CORRECTED_FILE: corrected, ORIGINAL_FILE: original}
            for name, image in images.items():
                sitk.WriteImage(image, str(staged / name), True)
                _fsync_file(staged / name)
            metadata["files"] = {
                name: {"sha256": sha256_of(staged / name), "bytes": (staged / name).stat().st_size}
                for name in images
            }
            (staged / META_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            _fsync_file(staged / META_FILE)
            _fsync_dir(staged)
            self._commit(staged, self.root / folder)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        return CorrectionRecord(case_id, self.root / folder, metadata)

    def list(self) -> list[CorrectionRecord]:
        """Complete cases, by case identifier. Damaged folders are skipped with a warning."""
        records = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            record = self._read_record(folder)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda record: record.case_id)

    def get(self, case_id: str) -> CorrectionRecord:
        record = self._read_record(self.root / case_folder_name(case_id))
        if record is None:
            raise InputError(f"no correction is stored for case {case_id!r} in {self.root}")
        return record

    def remove(self, case_id: str) -> None:
        folder = self.root / case_folder_name(case_id)
        if not folder.is_dir():
            raise InputError(f"no correction is stored for case {case_id!r} in {self.root}")
        trash = self._scratch("trash", folder.name)
        os.rename(folder, trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def export(self, destination: str | os.PathLike) -> Path:
        """Copy every case to a ``.zip`` file or into another store folder; returns the destination."""
        destination = Path(destination)
        if destination.suffix.lower() == ".zip":
            return self._export_zip(destination)
        if destination.resolve() == self.root.resolve():
            raise InputError(f"cannot export the correction store {self.root} into itself")
        target = CorrectionStore(destination)
        for record in self.list():
            record.verify()
            target._install_copy(record.path)
        return destination

    def training_slices(self, case_ids: Iterable[str] | None = None) -> Iterator[CaseSlices]:
        """Per case, the canonical axial slices of CT and corrected mask, with an edited flag per slice."""
        records = self.list() if case_ids is None else [self.get(case_id) for case_id in case_ids]
        for record in records:
            ct = to_canonical(record.read_ct())
            mask = to_canonical(record.read_corrected())
            images = sitk.GetArrayFromImage(ct)
            edited = np.zeros(images.shape[0], dtype=bool)
            edited[record.edited_slices] = True
            yield CaseSlices(
                case_id=record.case_id,
                images=images,
                masks=sitk.GetArrayFromImage(mask).astype(np.uint8),
                edited=edited,
                spacing=tuple(ct.GetSpacing()),
                model=record.model,
            )

    # -- writing ---------------------------------------------------------------------------

    def _scratch(self, kind: str, folder: str) -> Path:
        return self.root / f".{kind}-{folder}-{os.getpid()}-{secrets.token_hex(4)}"

    def _commit(self, staged: Path, final: Path) -> None:
        """Rename a complete staged case into place, replacing any previous version."""
        if not final.exists():
            os.rename(staged, final)
            _fsync_dir(self.root)
            return
        trash = self._scratch("trash", final.name)
        os.rename(final, trash)
        try:
            os.rename(staged, final)
        except OSError:
            os.rename(trash, final)
            raise
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _install_copy(self, source: Path) -> None:
        staged = self._scratch("tmp", source.name)
        try:
            shutil.copytree(source, staged)
            for path in staged.iterdir():
                _fsync_file(path)
            _fsync_dir(staged)
            self._commit(staged, self.root / source.name)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def _export_zip(self, destination: Path) -> Path:
        records = self.list()
        with atomic_path(destination) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for record in records:
                record.verify()
                for path in sorted(record.path.iterdir()):
                    archive.write(path, f"{record.path.name}/{path.name}")
            index = [{"case_id": r.case_id, "folder": r.path.name, **r.metadata} for r in records]
            archive.writestr("corrections.json", json.dumps(index, indent=2) + "\n")
        return destination

    # -- reading and recovery -----------------------------------------------------------------

    def _read_record(self, folder: Path) -> CorrectionRecord | None:
        if not folder.is_dir():
            return None
        try:
            metadata = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            case_id = metadata["case_id"]
            complete = case_folder_name(case_id) == folder.name and all(
                (folder / name).is_file() and (folder / name).stat().st_size == entry["bytes"]
                for name, entry in metadata["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError, InputError) as error:
            logger.warning("Skipping damaged correction case %s: %s", folder, error)
            return None
        if not complete:
            logger.warning("Skipping damaged correction case %s: files missing or truncated", folder)
            return None
        return CorrectionRecord(case_id, folder, metadata)

    def _recover(self) -> None:
        """Undo what writers killed mid-write left behind (see the module docstring)."""
        for entry in sorted(self.root.iterdir()):
            match = _SCRATCH.match(entry.name)
            if not match or _writer_alive(int(match["pid"]), entry):
                continue
            final = self.root / match["folder"]
            if match["kind"] == "trash" and not final.exists():
                os.rename(entry, final)
                logger.warning("Restored correction case %s after an interrupted update", final.name)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        _fsync_dir(self.root)


def case_folder_name(case_id: str) -> str:
    """A folder name for ``case_id`` that is safe on every file system and case-insensitive ones.

    Identifiers that are not already lower-case ``[a-z0-9_-]`` get a hash suffix, so two
    different identifiers never share a folder.
    """
    if not isinstance(case_id, str) or not case_id.strip():
        raise InputError("a correction needs a non-empty case identifier")
    slug = re.sub(r"[^a-z0-9_-]+", "_", case_id.lower()).strip("_-")[:60] or "case"
    if slug == case_id:
        return slug
    return f"{slug}-{hashlib.sha256(case_id.encode('utf-8')).hexdigest()[:10]}"


def _as_volume(image: sitk.Image, what: str) -> sitk.Image:
    """A 3D single-component image; a 2D slice becomes a volume of one slice."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"the {what} must be a SimpleITK image, not {type(image).__name__}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} has {image.GetNumberOfComponentsPerPixel()} channels; expected one")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(f"the {what} is {image.GetDimension()}D; expected a 2D slice or a 3D volume")
    return image


def _as_label_volume(labels: sitk.Image, what: str, ct: sitk.Image) -> sitk.Image:
    """An 8-bit labelmap on exactly the CT's grid."""
    labels = _as_volume(labels, what)
    if labels.GetSize() != ct.GetSize():
        raise InputError(f"the {what} has size {labels.GetSize()} but the CT has {ct.GetSize()}")
    for name in ("Origin", "Spacing", "Direction"):
        mine, theirs = getattr(labels, f"Get{name}")(), getattr(ct, f"Get{name}")()
        if not np.allclose(mine, theirs, atol=GEOMETRY_TOLERANCE):
            raise InputError(f"the {what}'s {name.lower()} {mine} differs from the CT's {theirs}")
    values = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        raise InputError(f"the {what} holds non-integer values; expected a labelmap")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InputError(f"the {what} has labels outside 0..255")
    cast = sitk.Cast(labels, sitk.sitkUInt8)
    cast.CopyInformation(ct)
    return cast


def _checked_model(model: dict) -> dict:
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise InputError("the model that produced the original segmentation must be a dict with a 'name'")
    try:
        return json.loads(json.dumps(model))
    except (TypeError, ValueError) as error:
        raise InputError(f"the model description cannot be stored as JSON: {error}") from None


def _describe(case_id: str, ct: sitk.Image, corrected: sitk.Image, original: sitk.Image, model: dict) -> dict:
    """``case.json`` content: what changed between the model's prediction and the correction."""
    fixed = sitk.GetArrayFromImage(to_canonical(corrected))
    predicted = sitk.GetArrayFromImage(to_canonical(original))
    changed = fixed != predicted
    edited_slices = np.flatnonzero(changed.any(axis=(1, 2))).tolist()
    fixed_counts, predicted_counts = _label_counts(fixed), _label_counts(predicted)
    labels = sorted({int(label) for label in (*fixed_counts, *predicted_counts)})
    return {
        "format_version": FORMAT_VERSION,
        "case_id": case_id,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"version": None, "sha256": None, **model},
        "edited": bool(edited_slices),
        "edited_slices": edited_slices,
        "changed_voxels": int(np.count_nonzero(changed)),
        "voxel_counts": {"corrected": fixed_counts, "original": predicted_counts},
        "dice": dice(predicted > 0, fixed > 0),
        "dice_per_label": {str(label): dice(predicted == label, fixed == label) for label in labels},
        "size": list(ct.GetSize()),
        "spacing": list(ct.GetSpacing()),
        "ct_pixel_type": ct.GetPixelIDTypeAsString(),
    }


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    """Voxels per non-zero label (bincount: labels are uint8, far faster than a sort)."""
    counts = np.bincount(labels.ravel(), minlength=256)
    return {str(label): int(counts[label]) for label in np.flatnonzero(counts) if label}


def _writer_alive(pid: int, entry: Path) -> bool:
    """Whether the process that made a scratch folder may still be writing it."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return time.time() - entry.stat().st_mtime < STALE_SCRATCH_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())

