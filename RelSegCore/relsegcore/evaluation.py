"""Evaluate a model on 2D image folders or CT volumes with expert masks.

2D slices are compared at their native resolution: each image is resized to the model's
input, predicted, and the probabilities are resized back before the labels are decided (the argmax, or the
card's ``threshold``). Volumes go
through the same ``pipeline.segment`` as ``relseg segment`` and are scored in mm (NSD at
3 mm for infection, as the COVID-19-CT-Seg benchmark).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.intensity import FULL_SLICE_CLAHE, LUNG_CROP, recipe_of, resize_slices
from .data.readers import (
    chosen_pairs,
    find_picture_pairs,
    find_volume_pairs,
    needs_transpose,
    picture_fingerprint,
    picture_recipe,
    read_gray_picture,
    read_mask_picture,
)
from .errors import InputError
from .inference import labels_from, postprocess_slice, predict_slices
from .metrics import case_metrics, summarise
from .progress import Progress
from .zoo import LoadedModel, ModelCard, load_model

ORIENTATION_LUNG_MODEL = "covid-lungs-2d"  # finds the lungs that tell a slice's orientation (data.orientation)


def native_probabilities(loaded: LoadedModel, image: np.ndarray, tta: bool = False) -> np.ndarray:
    """Class probabilities ``(C, H, W)`` at the image's native size for one 8-bit slice already in the training
    appearance: resized to the model's input, predicted, resized back."""
    size = int(loaded.card.preprocessing.get("input_size", 256))
    tensor = torch.from_numpy(image.astype(np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    resized = resized.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()
    probabilities = torch.from_numpy(predict_slices(loaded, resized, tta=tta))
    return F.interpolate(probabilities, size=image.shape, mode="bilinear", align_corners=False)[0].numpy()


def predict_image(loaded: LoadedModel, image: np.ndarray, tta: bool = False,
                  lungs: LoadedModel | None = None) -> np.ndarray:
    """Label map at the image's native size for one 8-bit slice already in the training appearance, decided
    as the pipeline decides (the card's ``threshold``, ``min_component_fraction`` and ``outside_body_dropped``),
    and kept inside the lungs that ``lungs`` (``lung_model_for``) finds on the same slice, as ``segment`` keeps it
    inside its lungs step's."""
    labels = postprocess_slice(labels_from(native_probabilities(loaded, image, tta), loaded.card.threshold), image,
                               loaded.card)
    if lungs is not None:
        labels = np.where(predict_image(lungs, image) > 0, labels, 0).astype(np.uint8)
    return labels


def lung_model_for(loaded: LoadedModel) -> LoadedModel | None:
    """The lung model that the card's ``within_lungs`` names, on the same device and engine, or None."""
    return None if loaded.card.within_lungs is None else load_model(loaded.card.within_lungs, loaded.device,
                                                                     loaded.engine)


def model_for_pictures(loaded: LoadedModel, recipe: str) -> LoadedModel:
    """The model that scores pictures prepared by ``recipe``: ``loaded`` itself, or the one its card names for
    that recipe (``ModelCard.model_for_recipe``), on the same device and engine, checked to be of that recipe."""
    named = loaded.card.model_for_recipe(recipe)
    if named is None:
        return loaded
    other = load_model(named, loaded.device, loaded.engine)
    if recipe_of(other.card.preprocessing) != recipe:
        raise InputError(f"{loaded.card.name}'s card names {other.card.name} for {recipe} pictures, but "
                         f"{other.card.name} was trained on {recipe_of(other.card.preprocessing)} ones")
    return other


def evaluate_image_folder(loaded: LoadedModel, images_dir: Path, masks_dir: Path, tta: bool = False,
                          orientation: str = "auto", progress: Progress | None = None,
                          stems: set[str] | None = None, recipe: str = "auto",
                          upside_down: set[str] | None = None) -> dict:
    """Per-slice and mean Dice, sensitivity, specificity (NSD/HD95 in pixels: 2D slices carry no spacing).

    Slices stored transposed (COVID-SemiSeg's lungs one above the other) are turned upright for
    the model exactly as ``read_image_folder`` does for training, and the prediction turned back.
    ``recipe`` says how the pictures were prepared (``"auto"``: ``picture_recipe`` decides); when the card names
    another model for that recipe, that model scores them and the result says so. The pictures named in
    ``upside_down`` are turned upright for the model and its prediction turned back; when the caller decided no
    orientation (None: a picture folder has no patients to decide it by), a model trained upright only that scores
    whole slices says so (``orientation_note``).
    """
    pairs = [pair for pair in find_picture_pairs(images_dir, masks_dir) if stems is None or pair[0] in stems]
    images = [read_gray_picture(image_path) for _, image_path, _ in pairs]
    recipe = picture_recipe(images) if recipe == "auto" else recipe
    asked, loaded = loaded, model_for_pictures(loaded, recipe)
    multiclass = len(loaded.card.classes) > 2
    labels = {name.replace(" ", "_").replace("-", "_"): i for i, name in enumerate(loaded.card.classes) if i}
    transpose = needs_transpose(np.stack([resize_slices(image[None], 64)[0] for image in images]), orientation, recipe)
    lungs = lung_model_for(loaded)
    cases = []
    for index, ((name, _, mask_path), image) in enumerate(zip(pairs, images, strict=True)):
        reference = read_mask_picture(mask_path, multiclass)
        if image.shape != reference.shape:
            raise InputError(f"{mask_path.name} is {reference.shape[::-1]} but its image is {image.shape[::-1]}")
        flip = upside_down is not None and name in upside_down
        shown = image.T if transpose else image
        prediction = predict_image(loaded, shown[::-1] if flip else shown, tta=tta, lungs=lungs)
        prediction = prediction[::-1] if flip else prediction
        prediction = prediction.T if transpose else prediction
        metrics = case_metrics(prediction, reference, spacing=None, tolerance_mm=3.0,
                               labels=labels if multiclass else None)
        cases.append({"case": name, **metrics})
        if progress is not None:
            progress.update((index + 1) / len(pairs), "evaluating")
    result = _result(loaded, cases, units="pixels", tta=tta, lungs=lungs)
    result["transposed"] = transpose
    result["recipe"] = recipe
    if upside_down is None and loaded.card.preprocessing.get("upright") and recipe == FULL_SLICE_CLAHE:
        result["orientation_note"] = (
            f"{loaded.card.name} was trained on slices anterior up only and these pictures were scored "
            "as they are: pictures stored posterior up (spine at the top, as every Radiopaedia "
            "series of COVID-19-CT-Seg) score low; give --data ctseg2d:DIR (with cases.csv), whose patients stored "
            "posterior up are found by their lungs and turned")
    result["cases_seen_in_training"] = seen_in_training(loaded.card, images)
    if loaded is not asked:
        result["asked_model"] = {"name": asked.card.name, "version": asked.card.version, "sha256": asked.card.sha256}
        looks = {LUNG_CROP: "lung-window crops of the thorax", FULL_SLICE_CLAHE: "whole CT slices"}[recipe]
        result["note"] = (f"these pictures look like {looks} ({recipe}), which {asked.card.name} was not trained on; "
                          f"its card names {loaded.card.name} for them, which scored them")
    return result


def evaluate_ctseg2d(loaded: LoadedModel, root: Path, target: str = "infection", tta: bool = False,
                     progress: Progress | None = None, cases: list[str] | None = None) -> dict:
    """``evaluate_image_folder`` on a ``covid-ct-seg-2d`` folder (never transposed), with each slice's case and
    the mean Dice per patient (slices of one patient are not independent). ``cases`` keeps only those cases or
    patients. Its Radiopaedia series are stored posterior up: for a model trained upright only (its card's
    ``preprocessing["upright"]``), the patients that ``patients_to_turn_upright`` finds are turned upright for it
    (``turned_upright`` in the result); other models see every slice as stored."""
    from .data.ctseg import CTSEG_TARGETS, patient_of, read_cases_csv, selected_rows

    if target not in CTSEG_TARGETS:
        raise InputError(f"--target must be one of {', '.join(CTSEG_TARGETS)}, not {target!r}")
    root = Path(root)
    rows = read_cases_csv(root)
    case_of = {Path(row["file"]).stem: row["case"] for row in rows}
    if cases is not None:
        rows = [row for row, chosen in zip(rows, selected_rows(rows, cases, root), strict=True) if chosen]
    stems = None if cases is None else {Path(row["file"]).stem for row in rows}
    turned = patients_to_turn_upright(loaded, root, rows)
    upside_down = {Path(row["file"]).stem for row in rows if patient_of(row["case"]) in turned}
    result = evaluate_image_folder(loaded, root / "images", root / CTSEG_TARGETS[target], tta=tta,
                                   orientation="as-is", progress=progress, stems=stems, recipe=FULL_SLICE_CLAHE,
                                   upside_down=upside_down)
    by_patient: dict[str, list[float]] = {}
    for case in result["per_case"]:
        case["series"] = case_of.get(case["case"], "")
        by_patient.setdefault(patient_of(case["series"]), []).append(case["dice"])
    result["per_patient_dice"] = {patient: float(np.mean(values)) for patient, values in sorted(by_patient.items())}
    result["target"] = target
    if loaded.card.preprocessing.get("upright"):
        result["turned_upright"] = sorted(turned)
    if "asked_model" not in result and recipe_of(loaded.card.preprocessing) != FULL_SLICE_CLAHE:
        result["note"] = (f"{loaded.card.name} was trained on {recipe_of(loaded.card.preprocessing)} images, not on "
                          "whole full-slice-clahe slices like these: its score here says little")
    return result


def patients_to_turn_upright(loaded: LoadedModel, root: Path, rows: list[dict[str, str]]) -> set[str]:
    """The patients of ``rows`` to turn upright for ``loaded``: none unless its card says it was trained upright,
    else those stored posterior up, told by the lungs that ``ORIENTATION_LUNG_MODEL`` (trained on both
    orientations) finds on their pictures: no annotation is needed, so unseen folders are turned the same way."""
    if not loaded.card.preprocessing.get("upright"):
        return set()
    from .data.ctseg import patient_of
    from .data.orientation import posterior_up_groups

    finder = load_model(ORIENTATION_LUNG_MODEL, loaded.device, loaded.engine)
    lungs = [predict_image(finder, read_gray_picture(root / "images" / row["file"])) for row in rows]
    return posterior_up_groups(lungs, [patient_of(row["case"]) for row in rows])


def seen_in_training(card, images: list[np.ndarray]) -> int | None:
    """How many of ``images`` the model was trained on (its card's fingerprints); None when the card does not say."""
    known = card.training.get("image_fingerprints")
    if known is None:
        return None
    known = set(known)
    return sum(picture_fingerprint(image) in known for image in images)


def evaluate_volumes(loaded_name: str | os.PathLike, images_dir: Path, masks_dir: Path | None, device: str = "auto",
                     tta: bool = False, tolerance_mm: float = 3.0, progress: Progress | None = None,
                     cases: list[str] | None = None, target: str = "infection",
                     lung_model: str | os.PathLike = "hu") -> dict:
    """Metrics on CT volumes against the masks in ``masks_dir`` under the CTs' own file names, or beside the CTs
    (None); only ``cases`` when given (cases or patients, e.g. a fold's held-out ones). ``target`` "infection":
    the full ``segment`` pipeline (lungs, model) against infection masks; "lungs": the pipeline's lungs step
    ``lung_model`` (``relseg segment --lungs``) against lung masks."""
    pairs = (find_volume_pairs(images_dir, masks_dir, "", "") if masks_dir is not None
             else find_volume_pairs(images_dir))
    pairs = chosen_pairs(pairs, cases, images_dir)
    if target == "lungs":
        return evaluate_lung_volume_cases(pairs, lung_model, device=device, tolerance_mm=tolerance_mm,
                                          progress=progress)
    if target != "infection":
        raise InputError(f"--target must be infection or lungs, not {target!r}")
    return evaluate_volume_cases(loaded_name, pairs, device=device, tta=tta, tolerance_mm=tolerance_mm,
                                 progress=progress)


def evaluate_lung_volume_cases(pairs: list[tuple[str, Path, Path]], lung_model: str | os.PathLike = "hu",
                               device: str = "auto", tolerance_mm: float = 3.0,
                               progress: Progress | None = None) -> dict:
    """The lungs step ``relseg segment --lungs lung_model`` runs, against lung masks (every non-zero voxel is
    lung; both lungs scored as one), in mm: to compare the HU method and a lung model on one's own CTs."""
    from .pipeline import lung_model_card, segment_lungs

    card = lung_model_card(lung_model)
    cases = _score_volumes(pairs, lambda image: segment_lungs(image, model=lung_model, device=device) > 0,
                           tolerance_mm, progress, binary=True)
    method = ({"name": "hu-threshold", "version": "", "sha256": ""} if card is None
              else {"name": card.name, "version": card.version, "sha256": card.sha256})
    return {"model": method, "target": "lungs", "units": "mm", "tolerance_mm": tolerance_mm, "per_case": cases,
            **summarise(cases)}


def evaluate_volume_cases(loaded_name: str | os.PathLike, pairs: list[tuple[str, Path, Path]], device: str = "auto",
                          tta: bool = False, tolerance_mm: float = 3.0, progress: Progress | None = None) -> dict:
    """``evaluate_volumes`` on chosen ``(case, image, mask)`` files (a benchmark fold's test cases)."""
    from .pipeline import segment
    from .zoo import find_model

    card = find_model(loaded_name)
    cases = _score_volumes(pairs, lambda image: segment(image, model=loaded_name, device=device, tta=tta).infection,
                           tolerance_mm, progress)
    return {"model": {"name": card.name, "version": card.version, "sha256": card.sha256}, "units": "mm",
            "tolerance_mm": tolerance_mm, "postprocessing": applied_postprocessing(card, tta), "per_case": cases,
            **summarise(cases)}


def _score_volumes(pairs: list[tuple[str, Path, Path]], predict, tolerance_mm: float, progress: Progress | None,
                   binary: bool = False) -> list[dict]:
    """Each case's metrics of ``predict(CT image) -> label image on its grid`` against its mask file."""
    from .imageio import read_image

    cases = []
    for index, (name, image_path, mask_path) in enumerate(pairs):
        prediction = predict(read_image(image_path))
        cases.append({"case": name, **_volume_metrics(prediction, mask_path, tolerance_mm, binary)})
        if progress is not None:
            progress.update((index + 1) / len(pairs), "evaluating")
    return cases


def _volume_metrics(prediction, mask_path: Path, tolerance_mm: float, binary: bool = False) -> dict:
    """``case_metrics`` of a prediction on the CT's grid against a mask file, in mm, scored on the mask's grid:
    a mask stored on another grid (a crop of the CT, another spacing) is where the expert looked, so the
    prediction is resampled onto it (nearest neighbour) and the case says so. ``binary``: every non-zero label
    of the mask is one structure."""
    import SimpleITK as sitk

    from .imageio import same_grid

    reference_image = sitk.ReadImage(str(mask_path))
    resampled = not same_grid(prediction, reference_image)
    if resampled:
        prediction = sitk.Resample(prediction, reference_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                   prediction.GetPixelID())
    reference = sitk.GetArrayFromImage(reference_image)
    if binary:
        reference = (reference > 0).astype(np.uint8)
    spacing_zyx = tuple(reversed(reference_image.GetSpacing()))
    metrics = case_metrics(sitk.GetArrayFromImage(prediction), reference, spacing_zyx, tolerance_mm)
    return {**metrics, **({"prediction_resampled_to_mask_grid": True} if resampled else {})}


def applied_postprocessing(card: ModelCard, tta: bool, lungs: LoadedModel | None = None) -> dict:
    """What decided the labels besides the weights (the card's choices; flip TTA also when asked for; the lung
    model that bounded them), so a result file says how its numbers were made."""
    applied = {"threshold": card.threshold, "flip_tta": bool(tta or card.flip_tta),
               **({"upside_down_tta": True} if card.upside_down_tta else {}),
               "min_component_fraction": card.min_component_fraction}
    if lungs is not None:
        applied["within_lungs"] = {"name": lungs.card.name, "version": lungs.card.version,
                                   "sha256": lungs.card.sha256}
    return applied


def _result(loaded: LoadedModel, cases: list[dict], units: str, tta: bool, lungs: LoadedModel | None = None) -> dict:
    card = loaded.card
    summary = summarise(cases)
    result = {"model": {"name": card.name, "version": card.version, "sha256": card.sha256},
              "units": units, "postprocessing": applied_postprocessing(card, tta, lungs), "per_case": cases,
              **summary}
    if len(card.classes) > 2:
        result["per_class_dice"] = {
            name: summary["metrics"].get(f"dice_{name.replace(' ', '_').replace('-', '_')}", {}).get("mean")
            for name in card.classes[1:]
        }
    return result
