"""The radiologist's loop on patients a model never saw: correct 16 slices, fine-tune, score the rest.

Issue 15's done-when, run with its own commands on patients held out of a base model's training. The
shipped default has seen all 12 patients of ``covid-ct-seg-2d``, so the base here is a model trained
by the default's recipe on a patient-level fold (``relseg train --data ctseg2d:DIR --fold K --folds N
--export NAME``); its held-out patients stand in for a new site's. The script

1. writes two ``covid-ct-seg-2d`` folders (links to the data, their own ``cases.csv``): ``corrected``,
   ``--k`` slices spread evenly over the held-out patients' slices, and ``other``, every other slice of
   those patients at least ``--gap`` slices away from a corrected slice of its case;
2. runs ``relseg finetune --model BASE --data ctseg2d:corrected --out ft.pt --device cpu`` (timed:
   the issue allows 300 s on 2 CPU cores);
3. runs ``relseg evaluate --data ctseg2d:other --json`` for the base and the fine-tuned model and prints
   the mean per-slice Dice before and after.

Not part of pytest::

    python Testing/benchmarks/finetune_held_out.py --data ../shared/data/covid-ct-seg-2d \\
        --base work-dirs/cv/infection-fold0/fold0.pt --out work-dirs/ft-held-out
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from relsegcore.data.ctseg import patient_of, read_cases_csv
from relsegcore.finetune import case_orders


def choose_slices(rows: list[dict[str, str]], patients: list[str], k: int, gap: int) -> tuple[list[int], list[int]]:
    """(corrected, other) row indices: ``k`` slices spread evenly over the patients' slices, and the
    patients' slices at least ``gap`` away from every corrected slice of the same case."""
    orders = case_orders(rows)
    mine = [i for i, row in enumerate(rows) if patient_of(row["case"]) in patients]
    corrected = [mine[int(i)] for i in np.linspace(0, len(mine) - 1, k + 2)[1:-1].round()]
    near = {(rows[i]["case"], orders[i]) for i in corrected}
    other = [i for i in mine if i not in corrected
             and all((rows[i]["case"], orders[i] + d) not in near for d in range(-gap + 1, gap))]
    return corrected, other


def write_folder(data: Path, rows: list[dict[str, str]], indices: list[int], out: Path) -> Path:
    """A covid-ct-seg-2d folder of the chosen rows: links to the pictures and their own cases.csv."""
    for sub in ("images", "masks", "lungs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for i in indices:
            target = out / sub / rows[i]["file"]
            if not target.exists():
                os.symlink((data / sub / rows[i]["file"]).resolve(), target)
    with open(out / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in indices)
    return out


def relseg(*args: str) -> float:
    """Run one ``relseg`` command (printed); its wall time in seconds."""
    print("$ relseg " + shlex.join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relsegcore.cli", *args], check=True)
    return time.perf_counter() - started


def evaluate(model: Path, folder: Path, out: Path, device: str) -> float:
    relseg("evaluate", "--model", str(model), "--data", f"ctseg2d:{folder}", "--json", str(out), "--device", device)
    return json.loads(out.read_text())["mean_dice"]


def held_out_patients(base: Path) -> list[str]:
    """The patients of ``fold_result.json`` beside the base model that it was not trained on."""
    result = base.parent / "fold_result.json"
    if not result.is_file():
        raise SystemExit(f"no {result}: give --patients")
    return json.loads(result.read_text())["val_patients"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a covid-ct-seg-2d folder")
    parser.add_argument("--base", type=Path, required=True, help="a model trained without --patients (.pt)")
    parser.add_argument("--patients", help="comma-separated (default: the base's fold_result.json val_patients)")
    parser.add_argument("--k", type=int, default=16, help="corrected slices")
    parser.add_argument("--gap", type=int, default=3, help="scored slices lie at least this far from a correction")
    parser.add_argument("--out", type=Path, default=Path("work-dirs/ft-held-out"))
    parser.add_argument("--lr", help="relseg finetune --lr (default: its own)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    patients = args.patients.split(",") if args.patients else held_out_patients(args.base)
    rows = read_cases_csv(args.data)
    corrected, other = choose_slices(rows, patients, args.k, args.gap)
    corrected_dir = write_folder(args.data, rows, corrected, args.out / "corrected")
    other_dir = write_folder(args.data, rows, other, args.out / "other")
    print(f"{len(corrected)} corrected slices and {len(other)} scored slices of {', '.join(patients)}")
    tuned = args.out / (f"ft-lr{args.lr}.pt" if args.lr else "ft.pt")
    seconds = relseg("finetune", "--model", str(args.base), "--data", f"ctseg2d:{corrected_dir}", "--out", str(tuned),
                     "--device", args.device, *(["--lr", args.lr] if args.lr else []))
    scored = args.out / "before.json"  # the base's score, kept across runs with other --lr
    before = json.loads(scored.read_text())["mean_dice"] if scored.is_file() else evaluate(
        args.base, other_dir, scored, args.device)
    after = evaluate(tuned, other_dir, tuned.with_suffix(".scored.json"), args.device)
    result = {"patients": patients, "corrected": [rows[i]["file"] for i in corrected], "scored_slices": len(other),
              "dice_before": before, "dice_after": after, "finetune_seconds": round(seconds, 1),
              "lr": args.lr, "device": args.device, "cpu_threads": os.environ.get("OMP_NUM_THREADS")}
    tuned.with_suffix(".result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"mean Dice on {len(other)} other slices: base {before:.4f} -> fine-tuned {after:.4f} "
          f"({100 * (after - before):+.1f} points); relseg finetune took {seconds:.0f} s on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
