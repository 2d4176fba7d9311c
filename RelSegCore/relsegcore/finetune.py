"""Fine-tuning a model on the radiologist's corrections, measured and versioned.

The new version starts from the parent model's weights; the general encoder (non-COVID
knowledge) stays frozen while the target encoder and decoder train briefly at a low learning
rate, with the relation loss as in stage 2. Edited slices are drawn more often than unedited
ones, which are replayed so the model keeps what it already got right.

Guard against forgetting: part of the corrected cases (by case, deterministic by seed), given
held-out slices, or a site folder's other cases (``corrections_and_guard``: never a near copy of
a corrected slice) are kept out of training and scored before and after. A version that
is worse there is still written (its card says so, with the numbers) but never becomes the
default model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import intensity
from .data.readers import picture_fingerprint
from .device import select_device
from .errors import InputError
from .models import EnsembleNetwork, NetworkConfig
from .progress import Progress
from .training import (
    RelationConfig,
    TrainConfig,
    TrainResult,
    distributed_context,
    images_to_tensor,
    predict_labels,
    train,
)
from .zoo import ModelCard, find_model, save_model, verified_network

DEFAULT_ITERATIONS = 60  # 16 real 256 px slices, batch 8: 352 CPU-seconds, about 3 min on 2 free cores
DEFAULT_BATCH_SIZE = 8
DEFAULT_LEARNING_RATE = 5e-4  # a quarter of stage 2's: adjust the model, do not retrain it
DEFAULT_TRAINABLE = "all"  # the target encoder, decoder and head (training.TRAINABLE)
EDITED_WEIGHT = 3.0  # an edited slice is drawn this many times as often as an unedited one
HOLDOUT_FRACTION = 0.25
GUARD_GAP = 3  # slices of one case closer than this to a corrected slice are near copies of it
GUARD_MAX_SLICES = 64  # scored twice; one pass of the shipped network: 23 s on one busy CPU thread
_FT_SUFFIX = re.compile(r"\+ft(\d+)$")


@dataclass
class FinetuneSlices:
    """Slices in the model's input appearance, each with its case and whether the user edited it."""

    images: np.ndarray  # uint8 (N, S, S)
    masks: np.ndarray  # uint8 (N, S, S) class indices
    edited: np.ndarray  # bool (N,)
    cases: list[str]  # case identifier of each slice
    source: str = ""
    fingerprints: list[str] | None = None  # picture_fingerprint of each slice's picture as stored, when it has one

    def __post_init__(self) -> None:
        count = len(self.images)
        if self.images.shape != self.masks.shape or self.images.ndim != 3:
            raise InputError(f"images {self.images.shape} and masks {self.masks.shape} must be one (N, H, W) shape")
        if len(self.edited) != count or len(self.cases) != count:
            raise InputError(f"need one edited flag and one case per slice: {count} slices, "
                             f"{len(self.edited)} flags, {len(self.cases)} cases")
        if self.fingerprints is not None and len(self.fingerprints) != count:
            raise InputError(f"need one fingerprint per slice: {count} slices, {len(self.fingerprints)} fingerprints")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> FinetuneSlices:
        prints = None if self.fingerprints is None else [self.fingerprints[i] for i in indices]
        return FinetuneSlices(self.images[indices], self.masks[indices], self.edited[indices],
                              [self.cases[i] for i in indices], self.source, prints)


@dataclass
class FinetuneResult:
    path: Path  # the new model's weights (its card beside them)
    card: ModelCard
    dice_before: float  # mean per-case Dice on the held-out slices, parent model
    dice_after: float  # the same, fine-tuned model
    accepted: bool  # not worse on the held-out slices
    message: str  # one paragraph for the user, with the numbers
    is_default: bool = False
    history: list[dict] = field(default_factory=list)  # training log rows (loss per stretch of iterations)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- inputs


def slices_from_folder(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, size: int,
                       multiclass: bool = False) -> FinetuneSlices:
    """A 2D image folder (COVID-SemiSeg layout): every slice is its own case and counts as edited.

    Fingerprints are of the pictures as stored (before resizing or turning upright), as ``relseg
    evaluate`` computes them."""
    from .data.readers import folder_fingerprints, read_image_folder

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    if images_dir.parent != masks_dir.parent:
        raise InputError("the images and masks folders must be siblings (ROOT/images and ROOT/masks)")
    data = read_image_folder(images_dir.parent, size=size, image_dir=images_dir.name, mask_dir=masks_dir.name,
                             multiclass=multiclass)
    return FinetuneSlices(data.images, data.masks, np.ones(len(data), bool), list(data.names), str(images_dir),
                          folder_fingerprints(images_dir, masks_dir))


