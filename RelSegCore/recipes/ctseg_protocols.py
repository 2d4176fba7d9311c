"""The paper's protocols on the paper's data, by patient: Task 1, Task 3 pooled and the dual encoder.

COVID-19-CT-Seg's Task 1 trains on few COVID cases (4 of 20) and tests on the rest; Task 3 pools
non-COVID lesion data with the same COVID cases; the paper's dual encoder adds a general encoder
trained on the non-COVID lesions, and the relation loss. Here, in 2D on the 12 patients of
``covid-ct-seg-2d``: the patients are dealt into ``--folds`` folds (``relsegcore.data.ctseg.patient_folds``;
3 folds: 4 patients each, as Task 1's 4 training cases); for each fold, every method trains on that
fold's patients only (``relseg train --fold k --few-shot``) and is scored on all the other patients' slices with
``relseg evaluate --data ctseg2d:DIR --cases ...`` (Dice, and NSD in pixels: the slices carry no
spacing). Non-COVID data goes through the same ``full-slice-clahe`` recipe as the COVID slices, so
the network cannot tell the sources apart by appearance.

Every step is a plain ``relseg`` command, printed as it runs; finished steps are skipped, so the
recipe can be stopped and resumed. Writes ``protocols.md`` and ``protocols.json`` in ``--out``::

    python RelSegCore/recipes/ctseg_protocols.py --data ../shared/data/covid-ct-seg-2d \\
        --shared-data ../shared/data --out work-dirs/protocols --folds 3 --iterations 2000 --device cuda --jobs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped_models import relseg, run_all  # noqa: E402  (a sibling script, not a package)

GENERAL_SETS = "pleural-effusion,lung-tumor"  # whole-chest volumes: rendered by the recipe like the COVID slices
METHODS: dict[str, list[str]] = {
    "Task 1 (COVID only)": [],
    "Task 3 (pooled non-COVID + COVID)": ["--pooled", "pairs:{shared}/pleural-effusion",
                                          "--pooled", "pairs:{shared}/lung-tumor-volumes"],
    "dual encoder + relation loss": ["--general-encoder", "{general}", "--relation", "encoders",
                                     "--relation-weight", "10"],
}


def common(args: argparse.Namespace) -> list[str]:
    return ["--iterations", str(args.iterations), "--batch-size", str(args.batch_size), "--device", args.device,
            "--patch-size", str(args.patch_size), "--validate-every", str(args.iterations),
            "--cache-dir", str(args.out / "cache")]


def fold_common(args: argparse.Namespace) -> list[str]:
    """The held-out patients are scored once, by ``relseg evaluate`` (with NSD), not also while training."""
    return [*common(args), "--no-validation"]


def stage1(args: argparse.Namespace) -> tuple[list[str], Path]:
    out = args.out / "general"
    command = relseg("pretrain-general", "--shared-data", str(args.shared_data), "--sets", GENERAL_SETS,
                     "--recipe", "full-slice-clahe", "--out", str(out), "--export", "general", *common(args))
    return command, out / "general.pt"


def fold_run(args: argparse.Namespace, method: str, fold: int, general: Path) -> tuple[list[str], Path]:
    out = args.out / _slug(method) / f"fold{fold}"
    extra = [a.format(shared=args.shared_data, general=general) for a in METHODS[method]]
    command = relseg("train", "--data", f"ctseg2d:{args.data}", "--fold", str(fold), "--folds", str(args.folds),
                     "--few-shot", "--out", str(out), "--export", "model", *extra, *fold_common(args))
    return command, out


def evaluation(args: argparse.Namespace, run: Path) -> tuple[list[str], Path]:
    held_out = json.loads((run / "fold_result.json").read_text())["val_patients"]
    out = run / "held_out.json"
    return relseg("evaluate", "--model", str(run / "model.pt"), "--data", f"ctseg2d:{args.data}",
                  "--cases", ",".join(held_out), "--json", str(out), "--device", args.device), out


def table(args: argparse.Namespace) -> dict:
    """Per method: each fold's held-out Dice and NSD, mean ± sd, and the paired difference to Task 1."""
    rows = {}
    for method in METHODS:
        folds = []
        for fold in range(args.folds):
            path = args.out / _slug(method) / f"fold{fold}" / "held_out.json"
            result = json.loads(path.read_text())
            folds.append({"fold": fold, "dice": result["mean_dice"],
                          "nsd": result["metrics"].get("nsd", {}).get("mean")})
        rows[method] = folds
    baseline = [f["dice"] for f in rows["Task 1 (COVID only)"]]
    summary = {}
    for method, folds in rows.items():
        dice = [f["dice"] for f in folds]
        nsd = [f["nsd"] for f in folds if f["nsd"] is not None]
        differences = [100 * (d - b) for d, b in zip(dice, baseline, strict=True)]
        summary[method] = {
            "folds": folds, "dice_mean": statistics.fmean(dice), "dice_sd": _sd(dice),
            "nsd_mean": statistics.fmean(nsd) if nsd else None, "nsd_sd": _sd(nsd) if nsd else None,
            "dice_points_vs_task1_mean": statistics.fmean(differences), "dice_points_vs_task1_sd": _sd(differences),
        }
    return summary


def write_table(args: argparse.Namespace, summary: dict) -> None:
    lines = [f"| method | held-out Dice ({args.folds} folds, mean ± sd) | NSD (px) | Dice points vs Task 1 |",
             "|---|---|---|---|"]
    for method, row in summary.items():
        nsd = f"{row['nsd_mean']:.3f} ± {row['nsd_sd']:.3f}" if row["nsd_mean"] is not None else "–"
        lines.append(f"| {method} | {row['dice_mean']:.4f} ± {row['dice_sd']:.4f} | {nsd} | "
                     f"{row['dice_points_vs_task1_mean']:+.2f} ± {row['dice_points_vs_task1_sd']:.2f} |")
    (args.out / "protocols.md").write_text("\n".join(lines) + "\n")
    (args.out / "protocols.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-").replace("--", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a covid-ct-seg-2d folder")
    parser.add_argument("--shared-data", type=Path, required=True, help="the folder holding the non-COVID sets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3, help="3: 4 training patients a fold, as Task 1's 4 cases")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=160)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    args = parser.parse_args()
    general_command, general = stage1(args)
    runs = [fold_run(args, method, fold, general) for method in METHODS for fold in range(args.folds)]
    needs_general = [command for command, out in runs if str(general) in command]
    todo = [command for command, out in runs if not (out / "model.pt").is_file()]  # resumed if interrupted
    # the general encoder trains alongside the runs that do not need it; the dual runs follow
    first = ([] if general.is_file() else [general_command]) + [c for c in todo if c not in needs_general]
    run_all(first, args.jobs, args.out / "logs" / "train")
    run_all([c for c in todo if c in needs_general], args.jobs, args.out / "logs" / "train-dual")
    evaluations = [evaluation(args, out) for _, out in runs]
    run_all([command for command, out in evaluations if not out.is_file()], args.jobs, args.out / "logs" / "evaluate")
    write_table(args, table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
