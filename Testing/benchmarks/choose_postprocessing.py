"""Choose a 2D model's postprocessing on the held-out patients of its recipe's folds.

The decisions the network's weights do not make, swept together on each fold model's own held-out patients
(``relseg train --fold K --export foldK``: the model and ``fold_result.json`` in one folder):

- the decision threshold: the foreground probability a pixel must exceed (a network trained with Dice +
  cross-entropy need not be calibrated at 0.5);
- flip test-time augmentation: the prediction averaged with that of the left-right mirrored slice (twice the
  network time); with ``--upside-down-tta``, also with those of the slice turned upside down (twice again; for
  networks trained on both orientations, ``--augment-series``);
- the smallest component kept: each slice's foreground components smaller than this fraction of its largest
  are dropped (for organs such as the lungs, never for lesions);
- with ``--drop-outside-body`` (not swept: a fixed step after the components, as ``covid-lungs-2d``'s card has
  it), the components lying mostly outside the body dropped (``inference.drop_outside_body``);
- with ``--lung-folds``: the labels kept inside the lungs that a lung model of the same fold (the same held-out
  patients) finds on the slice, as ``relseg segment`` keeps infection inside its lungs step's; chosen, the card
  names ``--lung-model`` (``postprocessing.within_lungs``), which ``relseg evaluate`` then runs on 2D slices.

It prints the mean per-slice Dice (as ``relseg evaluate --data ctseg2d:`` computes it) of every setting per
fold, and chooses the setting with the best mean over the folds if it beats the untuned one (argmax, no
flip, all components) by at least ``--min-gain`` (a smaller difference is the folds' noise), or by at least
``--min-gain-agreeing`` when it beats it on every fold of at least ``AGREEING_FOLDS`` (a small gain that every
held-out group of patients shows is less likely noise than a large mean made by one fold). The second rule was
fixed in session 13 before any sweep that it decides. Never run it on patients you report as a test.

``--card MODEL`` also writes the choice into that model's card (``postprocessing``: the chosen values, this
command, the folds' models and patients and the whole sweep); the weights and their SHA-256 are not
touched. The pipeline and ``relseg evaluate`` then follow it (the fine-tuning guard: its threshold)::

    python Testing/benchmarks/choose_postprocessing.py --folds work-dirs/cv/infection-fold0 work-dirs/cv/infection-fold1
        [--data ctseg2d:../shared/data/covid-ct-seg-2d] [--target infection|lungs] [--thresholds 0.3,0.4,...]
        [--flip-tta] [--upside-down-tta] [--fractions 0,0.05,0.1] [--drop-outside-body]
        [--lung-folds DIR... [--lung-model covid-lungs-2d]]
        [--min-gain 0.005] [--min-gain-agreeing 0.0025] [--json OUT] [--card covid-infection-2d]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from relsegcore import zoo
from relsegcore.data.ctseg import CTSEG_TARGETS, patient_of, read_cases_csv, selected_rows
from relsegcore.data.readers import read_gray_picture, read_mask_picture
from relsegcore.device import select_device
from relsegcore.evaluation import native_probabilities, patients_to_turn_upright, predict_image
from relsegcore.fileutil import atomic_write_text
from relsegcore.inference import drop_outside_body, drop_small_components, labels_from, tta_views
from relsegcore.metrics import dice

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
AGREEING_FOLDS = 3  # the fewest folds whose agreement counts


class Setting(NamedTuple):
    threshold: float = 0.5
    flip_tta: bool = False
    min_component_fraction: float = 0.0
    within_lungs: bool = False
    upside_down_tta: bool = False

    @property
    def label(self) -> str:
        return f"threshold {self.threshold}, flip {'on' if self.flip_tta else 'off'}, " \
               f"components >= {self.min_component_fraction}" + (", within the lungs" if self.within_lungs else "") \
               + (", upside down too" if self.upside_down_tta else "")


UNTUNED = Setting()


def settings_grid(thresholds, flips, fractions, within_lungs=(False,), upside_downs=(False,)) -> list[Setting]:
    """Every combination, the untuned setting first and the simpler ones before the others (ties go to them)."""
    grid = [Setting(t, f, c, w, u) for u, w, f, c, t
            in itertools.product(upside_downs, within_lungs, flips, fractions, thresholds)]
    return sorted(grid, key=lambda s: (s != UNTUNED, s.upside_down_tta, s.flip_tta, s.within_lungs,
                                       s.min_component_fraction > 0, abs(s.threshold - 0.5)))


def fold_model(fold_dir: Path) -> zoo.ModelCard:
    """The model a ``relseg train --fold K --export NAME`` run exported into ``fold_dir``."""
    weights = [path for path in sorted(fold_dir.glob("*.pt")) if path.name != "checkpoint.pt"]
    if len(weights) != 1:
        raise SystemExit(f"{fold_dir}: expected one exported model (*.pt besides checkpoint.pt), found {len(weights)}")
    return zoo.find_model(weights[0])


def held_out_patients(fold_dir: Path) -> list[str]:
    """The patients a ``relseg train --fold K`` run held out (its ``fold_result.json``)."""
    return json.loads((fold_dir / "fold_result.json").read_text())["val_patients"]


def sweep_fold(fold_dir: Path, root: Path, target: str, settings: list[Setting], device: str,
               lung_fold_dir: Path | None = None, outside_body_dropped: bool = False) -> dict:
    """Mean per-slice Dice per setting (and per patient) of one fold model on its held-out patients."""
    patients = held_out_patients(fold_dir)
    card = fold_model(fold_dir)
    card.postprocessing = {}  # the sweep decides; a fold card's own choice would be applied twice
    loaded = zoo.load_model(card, select_device(device), "auto")
    lungs = None
    if lung_fold_dir is not None:
        if held_out_patients(lung_fold_dir) != patients:
            raise SystemExit(f"{lung_fold_dir} holds out other patients than {fold_dir}: its lungs would be seen ones")
        lungs = zoo.load_model(fold_model(lung_fold_dir), loaded.device, "auto")
    all_rows = read_cases_csv(root)
    rows = [row for row, keep in zip(all_rows, selected_rows(all_rows, patients, root), strict=True) if keep]
    # a model trained upright only sees the patients stored posterior up turned upright, as relseg evaluate shows
    # them (their masks too: Dice does not change when both are turned)
    turned = patients_to_turn_upright(loaded, root, rows)
    scores = np.empty((len(rows), len(settings)))
    for index, row in enumerate(rows):
        name = Path(row["file"]).name
        upside_down = patient_of(row["case"]) in turned
        image = read_gray_picture(root / "images" / name)
        image = np.ascontiguousarray(image[::-1]) if upside_down else image
        averaged = views_averaged(loaded, image, {(s.flip_tta, s.upside_down_tta) for s in settings})
        reference = read_mask_picture(root / CTSEG_TARGETS[target] / name, False) > 0
        reference = reference[::-1] if upside_down else reference
        lung_mask = predict_image(lungs, image) > 0 if lungs is not None else None
        for column, setting in enumerate(settings):
            labels = drop_small_components(labels_from(averaged[setting.flip_tta, setting.upside_down_tta],
                                                       setting.threshold), setting.min_component_fraction)
            labels = (drop_outside_body(labels, image) if outside_body_dropped else labels) > 0
            scores[index, column] = dice(labels & lung_mask if setting.within_lungs else labels, reference)
    of_patient = np.array([patient_of(row["case"]) for row in rows])
    return {
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "folder": str(fold_dir)},
        **({"lung_model": {"name": lungs.card.name, "sha256": lungs.card.sha256, "folder": str(lung_fold_dir)}}
           if lungs is not None else {}),
        "held_out_patients": sorted(set(of_patient.tolist())), "slices": len(rows),
        **({"turned_upright": sorted(turned)} if card.preprocessing.get("upright") else {}),
        "mean_dice": {s.label: round(float(scores[:, i].mean()), 4) for i, s in enumerate(settings)},
        "per_patient_dice": {patient: {s.label: round(float(scores[of_patient == patient, i].mean()), 4)
                                       for i, s in enumerate(settings)} for patient in sorted(set(of_patient))},
    }


def views_averaged(loaded: zoo.LoadedModel, image: np.ndarray, wanted: set[tuple[bool, bool]]) -> dict:
    """Probabilities for each wanted (flip, upside down) test-time augmentation, averaged as relseg averages them,
    from one pass per view (resizing to the native size commutes with mirroring and averaging)."""
    passes = {axes: np.flip(native_probabilities(loaded, np.ascontiguousarray(np.flip(image, axes))), axes)
              for axes in {axes for flip, upside_down in wanted for axes in tta_views(flip, upside_down)}}
    return {(flip, upside_down): np.mean([passes[axes] for axes in tta_views(flip, upside_down)], axis=0)
            for flip, upside_down in wanted}


def best_setting(folds: list[dict], settings: list[Setting], min_gain: float = 0.005,
                 min_gain_agreeing: float = 0.0025) -> Setting:
    """The setting with the best mean over folds (ties: the simpler, earlier one), or the untuned one unless
    the best wins by at least ``min_gain``, or by ``min_gain_agreeing`` and on each of ``AGREEING_FOLDS`` or more
    folds."""
    means = {s: float(np.mean([fold["mean_dice"][s.label] for fold in folds])) for s in settings}
    best = max(settings, key=lambda s: (round(means[s], 4), -settings.index(s)))
    if UNTUNED not in means or means[best] - means[UNTUNED] >= min_gain:
        return best
    every_fold = len(folds) >= AGREEING_FOLDS and all(
        fold["mean_dice"][best.label] > fold["mean_dice"][UNTUNED.label] for fold in folds)
    return best if every_fold and means[best] - means[UNTUNED] >= min_gain_agreeing else UNTUNED


def write_card(model: str, chosen: Setting, target: str, folds: list[dict], command: str,
               lung_model: str | None = None, outside_body_dropped: bool = False) -> Path:
    card = zoo.find_model(model)
    card_path = card.path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data["postprocessing"] = {
        **({"threshold": chosen.threshold} if chosen.threshold != UNTUNED.threshold else {}),
        **({"flip_tta": True} if chosen.flip_tta else {}),
        **({"upside_down_tta": True} if chosen.upside_down_tta else {}),
        **({"min_component_fraction": chosen.min_component_fraction} if chosen.min_component_fraction else {}),
        **({"within_lungs": lung_model} if chosen.within_lungs else {}),
        **({"outside_body_dropped": True} if outside_body_dropped else {}),
        "chosen_by": command,
        "rule": f"best mean per-slice {target} Dice over the held-out patients of folds of this model's recipe, "
                "if it beats the untuned setting (argmax, no flip, all components, not bounded by lungs) by at least "
                "the command's "
                f"--min-gain, or by its --min-gain-agreeing on every fold of at least {AGREEING_FOLDS}",
        "folds": folds,
    }
    atomic_write_text(card_path, json.dumps(data, indent=2) + "\n")
    return card_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", type=Path, required=True, help="fold folders of one recipe")
    parser.add_argument("--data", default=f"ctseg2d:{DATA / 'covid-ct-seg-2d'}")
    parser.add_argument("--target", choices=sorted(CTSEG_TARGETS), default="infection")
    parser.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    parser.add_argument("--flip-tta", action="store_true", help="also try flip test-time augmentation")
    parser.add_argument("--upside-down-tta", action="store_true",
                        help="also try averaging with the slice turned upside down (networks trained on both)")
    parser.add_argument("--fractions", default="0", help="smallest components kept, as fractions of the largest")
    parser.add_argument("--drop-outside-body", action="store_true",
                        help="drop components lying mostly outside the body after every setting (covid-lungs-2d's "
                             "card does); written into the card with --card")
    parser.add_argument("--lung-folds", nargs="+", type=Path,
                        help="a lung model's fold folders, one per --folds folder with the same held-out patients: "
                             "also try keeping the labels inside their lungs")
    parser.add_argument("--lung-model", default="covid-lungs-2d",
                        help="the lung model the card names when keeping the labels inside the lungs is chosen")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the whole sweep (per fold and patient) here")
    parser.add_argument("--min-gain", type=float, default=0.005,
                        help="keep the untuned setting unless one wins by this")
    parser.add_argument("--min-gain-agreeing", type=float, default=0.0025,
                        help=f"or by this when it wins on every fold of at least {AGREEING_FOLDS}")
    parser.add_argument("--card", help="write the chosen setting into this model's card")
    args = parser.parse_args()
    root = Path(args.data.removeprefix("ctseg2d:"))
    if not (root / "cases.csv").is_file():
        print(f"no covid-ct-seg-2d layout at {root}: nothing to sweep")
        return 0
    if args.lung_folds is not None and len(args.lung_folds) != len(args.folds):
        parser.error("--lung-folds needs one folder for each --folds folder")
    settings = settings_grid(tuple(float(t) for t in args.thresholds.split(",")),
                             (False, True) if args.flip_tta else (False,),
                             tuple(float(f) for f in args.fractions.split(",")),
                             (False, True) if args.lung_folds else (False,),
                             (False, True) if args.upside_down_tta else (False,))
    folds = [sweep_fold(fold_dir, root, args.target, settings, args.device, lung_dir, args.drop_outside_body)
             for fold_dir, lung_dir in zip(args.folds, args.lung_folds or [None] * len(args.folds), strict=True)]
    print("| setting | " + " | ".join(f"{f['model']['folder']} ({', '.join(f['held_out_patients'])})"
                                        for f in folds) + " | mean |")
    print("|---" * (len(folds) + 2) + "|")
    for setting in settings:
        values = [fold["mean_dice"][setting.label] for fold in folds]
        print(f"| {setting.label} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    chosen = best_setting(folds, settings, args.min_gain, args.min_gain_agreeing)
    print(f"chosen: {chosen.label}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"chosen": chosen._asdict(), "folds": folds}, indent=2) + "\n")
    if args.card:
        command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
        card_path = write_card(args.card, chosen, args.target, folds, command, args.lung_model, args.drop_outside_body)
        print(f"wrote {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