def slices_from_store(store_dir: str | os.PathLike, preprocessing: dict,
                      case_ids: Iterable[str] | None = None) -> FinetuneSlices:
    """Every axial slice with lung of every stored case, prepared exactly as ``pipeline.segment`` prepares it
    for a model whose card has this ``preprocessing``.

    HU slices go through the model's recipe (``intensity.model_input``: whole CLAHE slices for the 2.x
    models, lung-window crops with the lungs of ``lungs.segment_lungs_array`` for 1.x); 8-bit slices are
    taken as already in the model's appearance (only resized).
    """
    from .corrections import CorrectionStore

    if not Path(store_dir).is_dir():
        raise InputError(f"the correction store {store_dir} does not exist")
    images, masks, edited, cases = [], [], [], []
    for case in CorrectionStore(store_dir).training_slices(case_ids):
        for z, (image, mask) in _case_inputs(case.images, case.masks, case.spacing, preprocessing):
            images.append(image)
            masks.append(mask)
            edited.append(bool(case.edited[z]))
            cases.append(case.case_id)
    if not images:
        raise InputError(f"the correction store {store_dir} holds no slice with lung to learn from")
    return FinetuneSlices(np.stack(images), np.stack(masks), np.array(edited), cases, str(store_dir))


def slices_from_ctseg2d(root: str | os.PathLike, card: ModelCard, cases: Sequence[str] | None = None,
                        guard: bool = True, seed: int = 0, fingerprint: bool = True,
                        ) -> tuple[FinetuneSlices, FinetuneSlices | None]:
    """The corrected slices of a ``covid-ct-seg-2d`` folder (those of ``cases``, cases or patients; every
    slice when None) and the guard's slices from the rest (``corrections_and_guard``; None without ``guard``).

    Fingerprints (of the pictures as stored, as ``relseg evaluate`` computes them) go to the model card;
    ``fingerprint=False`` skips them for slices that only score the guard.
    """
    from .data.ctseg import patient_of, read_cases_csv, read_ctseg2d, selected_rows
    from .data.readers import read_gray_picture

    check_ctseg_model(card)
    root = Path(root)
    rows = read_cases_csv(root)
    data = read_ctseg2d(root, size=int(card.preprocessing.get("input_size", 256)),  # in the order of rows
                        upright=bool(card.preprocessing.get("upright")))
    names = [row["case"] for row in rows]
    corrected = np.ones(len(rows), bool) if cases is None else np.array(selected_rows(rows, list(cases), root))
    if guard:
        trained, held = corrections_and_guard(names, case_orders(rows), corrected, [patient_of(c) for c in names],
                                              seed=seed)
    else:
        trained, held = np.flatnonzero(corrected), None
    site = FinetuneSlices(data.images, data.masks, np.ones(len(rows), bool), names, f"ctseg2d:{root}")
    prints = ([picture_fingerprint(read_gray_picture(root / "images" / rows[i]["file"])) for i in trained]
              if fingerprint else None)
    corrections = dataclasses.replace(site.subset(trained), fingerprints=prints)
    return corrections, None if held is None else site.subset(held)


def check_ctseg_model(card: ModelCard) -> None:
    """Refuse a model that does not see ``covid-ct-seg-2d`` slices as they are: whole 256 px CLAHE slices
    (``full-slice-clahe``) with infection/background masks. Fine-tuned on them, a lung-crop model would
    learn an input ``relseg segment`` never gives it, while its card still describes lung crops."""
    recipe = intensity.recipe_of(card.preprocessing)
    if recipe != intensity.FULL_SLICE_CLAHE:
        raise InputError(
            f"{card.name} sees {recipe} slices (lung-window crops), but ctseg2d slices are whole CLAHE slices "
            f"({intensity.FULL_SLICE_CLAHE}): fine-tuned on them it would learn an input relseg segment never "
            f"gives it. Fine-tune a {intensity.FULL_SLICE_CLAHE} model (relseg train --data ctseg2d:DIR --export "
            f"NAME makes one), or give corrections in its appearance (--store, --images/--masks)")
    if len(card.classes) != 2:
        raise InputError(f"ctseg2d masks are infection or background, but {card.name} has "
                         f"{len(card.classes)} classes")


