"""Choose a binary model's decision threshold on the held-out patients of its recipe's folds.

A network trained with Dice + cross-entropy need not be calibrated at 0.5: this sweeps the foreground
probability a pixel must exceed, on each fold model's own held-out patients (``relseg train --fold K
--export foldK``: the model and ``fold_result.json`` in one folder), and prints the mean per-slice Dice
(as ``relseg evaluate --data ctseg2d:`` computes it) per threshold and fold. The threshold chosen is the
one with the best mean over the folds, if it beats the argmax (0.5) by at least ``--min-gain`` (half a
Dice point): a smaller difference is the folds' noise, not a calibration. Never run it on patients you
report as a test.

``--card MODEL`` also writes the choice into that model's card (``postprocessing``: the threshold, this
command, the folds' models and patients and the whole sweep); the weights and their SHA-256 are not
touched. The pipeline, ``relseg evaluate`` and fine-tuning then decide labels at that threshold::

    python Testing/benchmarks/choose_threshold.py --folds work-dirs/cv/infection-fold0 work-dirs/cv/infection-fold1
        [--data ctseg2d:../shared/data/covid-ct-seg-2d] [--thresholds 0.3,0.4,...] [--min-gain 0.005]
        [--json OUT] [--card covid-infection-2d]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from relsegcore import zoo
from relsegcore.data.ctseg import patient_of, read_cases_csv, selected_rows
from relsegcore.data.readers import read_gray_picture, read_mask_picture
from relsegcore.device import select_device
from relsegcore.evaluation import native_probabilities
from relsegcore.fileutil import atomic_write_text
from relsegcore.inference import labels_from
from relsegcore.metrics import dice

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fold_model(fold_dir: Path) -> zoo.ModelCard:
    """The model a ``relseg train --fold K --export NAME`` run exported into ``fold_dir``."""
    weights = [path for path in sorted(fold_dir.glob("*.pt")) if path.name != "checkpoint.pt"]
    if len(weights) != 1:
        raise SystemExit(f"{fold_dir}: expected one exported model (*.pt besides checkpoint.pt), found {len(weights)}")
    return zoo.find_model(weights[0])


def sweep_fold(fold_dir: Path, root: Path, thresholds: tuple[float, ...], device: str) -> dict:
    """Mean per-slice Dice per threshold (and per patient) of one fold model on its held-out patients."""
    patients = json.loads((fold_dir / "fold_result.json").read_text())["val_patients"]
    card = fold_model(fold_dir)
    loaded = zoo.load_model(card, select_device(device), "auto")
    all_rows = read_cases_csv(root)
    rows = [row for row, keep in zip(all_rows, selected_rows(all_rows, patients, root), strict=True) if keep]
    scores = np.empty((len(rows), len(thresholds)))
    for index, row in enumerate(rows):
        name = Path(row["file"]).name
        probabilities = native_probabilities(loaded, read_gray_picture(root / "images" / name))
        reference = read_mask_picture(root / "masks" / name, False) > 0
        scores[index] = [dice(labels_from(probabilities, t) > 0, reference) for t in thresholds]
    of_patient = np.array([patient_of(row["case"]) for row in rows])
    return {
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "folder": str(fold_dir)},
        "held_out_patients": sorted(set(of_patient.tolist())), "slices": len(rows),
        "mean_dice": {str(t): round(float(scores[:, i].mean()), 4) for i, t in enumerate(thresholds)},
        "per_patient_dice": {patient: {str(t): round(float(scores[of_patient == patient, i].mean()), 4)
                                       for i, t in enumerate(thresholds)} for patient in sorted(set(of_patient))},
    }


def best_threshold(folds: list[dict], thresholds: tuple[float, ...], min_gain: float = 0.005) -> float:
    """The threshold with the best mean over folds (ties: the one nearest 0.5), or 0.5, the untuned argmax,
    unless it wins by at least ``min_gain``."""
    means = {t: float(np.mean([fold["mean_dice"][str(t)] for fold in folds])) for t in thresholds}
    best = max(thresholds, key=lambda t: (round(means[t], 4), -abs(t - 0.5)))
    return best if 0.5 not in means or means[best] - means[0.5] >= min_gain else 0.5


def write_card(model: str, threshold: float, folds: list[dict], command: str) -> Path:
    card = zoo.find_model(model)
    card_path = card.path.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data["postprocessing"] = {
        "threshold": threshold,
        "chosen_by": command,
        "rule": "best mean per-slice Dice over the held-out patients of folds of this model's recipe, if it "
                "beats 0.5 by at least the command's --min-gain",
        "folds": folds,
    }
    atomic_write_text(card_path, json.dumps(data, indent=2) + "\n")
    return card_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", type=Path, required=True, help="fold folders of one recipe")
    parser.add_argument("--data", default=f"ctseg2d:{DATA / 'covid-ct-seg-2d'}")
    parser.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the whole sweep (per fold and patient) here")
    parser.add_argument("--min-gain", type=float, default=0.005, help="keep 0.5 unless a threshold wins by this")
    parser.add_argument("--card", help="write the chosen threshold into this model's card")
    args = parser.parse_args()
    root = Path(args.data.removeprefix("ctseg2d:"))
    if not (root / "cases.csv").is_file():
        print(f"no covid-ct-seg-2d layout at {root}: nothing to sweep")
        return 0
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    folds = [sweep_fold(fold_dir, root, thresholds, args.device) for fold_dir in args.folds]
    print("| threshold | " + " | ".join(f"{f['model']['folder']} ({', '.join(f['held_out_patients'])})"
                                          for f in folds) + " | mean |")
    print("|---" * (len(folds) + 2) + "|")
    for t in thresholds:
        values = [fold["mean_dice"][str(t)] for fold in folds]
        print(f"| {t} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {np.mean(values):.4f} |")
    chosen = best_threshold(folds, thresholds, args.min_gain)
    print(f"chosen threshold: {chosen}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"chosen": chosen, "folds": folds}, indent=2) + "\n")
    if args.card:
        command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
        print(f"wrote {write_card(args.card, chosen, folds, command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
