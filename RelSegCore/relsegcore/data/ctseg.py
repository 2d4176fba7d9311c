"""The ``covid-ct-seg-2d`` layout (``--data ctseg2d:DIR``) and splits by patient.

The layout: ``images/NNNN.png`` (8-bit, already in the ``full-slice-clahe`` appearance, never
transposed; the coronacases series are anterior up, every Radiopaedia series is stored posterior
up, spine at the top: ``upright=True`` turns such patients anterior up, ``--augment-series`` teaches both
instead), ``masks/NNNN.png``
(infection 0/255), ``lungs/NNNN.png`` (both lungs 0/255) and ``cases.csv`` (file, case,
source, order_in_case). Slice names are ``CASE/FILE`` so every split can go by patient.

Neighbouring slices of one case are near copies, and one patient can have several series
(``radiopaedia_10_85902_1`` and ``radiopaedia_10_85902_3``): every split here keeps a patient's
slices on one side.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from .orientation import posterior_up_groups
from .readers import SliceSet, read_gray_picture, resize_slices

CTSEG_TARGETS = {"infection": "masks", "lungs": "lungs"}


def read_ctseg2d(
    root: str | os.PathLike, target: str = "infection", size: int = 256, cases: list[str] | None = None,
    upright: bool = False,
) -> SliceSet:
    """Slices of a ``covid-ct-seg-2d`` folder with the ``target`` masks (``infection`` or ``lungs``) as class 1.

    ``cases`` keeps only those cases (or patients: ``radiopaedia_10`` selects both its series). ``upright``
    turns the slices and masks of the patients stored posterior up anterior up, as the folder's lung masks
    tell (``orientation.posterior_up_groups``), so a network learns chests the way the pipeline shows them.
    """
    root = Path(root)
    if target not in CTSEG_TARGETS:
        raise InputError(f"--target must be one of {', '.join(CTSEG_TARGETS)}, not {target!r}")
    rows = read_cases_csv(root)
    if cases is not None:
        rows = [row for row, chosen in zip(rows, selected_rows(rows, cases, root), strict=True) if chosen]
    if not rows:
        raise InputError(f"{root}: no slices selected")
    mask_dir = root / CTSEG_TARGETS[target]
    images, masks = [], []
    for row in rows:
        image = read_gray_picture(root / "images" / row["file"])
        mask_path = mask_dir / row["file"]
        if not mask_path.is_file():
            raise InputError(f"{root}: slice {row['file']} has no {target} mask {mask_path}")
        mask = (read_gray_picture(mask_path) > 127).astype(np.uint8)
        if image.shape != mask.shape:
            raise InputError(f"{root}: image {row['file']} is {image.shape} but its mask is {mask.shape}")
        images.append(resize_slices(image[None], size, order=1)[0])
        masks.append(resize_slices(mask[None], size, order=0)[0])
    names = [f"{row['case']}/{row['file']}" for row in rows]
    images, masks = np.stack(images), np.stack(masks)
    if upright:
        flipped = np.isin([patient_of(row["case"]) for row in rows], sorted(posterior_up_patients(root, rows)))
        images[flipped], masks[flipped] = images[flipped, ::-1], masks[flipped, ::-1]
    return SliceSet(images, masks, names, root.name)


def posterior_up_patients(root: Path, rows: list[dict[str, str]]) -> set[str]:
    """The patients among ``rows`` stored posterior up, told by the folder's own lung masks."""
    lungs = []
    for row in rows:
        path = root / CTSEG_TARGETS["lungs"] / row["file"]
        if not path.is_file():
            raise InputError(f"{root}: turning slices upright needs the lung masks, and {path} is missing")
        lungs.append(read_gray_picture(path) > 127)
    return posterior_up_groups(lungs, [patient_of(row["case"]) for row in rows])


def read_cases_csv(root: Path) -> list[dict[str, str]]:
    """The rows of ``root/cases.csv`` in the order of the slices (case, then order in case)."""
    path = root / "cases.csv"
    if not path.is_file():
        raise InputError(f"{root} is not a covid-ct-seg-2d folder: it has no cases.csv (columns file and case, "
                         "which keep each patient's slices together); without one, give its pictures as "
                         f"--images {root / 'images'} --masks {root / 'masks'}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "case"} <= set(rows[0]):
        raise InputError(f"{path} needs the columns file and case")
    return rows


def case_selection(cases: list[str], wanted: list[str]) -> tuple[list[bool], list[str]]:
    """Which of ``cases`` (case names, one per slice or volume) the ``wanted`` cases or patients name, and the
    wanted names that match none of them, sorted (a typo would otherwise select nothing, or everything else)."""
    chosen = set(wanted)
    unknown = sorted(chosen - set(cases) - {patient_of(case) for case in cases})
    return [case in chosen or patient_of(case) in chosen for case in cases], unknown


def selected_rows(rows: list[dict[str, str]], cases: list[str], root: Path) -> list[bool]:
    """Which ``cases.csv`` rows belong to the named cases or patients; a name that matches nothing is an
    error."""
    selected, unknown = case_selection([row["case"] for row in rows], cases)
    if unknown:
        raise InputError(f"{root}: no case or patient named {unknown[0]!r} in cases.csv")
    return selected


def patient_of(case: str) -> str:
    """The patient a case (CT series) belongs to: ``radiopaedia_10_85902_3`` -> ``radiopaedia_10``."""
    match = re.match(r"(radiopaedia_\d+)_", case)
    return match.group(1) if match else case


def patient_of_name(name: str) -> str:
    """The patient of a slice name: ``CASE/FILE`` (covid-ct-seg-2d) or ``CASE:zN`` (a slice of a CT volume)."""
    return patient_of(name.split("/", 1)[0].split(":", 1)[0])


def patient_folds(names: list[str], folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint sets of slice indices, each holding whole patients (shuffled by ``seed``), balanced
    by slice count: patients are dealt, largest first, to the fold with the fewest slices so far."""
    patients = [patient_of_name(name) for name in names]
    unique = sorted(set(patients))
    if not 2 <= folds <= len(unique):
        raise InputError(f"need 2 <= folds <= {len(unique)} patients, got {folds}")
    counts = {patient: patients.count(patient) for patient in unique}
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = sorted((unique[i] for i in order), key=lambda p: -counts[p])  # stable: ties keep the shuffle
    members: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for patient in shuffled:
        target = int(np.argmin(sizes))
        members[target].append(patient)
        sizes[target] += counts[patient]
    index_of = {patient: fold for fold, group in enumerate(members) for patient in group}
    assigned = np.array([index_of[p] for p in patients])
    return [np.flatnonzero(assigned == fold) for fold in range(folds)]


def patient_split(names: list[str], folds: int, fold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of ``fold``: no patient on both sides."""
    parts = patient_folds(names, folds, seed)
    if not 0 <= fold < folds:
        raise InputError(f"--fold must lie in 0..{folds - 1}, not {fold}")
    return np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold])), parts[fold]
