"""The non-COVID lung lesion sets that pre-train the general encoder, and ``--data KIND:PATH``.

Every set goes through the ordinary readers; a recipe entry only chooses reader options.
Choices: LIDC crops are ~30 mm around a nodule, so they are placed at the lung-crop scale
(``context="lesion"``) and at most 3 evenly spread slices are kept per nodule (neighbouring
slices 1-2.5 mm apart are near copies; all 7,729 would take 1 GB). Pleural effusion and the
lung tumour volumes are whole chests, cropped to the lungs like the COVID slices. The MSD
patches are already windowed and placed at their 2 mm scale.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .ctseg import read_ctseg2d
from .intensity import LUNG_CROP
from .readers import SliceSet, read_ct_volumes, read_decathlon, read_image_folder, read_patches_npz, read_volume_pairs

DATA_KINDS = ("pairs", "folder", "decathlon", "npz", "slices", "ct", "ctseg2d")


@dataclass(frozen=True)
class DatasetSpec:
    """One set under the data root: reader ``kind``, relative ``paths`` and reader options."""

    kind: str
    paths: tuple[str, ...]
    options: dict = field(default_factory=dict)


GENERAL_DATASETS: dict[str, DatasetSpec] = {
    "lidc": DatasetSpec("pairs", ("lidc-nodules",), {"context": "lesion", "max_slices_per_volume": 3}),
    "pleural-effusion": DatasetSpec("pairs", ("pleural-effusion",), {"context": "lungs"}),
    "lung-tumor": DatasetSpec("pairs", ("lung-tumor-volumes",), {"context": "lungs"}),
    "msd-patches": DatasetSpec("npz", ("msd-lung-tumor-patches/val_patches.npz",
                                       "msd-lung-tumor-patches/test_patches.npz"), {"spacing_mm": 2.0}),
}


def read_general_sets(
    data_root: str | os.PathLike, names: tuple[str, ...] = tuple(GENERAL_DATASETS), size: int = 256,
    cache_dir: str | os.PathLike | None = None, limit: int | None = None, recipe: str = LUNG_CROP,
) -> SliceSet:
    """The named recipe sets under ``data_root`` as one ``SliceSet`` (each set's ``source`` is its name);
    whole-chest volumes are rendered by ``recipe``."""
    unknown = [name for name in names if name not in GENERAL_DATASETS]
    if unknown:
        raise InputError(f"unknown general data set {unknown[0]!r}; choose from {', '.join(GENERAL_DATASETS)}")
    parts = []
    for name in names:
        spec = GENERAL_DATASETS[name]
        for relative in spec.paths:
            path = Path(data_root) / relative
            part = read_kind(spec.kind, path, size=size, cache_dir=cache_dir, limit=limit, recipe=recipe,
                             **spec.options)
            parts.append(dataclasses.replace(part, source=name))
    return SliceSet.concat(parts)


def parse_data_spec(spec: str) -> tuple[str, Path]:
    """``"KIND:PATH"`` -> ``(kind, Path)``, kind one of ``DATA_KINDS``."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise InputError(f"--data {spec!r} must be KIND:PATH with KIND one of {', '.join(DATA_KINDS)}")
    return kind, Path(path).expanduser()


def read_dataset_spec(spec: str, size: int = 256, cache_dir: str | os.PathLike | None = None,
                      recipe: str = LUNG_CROP, **options) -> SliceSet:
    """Read a user's ``--data KIND:PATH`` set.

    Kinds: ``pairs:DIR``, ``folder:DIR``, ``decathlon:DIR``, ``npz:FILE``, ``slices:FILE``, ``ct:DIR`` or
    ``ct:DIR/GLOB`` (CT volumes without masks: lung slices, all background), ``ctseg2d:DIR`` (the
    ``covid-ct-seg-2d`` layout, infection masks). ``recipe`` renders HU volumes as a model with that
    ``preprocessing`` recipe sees them; ``options`` go to the kind's reader (e.g. ``slices_per_volume`` of
    ``ct:``).
    """
    kind, path = parse_data_spec(spec)
    if not path.exists() and not (kind == "ct" and path.parent.is_dir()):
        raise InputError(f"--data {spec!r}: {path} does not exist")
    return read_kind(kind, path, size=size, cache_dir=cache_dir, recipe=recipe, **options)


def read_kind(kind: str, path: Path, size: int = 256, cache_dir: str | os.PathLike | None = None,
              limit: int | None = None, recipe: str = LUNG_CROP, **options) -> SliceSet:
    """Dispatch to the reader of ``kind`` (folders of pictures and npz files are quick and not cached); the
    readers of HU volumes render whole-chest slices by ``recipe``, the others are pictures already."""
    if kind == "pairs":
        return read_volume_pairs(path, size=size, cache_dir=cache_dir, limit=limit, recipe=recipe, **options)
    if kind == "decathlon":
        return read_decathlon(path, size=size, cache_dir=cache_dir, limit=limit, recipe=recipe, **options)
    if kind == "folder":
        return read_image_folder(path, size=size, limit=limit, **options)
    if kind == "slices":  # a prepared SliceSet (relseg pretrain-general --save-slices): train anywhere
        return SliceSet.load(path)
    if kind == "npz":
        return read_patches_npz(path, size=size, limit=limit, **options)
    if kind == "ct":  # CT volumes without masks: all background (negatives)
        return read_ct_volumes(path, size=size, limit=limit, cache_dir=cache_dir, recipe=recipe, **options)
    if kind == "ctseg2d":  # the covid-ct-seg-2d layout (already rendered slices)
        return read_ctseg2d(path, size=size, **options)
    raise InputError(f"unknown data kind {kind!r}; choose from {', '.join(DATA_KINDS)}")