def case_orders(rows: list[dict[str, str]]) -> list[int]:
    """Each ``cases.csv`` row's ``order_in_case``, or its position within its case where that is blank."""
    positions: dict[str, int] = {}
    orders = []
    for row in rows:
        position = positions[row["case"]] = positions.get(row["case"], -1) + 1
        value = row.get("order_in_case") or str(position)
        if not value.lstrip("-").isdigit():
            raise InputError(f"cases.csv: order_in_case of {row['file']} is {value!r}, not a whole number")
        orders.append(int(value))
    return orders


def _case_inputs(volume: np.ndarray, labels: np.ndarray, spacing, preprocessing: dict):
    """(z, (image, mask)) for each slice with lung; masks are cropped with the image's box."""
    if volume.dtype == np.uint8:
        lungs = np.ones(volume.shape, np.uint8)  # already windowed and cropped slices
    else:
        from .lungs import segment_lungs_array

        lungs = segment_lungs_array(volume, spacing)
    for z in np.flatnonzero(lungs.reshape(len(lungs), -1).any(axis=1)):
        image, box = intensity.model_input(volume[z], lungs[z], preprocessing)
        yield int(z), (image, intensity.crop_resize(labels[z], box, len(image), order=0))


def holdout_split(cases: Sequence[str], fraction: float = HOLDOUT_FRACTION,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) slice indices, whole cases on one side; deterministic by seed."""
    unique = sorted(set(cases))
    if len(unique) < 2:
        raise InputError("fine-tuning needs corrections of at least 2 cases to hold one out for the "
                         "before/after check, or separate held-out slices")
    if not 0 < fraction < 1:
        raise InputError(f"the held-out fraction must lie between 0 and 1, not {fraction}")
    count = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held = {unique[i] for i in np.random.default_rng(seed).permutation(len(unique))[:count]}
    is_held = np.array([case in held for case in cases])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def guard_candidates(cases: Sequence[str], orders: Sequence[int], corrected: np.ndarray,
                     patients: Sequence[str] | None = None, gap: int = GUARD_GAP) -> np.ndarray:
    """Indices of the uncorrected slices the guard may score: those of a patient with no corrected slice,
    and those of a corrected case at least ``gap`` slices (``orders``) from each of its corrected slices.

    A neighbour of a corrected slice is a near copy of it and would flatter the fine-tuned model; another
    series of a corrected patient (``patients``, default: each case its own patient) has no order to
    compare with, so it is left out too.
    """
    corrected = np.asarray(corrected, bool)
    orders = np.asarray(orders, int)
    cases = np.asarray(cases, dtype=object)
    patients = cases if patients is None else np.asarray(patients, dtype=object)
    if not len(cases) == len(orders) == len(corrected) == len(patients):
        raise InputError("need one case, order, patient and corrected flag per slice")
    corrected_patients = set(patients[corrected])
    keep = []
    for i in np.flatnonzero(~corrected):
        if patients[i] not in corrected_patients:
            keep.append(i)
            continue
        near = orders[corrected & (cases == cases[i])]
        if len(near) and np.abs(near - orders[i]).min() >= gap:
            keep.append(i)
    return np.array(keep, dtype=int)


def spread(indices: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``indices``, evenly spaced along them, so each case keeps its share and
    scoring the guard stays quick."""
    if len(indices) <= limit:
        return np.asarray(indices, dtype=int)
    return np.asarray(indices)[np.linspace(0, len(indices) - 1, limit).round().astype(int)]


