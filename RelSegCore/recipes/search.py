"""The honest search for the paper's gain: which variant of the dual model, if any, beats target-only?

Issue: the ablation of ``shipped_models.py`` shows no gain from the non-COVID data with a frozen
general encoder fused at every level and a weak relation term. This recipe measures the
remaining axes with the same budget for every configuration, on chosen folds of the 50
COVID-SemiSeg training slices:

- fusion levels (bottleneck only, the three deepest, all);
- frozen vs fine-tuned general encoder, and a target encoder started from the general one;
- relation-loss weight (10, 100);
- which non-COVID sets train the general encoder (each set family alone vs all, each with a
  stage 1 of the same budget made here).

Every step is a plain ``relseg`` command, printed as it runs. Finished runs (a
``fold_result.json``) are skipped, so the search can be stopped and resumed.
Writes ``search.md`` and ``search.json`` in ``--out``.

    python RelSegCore/recipes/search.py --covid ../shared/data/covid-semiseg/train \\
        --shared-data ../shared/data --general work-dirs/recipe/general/covid-general-encoder.pt \\
        --out work-dirs/search-cpu --folds 0 --iterations 300 --batch-size 8 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped_models import CONFIGS as RECIPE_CONFIGS  # noqa: E402  (a sibling script, not a package)
from shipped_models import relseg, run_all  # noqa: E402

SHIPPED_DUAL = RECIPE_CONFIGS["dual-frozen+relation-encoders"]  # general encoder frozen, relation `encoders` w 10
# name -> (stage-1 sets or None for --general / no general encoder, extra ``relseg train`` arguments)
CONFIGS: dict[str, tuple[str | None, list[str]]] = {
    "target-only": (None, RECIPE_CONFIGS["target-only"]),
    "dual+relation-w10 (shipped recipe)": (None, SHIPPED_DUAL),
    "fusion: bottleneck only": (None, RECIPE_CONFIGS["dual-frozen+relation-encoders+bottleneck"]),
    "fusion: three deepest levels": (None, [*SHIPPED_DUAL, "--fusion-levels", "2,3,4"]),
    "general encoder fine-tuned (lr x0.1)": (None, [*SHIPPED_DUAL, "--finetune-general", "--general-lr-scale", "0.1"]),
    "target encoder started from general": (None, [*SHIPPED_DUAL, "--init-target-from-general"]),
    "relation weight 100": (None, ["--general-encoder", "{general}", "--relation", "encoders",
                                   "--relation-weight", "100"]),
    "stage 1 here: all sets": ("lidc,pleural-effusion,lung-tumor,msd-patches", SHIPPED_DUAL),
    "stage 1 here: LIDC nodules only": ("lidc", SHIPPED_DUAL),
    "stage 1 here: effusion + tumour volumes": ("pleural-effusion,lung-tumor", SHIPPED_DUAL),
    "stage 1 here: MSD tumour patches only": ("msd-patches", SHIPPED_DUAL),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def stage1_command(args: argparse.Namespace, sets: str) -> tuple[Path, list[str]]:
    out = args.out / "stage1" / slug(sets)
    return out / "general.pt", relseg(
        "pretrain-general", "--shared-data", str(args.shared_data), "--sets", sets, "--cache-dir", str(args.cache_dir),
        "--iterations", str(args.iterations), "--batch-size", str(args.batch_size), "--device", args.device,
        "--out", str(out), "--export", "general", "--description", f"search stage 1 on {sets}")


def train_command(args: argparse.Namespace, name: str, general: Path, fold: int) -> list[str]:
    extra = [a.replace("{general}", str(general)) for a in CONFIGS[name][1]]
    return relseg("train", "--images", str(args.covid / "images"), "--masks", str(args.covid / "masks"),
                  "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
                  "--device", args.device, *extra, "--fold", str(fold), "--folds", "5",
                  "--out", str(args.out / slug(name) / f"fold{fold}"))


def fold_dice(args: argparse.Namespace, name: str, fold: int) -> float | None:
    path = args.out / slug(name) / f"fold{fold}" / "fold_result.json"
    return json.loads(path.read_text())["val_dice"] if path.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covid", type=Path, required=True, help="COVID-SemiSeg train folder (images/, masks/)")
    parser.add_argument("--shared-data", type=Path, required=True, help="data root with the non-COVID sets")
    parser.add_argument("--general", type=Path, required=True, help="the recipe's stage-1 model (.pt)")
    parser.add_argument("--out", type=Path, default=Path("work-dirs/search"))
    parser.add_argument("--cache-dir", type=Path, default=Path("work-dirs/cache"))
    parser.add_argument("--folds", default="0,1,2,3,4", help="comma-separated folds to run")
    parser.add_argument("--only", help="comma-separated configuration names (default: all, in order)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    parser.add_argument("--report-only", action="store_true", help="only write the table of the finished runs")
    args = parser.parse_args()
    folds = [int(k) for k in args.folds.split(",")]
    names = args.only.split(",") if args.only else list(CONFIGS)

    stage1 = {sets: stage1_command(args, sets) for sets in {CONFIGS[name][0] for name in names} - {None}}
    generals = {name: args.general if CONFIGS[name][0] is None else stage1[CONFIGS[name][0]][0] for name in names}
    if not args.report_only:
        run_all([command for model, command in stage1.values() if not model.is_file()], args.jobs,
                args.out / "logs" / "stage1")
        # Fold by fold, so that a stopped search leaves every configuration compared on the same folds.
        pending = [train_command(args, name, generals[name], k) for k in folds for name in names
                   if fold_dice(args, name, k) is None]
        run_all(pending, args.jobs, args.out / "logs" / "stage2")  # all at once: a GPU runs many side by side

    rows, table = {}, ["| configuration | " + " | ".join(f"fold {k}" for k in folds) + " | mean | vs target-only |",
                       "|---" * (len(folds) + 3) + "|"]
    baseline = [fold_dice(args, "target-only", k) for k in folds]
    for name in names:
        dice = [fold_dice(args, name, k) for k in folds]
        done = [d for d in dice if d is not None]
        # Paired by fold: the same 10 validation slices on both sides, so fold difficulty cancels.
        paired = [d - b for d, b in zip(dice, baseline, strict=True) if d is not None and b is not None]
        rows[name] = {"fold_dice": dice, "mean_dice": statistics.fmean(done) if done else None,
                      "mean_difference_vs_target_only": statistics.fmean(paired) if paired else None,
                      "command": "relseg " + " ".join(train_command(args, name, Path("GENERAL.pt"), folds[0])[3:])}
        cells = ["-" if d is None else f"{d:.4f}" for d in [*dice, rows[name]["mean_dice"]]]
        difference = "-" if not paired or name == "target-only" else \
            f"{100 * statistics.fmean(paired):+.2f} points ({len(paired)} fold{'s' * (len(paired) > 1)})"
        table.append(f"| {name} | " + " | ".join(cells) + f" | {difference} |")
    (args.out / "search.md").write_text("\n".join(table) + "\n")
    (args.out / "search.json").write_text(json.dumps(
        {"iterations": args.iterations, "batch_size": args.batch_size, "device": args.device, "folds": folds,
         "configurations": rows}, indent=2) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
