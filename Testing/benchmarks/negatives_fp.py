"""Do non-COVID negatives (``relseg train --negatives``) stop false positives on non-COVID CT, and at what cost?

The shipped model flags a few hundred mL in the lungs of non-COVID lung-cancer patients (the
dependent densities of the pleural-effusion set): it never saw a slice without COVID-19. This
trains target-only folds again with negatives and compares them with the same folds without,
on three things, each pair from one fold's two models:

- COVID Dice on the fold's 10 validation slices (the fold's own ``fold_result.json``);
- false-positive infection (mL, % of the lungs) on pleural-effusion patients the negatives
  did not include (patients are split in two halves by name: the first half are negatives,
  the second half is scored), end to end through ``relsegcore.segment``;
- on the real COVID HU slices (``covid-hu-slices``), the share of ground-glass-range lung
  (-750..-300 HU) still flagged (it must not collapse).

Negatives: the first half of the pleural-effusion patients and both lung-tumour volumes
(slices with effusion / tumour, lung-cropped like the COVID slices, masks ignored).

    python Testing/benchmarks/negatives_fp.py --covid ../shared/data/covid-semiseg/train \
        --shared-data ../shared/data --baseline work-dirs/search-cpu/target-only \
        --out work-dirs/negatives --folds 0,1 --iterations 300 --batch-size 8 --device cpu

``--baseline`` reuses finished folds of ``RelSegCore/recipes/search.py`` (same command without
``--negatives``); without it the baseline folds are trained here too. ``--train-args`` gives
both the same extra ``relseg train`` arguments, e.g. the shipped dual configuration:
``--train-args "--general-encoder work-dirs/recipe/general/covid-general-encoder.pt --relation
encoders --relation-weight 10" --baseline work-dirs/search-cpu/dual-relation-w10-shipped-recipe``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_real_data import covid_hu_slices, false_positives  # noqa: E402  (sibling benchmark scripts)
from tta_cv import fold_model  # noqa: E402


def split_effusion(shared: Path, out: Path) -> tuple[Path, list[Path]]:
    """A folder of links to the first half of the effusion patients (negatives), and the CTs of the rest."""
    cts = sorted((shared / "pleural-effusion").glob("*_ct.nii.gz"))
    half = len(cts) // 2
    folder = out / "negatives-effusion"
    folder.mkdir(parents=True, exist_ok=True)
    for ct in cts[:half]:
        for path in (ct, ct.with_name(ct.name.replace("_ct", "_effusion"))):
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folder, cts[half:]


def train_fold(args: argparse.Namespace, out: Path, fold: int, extra: list[str]) -> None:
    if (out / "fold_result.json").is_file():
        return
    command = [sys.executable, "-m", "relsegcore.cli", "train", "--images", str(args.covid / "images"),
               "--masks", str(args.covid / "masks"), "--iterations", str(args.iterations),
               "--batch-size", str(args.batch_size), "--device", args.device, *extra,
               "--fold", str(fold), "--folds", "5", "--out", str(out)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def score(fold_dir: Path, held_out: list[Path], args: argparse.Namespace) -> dict:
    """COVID validation Dice, false positives on the held-out effusion patients, ground-glass still flagged."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = fold_model(fold_dir, Path(tmp))
        model_path = str(loaded.card.path)
        fps = [false_positives(model_path, args.device, ct, ct.with_name(ct.name.replace("_ct", "_effusion")))
               for ct in held_out]
        ggo = covid_hu_slices(loaded, args.shared_data / "covid-hu-slices")
    return {
        "covid_dice": json.loads((fold_dir / "fold_result.json").read_text())["val_dice"],
        "fp_ml": [row["infection_ml"] for row in fps],
        "fp_percent_of_lungs": [100 * row["infection_ml"] / row["lungs_ml"] for row in fps],
        "ggo_fraction_flagged": statistics.fmean(row["ggo_hu_fraction_flagged"] for row in ggo),
        "aerated_fraction_flagged": statistics.fmean(row["aerated_fraction_flagged"] for row in ggo),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covid", type=Path, required=True, help="COVID-SemiSeg train folder (images/, masks/)")
    parser.add_argument("--shared-data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="finished target-only fold*/ runs of the same budget")
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--negative-fraction", default="0.25")
    parser.add_argument("--train-args", default="", help="extra relseg train arguments for both models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path("work-dirs/cache"))
    args = parser.parse_args()
    folds = [int(k) for k in args.folds.split(",")]
    negatives, held_out = split_effusion(args.shared_data, args.out)
    tumours = args.shared_data / "lung-tumor-volumes"
    with_negatives = ["--negatives", f"pairs:{negatives}", "--negatives", f"pairs:{tumours}",
                      "--negative-fraction", args.negative_fraction, "--cache-dir", str(args.cache_dir)]
    baseline_root = args.baseline or args.out / "target-only"
    configuration = shlex.split(args.train_args)
    for fold in folds:
        train_fold(args, baseline_root / f"fold{fold}", fold, configuration)
        train_fold(args, args.out / "with-negatives" / f"fold{fold}", fold, [*configuration, *with_negatives])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"held-out effusion patients: {', '.join(ct.name.split('_')[0] for ct in held_out)}")
    print("| fold | model | COVID Dice | false positives, mL (per patient) | mean % of lungs | GGO-range flagged | "
          "aerated flagged |\n|---|---|---:|---|---:|---:|---:|")
    results = {}
    for fold in folds:
        for name, root in (("without negatives", baseline_root), ("with negatives", args.out / "with-negatives")):
            row = score(root / f"fold{fold}", held_out, args)
            results[f"fold{fold}/{name}"] = row
            print(f"| {fold} | {name} | {row['covid_dice']:.4f} | {', '.join(f'{v:.0f}' for v in row['fp_ml'])} | "
                  f"{statistics.fmean(row['fp_percent_of_lungs']):.1f} | {row['ggo_fraction_flagged']:.3f} | "
                  f"{row['aerated_fraction_flagged']:.3f} |", flush=True)
    (args.out / "negatives_fp.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