def corrections_and_guard(cases: Sequence[str], orders: Sequence[int], corrected: np.ndarray,
                          patients: Sequence[str] | None = None, gap: int = GUARD_GAP,
                          limit: int = GUARD_MAX_SLICES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(trained, guard) slice indices of a site's folder: the corrected slices, and at most ``limit`` of
    the ``guard_candidates``. When there are none (every slice corrected), whole patients of the
    corrections are held out instead, as ``holdout_split`` does; with one patient only, some of its
    corrected slices far enough from the others (``spaced_holdout``)."""
    corrected = np.asarray(corrected, bool)
    if not corrected.any():
        raise InputError("no corrected slice selected")
    candidates = guard_candidates(cases, orders, corrected, patients, gap)
    trained = np.flatnonzero(corrected)
    if len(candidates):
        return trained, spread(candidates, limit)
    groups = [list(cases if patients is None else patients)[i] for i in trained]
    if len(set(groups)) < 2:
        kept, held = spaced_holdout([cases[i] for i in trained], [orders[i] for i in trained], gap)
    else:
        kept, held = holdout_split(groups, seed=seed)
    return trained[kept], spread(trained[held], limit)


def spaced_holdout(cases: Sequence[str], orders: Sequence[int], gap: int = GUARD_GAP,
                   fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of one patient's corrected slices: every ``1/fraction``-th slice in order
    is held out when no kept slice of its case lies within ``gap`` of it (a near copy would flatter the
    guard). Corrections too close together for that are refused, with what to do instead."""
    rank = sorted(range(len(cases)), key=lambda i: (cases[i], orders[i]))
    step = max(2, round(1 / fraction))
    chosen = set(rank[step // 2::step])
    held = [i for i in chosen if all(abs(orders[i] - orders[j]) >= gap for j in range(len(cases))
                                     if j not in chosen and cases[j] == cases[i])]
    if not held:
        raise InputError(f"the corrections come from one patient and lie within {gap} slices of each other, so "
                         "none can be held out for the before/after check: give the other slices of the patient "
                         "as --guard ctseg2d:DIR (or --holdout-images/--holdout-masks)")
    is_held = np.isin(np.arange(len(cases)), held)
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


# ----------------------------------------------------------------------------- scoring


def holdout_dice(network: torch.nn.Module, data: FinetuneSlices, device: torch.device,
                 threshold: float = 0.5, flip: bool = False) -> float:
    """Mean over cases of each case's Dice of infection (all its slices pooled; both empty = 1), labels decided
    as the pipeline decides them: at the parent card's ``threshold``, averaged with the mirror if its card flips."""
    network.to(device)
    images = images_to_tensor(data.images, device)
    predicted = predict_labels(network, images, threshold=threshold, flip=flip).cpu().numpy() > 0
    reference = data.masks > 0
    scores = []
    for case in dict.fromkeys(data.cases):
        rows = np.array([c == case for c in data.cases])
        overlap = np.count_nonzero(predicted[rows] & reference[rows])
        total = np.count_nonzero(predicted[rows]) + np.count_nonzero(reference[rows])
        scores.append(2.0 * overlap / total if total else 1.0)
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- versions


def child_version(parent_version: str, number: int | None = None) -> str:
    """``1.0.0`` -> ``1.0.0+ft1``; ``1.0.0+ft1`` -> ``1.0.0+ft2`` (a local version label)."""
    match = _FT_SUFFIX.search(parent_version)
    base = parent_version[: match.start()] if match else parent_version
    return f"{base}+ft{number if number is not None else (int(match[1]) + 1 if match else 1)}"


def registry_name(parent: ModelCard, taken: set[str]) -> tuple[str, str]:
    """A free ``<root>-ftN`` name and its version ``<base>+ftN`` for a version kept in the registry."""
    root = re.sub(r"-ft\d+$", "", parent.name)
    match = _FT_SUFFIX.search(parent.version)
    number = int(match[1]) + 1 if match else 1
    while f"{root}-ft{number}" in taken:
        number += 1
    return f"{root}-ft{number}", child_version(parent.version, number)


# ----------------------------------------------------------------------------- fine-tuning


def finetune(
    model: str | os.PathLike,
    images: np.ndarray,
    masks: np.ndarray,
    edited: np.ndarray | None = None,
    out: str | os.PathLike | None = None,
    *,
    cases: Sequence[str] | None = None,
    fingerprints: Sequence[str] | None = None,
    holdout_images: np.ndarray | None = None,
    holdout_masks: np.ndarray | None = None,
    holdout_cases: Sequence[str] | None = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    registry_home: str | os.PathLike | None = None,
    make_default: bool = False,
    device: str = "auto",
    iterations: int = DEFAULT_ITERATIONS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    edited_weight: float = EDITED_WEIGHT,
    trainable: str = DEFAULT_TRAINABLE,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    relation: str | None = None,
    augment_strength: float = 1.0,
    source: str = "",
    command: str | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """Fine-tune ``model`` on corrected slices and write the new version with its card.

    ``images``/``masks``: uint8 ``(N, H, W)`` slices in the model's input appearance and
    their corrected labels (resized to the model's input size if needed). ``edited`` marks
    the slices the user changed (all, when None). ``cases`` gives each slice's case for the
    held-out split (each slice its own case when None); ``holdout_images``/``holdout_masks``
    (of ``holdout_cases``) replace that split. ``fingerprints``: ``picture_fingerprint`` of each
    slice's picture as stored (default: of ``images`` as given); the card lists those of the slices
    trained on, with the parent's, so ``relseg evaluate`` warns when scored on them.
    ``out`` (``NAME.pt``) writes the model there; without it the model
    goes into the registry at ``registry_home`` and becomes the default only when
    ``make_default`` is asked *and* it is not worse on the held-out slices.
    ``trainable``: which parameters learn (``training.TRAINABLE``). ``replay``: (images, masks) of the parent's
    own training slices, drawn as unedited slices beside the corrections so the model keeps what it knew.
    ``relation``: the relation-loss reading (default ``encoders`` when the model has a
    general encoder). Under ``torchrun`` every rank trains (DistributedDataParallel), rank 0 alone scores the
    held-out slices and writes the model, and every rank returns rank 0's result.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    parent = _find_parent(model, registry_home)
    size, num_classes = int(parent.preprocessing.get("input_size", 256)), len(parent.classes)
    data = _as_slices(images, masks, edited, cases, size, num_classes, source, fingerprints)
    if holdout_images is not None:
        held = _as_slices(holdout_images, holdout_masks, None, holdout_cases, size, num_classes, "held-out slices")
        trained = data
    else:
        train_idx, held_idx = holdout_split(data.cases, holdout_fraction, seed)
        trained, held = data.subset(train_idx), data.subset(held_idx)
    out_path = _checked_out(out, parent)
    config_network = parent.member_config()
    reading = relation or ("encoders" if config_network.use_general_encoder else "none")
    if reading == "encoders" and not config_network.use_general_encoder:
        raise InputError(f"the model {parent.name} has no general encoder for the 'encoders' relation loss")
    torch_device = select_device(device)
    network, parent_state = verified_network(parent)

    first_rank = distributed_context()[0] == 0  # under torchrun every rank trains; rank 0 alone scores and writes
    progress.update(0.0, "Scoring the current model")
    dice_before = holdout_dice(network, held, torch_device, parent.threshold, parent.flip_tta) if first_rank else 0.0
    with tempfile.TemporaryDirectory(prefix="relseg-finetune-") as work:
        config = TrainConfig(
            out_dir=Path(work), network=config_network, iterations=iterations, batch_size=batch_size,
            learning_rate=learning_rate, warmup_iterations=max(1, iterations // 10), seed=seed,
            freeze_general=True, relation=RelationConfig(reading=reading), augment_strength=augment_strength,
            validate_every=max(1, math.ceil(iterations / 6)), checkpoint_every=iterations, device=device,
            trainable=trainable,
        )
        # an ensemble learns member by member, each from its own weights, on the same corrections
        members = network.member_states() if isinstance(network, EnsembleNetwork) else [parent_state]
        result = _train_members(config, members, _with_replay(trained, replay, size, num_classes), edited_weight,
                                progress)
    if not first_rank:
        return _result_of_first_rank(None)
    progress.update(0.95, "Scoring the fine-tuned model")
    dice_after = holdout_dice(result.network, held, torch_device, parent.threshold, parent.flip_tta)
    accepted = dice_after >= dice_before

    command = command or f"relsegcore.finetune.finetune(model={str(model)!r}, iterations={iterations}, seed={seed})"
    card = _child_card(parent, trained, held, config, result, (dice_before, dice_after), accepted,
                       {"command": command, "edited_weight": float(edited_weight)})
    path, is_default = _save_child(result.network, card, parent, out_path, registry_home, make_default and accepted)
    message = guard_message(parent, card, dice_before, dice_after, len(held), accepted, make_default, is_default)
    progress.update(1.0, "Done")
    return _result_of_first_rank(FinetuneResult(
        path=path, card=card, dice_before=dice_before, dice_after=dice_after, accepted=accepted, message=message,
        is_default=is_default, history=result.history, seconds=time.perf_counter() - started))


def _result_of_first_rank(result: FinetuneResult | None) -> FinetuneResult:
    """Rank 0's result on every rank of a torchrun (the others trained beside it but wrote nothing); ``result``
    itself in a single process."""
    if not dist.is_initialized():
        return result
    shared = [result]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _with_replay(trained: FinetuneSlices, replay: tuple[np.ndarray, np.ndarray] | None, size: int,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, edited) to train on: the corrected slices, then the parent's replayed ones as unedited."""
    if replay is None:
        return trained.images, trained.masks, trained.edited
    replayed = _as_slices(replay[0], replay[1], np.zeros(len(replay[0]), bool), None, size, num_classes, "replay")
    return (np.concatenate([trained.images, replayed.images]), np.concatenate([trained.masks, replayed.masks]),
            np.concatenate([trained.edited, replayed.edited]))


def _train_members(config: TrainConfig, members: list[dict[str, torch.Tensor]],
                   slices: tuple[np.ndarray, np.ndarray, np.ndarray], edited_weight: float,
                   progress: Progress) -> TrainResult:
    """Each member's weights (one network's, or an ensemble's each) trained on the same slices, edited ones
    drawn ``edited_weight`` times as often; the progress runs from 5 to 95 % over the members."""
    images, masks, edited = slices
    count = len(members)
    results = [train(dataclasses.replace(config, out_dir=Path(config.out_dir) / f"member{i}"), images, masks,
                     progress=_span(progress, 0.05 + 0.9 * i / count, 0.05 + 0.9 * (i + 1) / count),
                     resume=False, initial_state=state, sample_weights=sample_weights(edited, edited_weight))
               for i, state in enumerate(members)]
    return _as_one(results, config.network)


def _save_child(network: torch.nn.Module, card: ModelCard, parent: ModelCard, out_path: Path | None,
                registry_home, make_default: bool) -> tuple[Path, bool]:
    """Write the fine-tuned model at ``out_path`` (named by its file), or else into the registry; return its path
    and whether it became the default."""
    if out_path is not None:
        card.name, card.version = out_path.stem, child_version(parent.version)
        return save_model(network, card, out_path.parent), False
    return _register(network, card, parent, registry_home, make_default)


def _as_one(results: list[TrainResult], config: NetworkConfig) -> TrainResult:
    """The fine-tuned model: the one network, or the ensemble of the fine-tuned members (their histories tagged
    with the member, their seconds added)."""
    if len(results) == 1:
        return results[0]
    network = EnsembleNetwork.of(config, [result.network.state_dict() for result in results])
    history = [{**row, "member": i} for i, result in enumerate(results) for row in result.history]
    return TrainResult(network=network, history=history, final_val_dice=None, best_val_dice=None,
                       seconds=sum(result.seconds for result in results))


def sample_weights(edited: np.ndarray, edited_weight: float = EDITED_WEIGHT) -> np.ndarray:
    """Relative chance of each slice being drawn: edited slices ``edited_weight``, the rest 1 (replay)."""
    return np.where(np.asarray(edited, bool), float(edited_weight), 1.0)


def guard_message(parent: ModelCard, card: ModelCard, before: float, after: float, held_slices: int,
                  accepted: bool, asked_default: bool, is_default: bool) -> str:
    """What happened, with the numbers, in words for the radiologist."""
    scores = (f"held-out Dice {before:.3f} -> {after:.3f} ({after - before:+.3f}) on {held_slices} held-out "
              f"slice(s)")
    if not accepted:
        return (f"{card.name} {card.version} is WORSE than {parent.name} {parent.version}: {scores}. "
                f"It was saved but NOT made the default; keep using {parent.name}.")
    default = (" and is now the default model" if is_default else
               "; it is not the default until you choose it" if not asked_default else "")
    return f"{card.name} {card.version} is not worse than {parent.name} {parent.version}: {scores}{default}."


def _find_parent(model: str | os.PathLike, registry_home) -> ModelCard:
    """A model path, or a name looked up in the registry at ``registry_home`` (else everywhere ``zoo`` looks)."""
    if registry_home is None or Path(model).suffix in (".pt", ".json") or Path(model).exists():
        return find_model(model)
    from .registry import ModelRegistry

    return ModelRegistry(registry_home).card(str(model))


def _span(progress: Progress, start: float, stop: float) -> Progress:
    """A Progress whose 0..1 maps onto ``start..stop`` of ``progress`` (and cancels with it)."""
    return Progress(callback=lambda fraction, stage: progress.update(start + (stop - start) * fraction, stage))


def _as_slices(images, masks, edited, cases, size: int, num_classes: int, source: str,
               fingerprints: Sequence[str] | None = None) -> FinetuneSlices:
    """Checked uint8 slices at the model's input size, masks as the model's class indices; without
    ``fingerprints``, those of the pictures as given (before resizing)."""
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim != 3 or images.shape != masks.shape or len(images) == 0:
        raise InputError(f"need non-empty (N, H, W) images and masks of the same shape, got {images.shape} "
                         f"and {masks.shape}")
    if images.dtype != np.uint8:
        raise InputError(f"fine-tuning images must be 8-bit slices in the model's appearance, not {images.dtype}")
    masks = (masks > 0).astype(np.uint8) if num_classes == 2 else masks.astype(np.uint8)
    prints = [picture_fingerprint(image) for image in images] if fingerprints is None else list(fingerprints)
    if masks.max() >= num_classes:
        raise InputError(f"the masks hold label {int(masks.max())} but the model has {num_classes} classes")
    if images.shape[1:] != (size, size):
        images, masks = intensity.resize_slices(images, size, 1), intensity.resize_slices(masks, size, 0)
    flags = np.ones(len(images), bool) if edited is None else np.asarray(edited, bool)
    names = [f"slice{i}" for i in range(len(images))] if cases is None else [str(c) for c in cases]
    return FinetuneSlices(images, masks, flags, names, source, prints)


def _checked_out(out: str | os.PathLike | None, parent: ModelCard) -> Path | None:
    """``out`` as a path to a new ``NAME.pt`` (its folder made), never the parent's own file."""
    if out is None:
        return None
    out = Path(out)
    if out.suffix != ".pt":
        raise InputError(f"the fine-tuned model's path must end in .pt (NAME.pt), not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if parent.path is not None and out.resolve() == parent.path.resolve():
        raise InputError(f"the fine-tuned model would overwrite its parent {parent.path}; choose another --out")
    return out


def _child_card(parent: ModelCard, trained: FinetuneSlices, held: FinetuneSlices, config: TrainConfig, result,
                scores: tuple[float, float], accepted: bool, recipe: dict) -> ModelCard:
    before, after = scores
    losses = [row["loss"] for row in result.history if "loss" in row]
    settings = {k: v for k, v in config.to_dict().items() if k not in ("out_dir", "general_encoder")}
    verdict = "better or equal" if accepted else "WORSE, not made the default"
    return ModelCard(
        name=parent.name, version=parent.version,  # replaced by the caller
        description=f"{parent.name} {parent.version} fine-tuned on {len(trained)} corrected slices "
                    f"({verdict} on held-out corrections: Dice {before:.3f} -> {after:.3f})",
        file="", sha256="", architecture=dict(parent.architecture), classes=list(parent.classes),
        preprocessing=dict(parent.preprocessing),
        postprocessing=dict(parent.postprocessing),  # fine-tuning starts from the parent's calibration
        training={
            "role": parent.role, "fine_tuned": True,
            "parent": {"name": parent.name, "version": parent.version, "sha256": parent.sha256},
            "corrections": {
                "source": trained.source, "cases": sorted(set(trained.cases)), "slices": len(trained),
                "edited_slices": int(np.count_nonzero(trained.edited)),
                "holdout_cases": sorted(set(held.cases)), "holdout_slices": len(held),
            },
            **recipe, "seconds": round(result.seconds, 1),
            # what the parent saw and the slices this version trained on: relseg evaluate warns about them
            "image_fingerprints": seen_fingerprints(parent, trained),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "config": settings,
        },
        metrics={"holdout_dice_before": round(before, 4), "holdout_dice_after": round(after, 4),
                 "accepted": accepted},
        parent=parent.name,
    )


def seen_fingerprints(parent: ModelCard, trained: FinetuneSlices) -> list[str]:
    """The parent's training fingerprints, then those of the slices fine-tuned on (each once)."""
    return list(dict.fromkeys([*parent.training.get("image_fingerprints", []), *(trained.fingerprints or [])]))


def _register(network, card: ModelCard, parent: ModelCard, home, make_default: bool) -> tuple[Path, bool]:
    """Into the local registry under a free ``-ftN`` name; the default changes only if asked and accepted."""
    from .registry import ModelRegistry

    registry = ModelRegistry(home)
    card.name, card.version = registry_name(parent, {entry.name for entry in registry.list()})
    with tempfile.TemporaryDirectory(prefix="relseg-model-") as staging:
        entry = registry.register(save_model(network, card, staging), make_default=make_default)
    card.path = entry.path
    return entry.path, entry.is_default
