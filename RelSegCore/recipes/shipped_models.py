"""Reproduce the COVID-SemiSeg models (1.x, lung-crop) and their ablation table from the real data.

Since 2.0.0 the default ``covid-infection-2d`` and ``covid-lungs-2d`` are trained on real CT
(``covid-ct-seg-2d``) by the ``relseg train`` commands in their cards (the default's: ``default_infection.py``);
this recipe makes the screenshot models: ``covid-semiseg-2d`` (shipped, the 1.0.0 default) and
``covid-semiseg-2d-target-only`` (not shipped any more).

Every step is a plain ``relseg`` command (printed as it runs, and recorded in each model
card), so a researcher can run any step alone. This script only orders them and runs
independent ones in parallel (on a GPU, many small trainings share the card):

1. stage 1: ``relseg pretrain-general`` on the non-COVID lesion sets -> the general encoder;
2. 5-fold cross-validation on the 50 COVID-SemiSeg training slices of: target-only,
   dual (general frozen), dual + relation loss (each reading), all with the same budget;
3. the models trained on all 50 slices: ``covid-semiseg-2d-target-only`` and
   ``covid-semiseg-2d`` (the dual configuration that cross-validated best);
4. ``ablation.md`` / ``ablation.json`` with mean ± sd Dice per configuration;
5. with ``--shared-data``, each shipped card also states the model's behaviour on real CT
   (``Testing/benchmarks/check_real_data.py --card``: ground-glass flagged on real COVID-19
   HU slices, false positives on non-COVID patients).

Usage (from the repository root)::

    python RelSegCore/recipes/shipped_models.py --covid ../shared/data/covid-semiseg/train \\
        --shared-data ../shared/data --out work-dirs/recipe --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# name -> extra ``relseg train`` arguments; "{general}" is the stage-1 model.
CONFIGS = {
    "target-only": [],
    "dual-frozen": ["--general-encoder", "{general}"],
    "dual-frozen+relation-encoders": ["--general-encoder", "{general}", "--relation", "encoders",
                                      "--relation-weight", "10"],
    "dual-frozen+relation-ema": ["--general-encoder", "{general}", "--relation", "ema", "--relation-weight", "10"],
    # The best dual variant of the CPU search (RelSegCore/README.md): general features at the bottleneck only.
    "dual-frozen+relation-encoders+bottleneck": ["--general-encoder", "{general}", "--relation", "encoders",
                                                 "--relation-weight", "10", "--fusion-levels", "4"],
}
SHIPPED_TARGET_ONLY = "covid-semiseg-2d-target-only"
SHIPPED_DEFAULT = "covid-semiseg-2d"


def relseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "relsegcore.cli", *args]


def run_all(commands: list[list[str]], jobs: int, log_dir: Path) -> None:
    """Run commands, ``jobs`` at a time, each logging to its own file; fail if any fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))  # cores shared out
    pending = list(enumerate(commands))
    running: list[tuple[int, subprocess.Popen]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            index, command = pending.pop(0)
            print("$ relseg " + shlex.join(command[3:]), flush=True)
            log = open(log_dir / f"job{index:02d}.log", "w")
            running.append((index, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(1)
        for index, process in list(running):
            if process.poll() is not None:
                running.remove((index, process))
                if process.returncode:
                    failed.append(index)
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: see {log_dir}/job{failed[0]:02d}.log")


def train_args(args: argparse.Namespace, iterations: int) -> list[str]:
    return ["train", "--images", str(args.covid / "images"), "--masks", str(args.covid / "masks"),
            "--iterations", str(iterations), "--batch-size", str(args.batch_size), "--device", args.device,
            "--validate-every", str(max(iterations // 8, 1))]


def cv_commands(args, name: str, general: Path, iterations: int) -> list[list[str]]:
    extra = [a.replace("{general}", str(general)) for a in CONFIGS[name]]
    return [relseg(*train_args(args, iterations), *extra, "--fold", str(k), "--folds", "5",
                   "--out", str(args.out / "cv" / name / f"fold{k}")) for k in range(5)]


def final_command(args, name: str, export: str, general: Path, iterations: int, description: str) -> list[str]:
    extra = [a.replace("{general}", str(general)) for a in CONFIGS[name]]
    return relseg(*train_args(args, iterations), *extra, "--out", str(args.out / "final" / export),
                  "--export", export, "--model-dir", str(args.models_dir), "--description", description)


def cv_summary(args, name: str) -> dict:
    from relsegcore.crossval import summarise_folds

    results = [json.loads((args.out / "cv" / name / f"fold{k}" / "fold_result.json").read_text()) for k in range(5)]
    return summarise_folds(results)


def add_cv_to_card(args, export: str, name: str, summary: dict, commands: list[list[str]]) -> None:
    """The card's metrics: this configuration's 5-fold cross-validation (weights and SHA-256 unchanged)."""
    path = args.models_dir / f"{export}.json"
    card = json.loads(path.read_text())
    card["metrics"]["cross_validation"] = {
        "protocol": "5-fold CV on the 50 COVID-SemiSeg training slices (folds: relsegcore.crossval.fold_indices"
                    "(50, 5, seed=0)); mean over folds of each fold's mean per-slice Dice at 256x256",
        "configuration": name,
        "mean_dice": summary["mean_dice"], "sd_dice": summary["sd_dice"],
        "fold_dice": [f["val_dice"] for f in summary["folds"]],
        "commands": ["relseg " + shlex.join(c[3:]) for c in commands],
    }
    if "--general-encoder" in commands[0]:
        general = json.loads(args.general_model.with_suffix(".json").read_text())
        card["training"]["general_encoder"] = {
            "data": general["training"]["data"], "command": general["training"]["command"],
            "prepare_command": f"relseg pretrain-general --shared-data ../shared/data --save-slices "
                               f"{args.general_slices} --prepare-only --cache-dir work-dirs/cache "
                               f"--out work-dirs/general",
            "sha256": general["sha256"], "metrics": general["metrics"]}
    card["training"]["data"] = (f"COVID-SemiSeg training set, 50 axial CT slices with expert infection masks "
                                f"({args.covid}); research use")
    path.write_text(json.dumps(card, indent=2) + "\n")


def calibrate(args, jobs: int) -> float:
    """Seconds per iteration of a dual model when ``jobs`` trainings share the device."""
    probe = args.out / "calibrate"
    commands = [relseg(*train_args(args, 60), "--general-encoder", str(args.general_model), "--no-resume",
                       "--out", str(probe / f"p{k}")) for k in range(jobs)]
    started = time.perf_counter()
    run_all(commands, jobs, probe / "logs")
    seconds = time.perf_counter() - started
    per_iteration = max(seconds - args.startup_seconds, 1.0) / 60
    print(f"calibration: {jobs} parallel trainings, {per_iteration * 1000:.0f} ms per iteration", flush=True)
    return per_iteration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--covid", type=Path, required=True, help="COVID-SemiSeg train folder (images/, masks/)")
    parser.add_argument("--shared-data", type=Path, help="data root with the non-COVID sets (stage 1)")
    parser.add_argument("--general-slices", type=Path, help="prepared non-COVID slices (--save-slices) instead")
    parser.add_argument("--out", type=Path, default=Path("work-dirs/recipe"))
    parser.add_argument("--models-dir", type=Path, default=Path("Resources/Models"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", default="3000", help="per training, or 'auto:SECONDS' to fit a budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    parser.add_argument("--startup-seconds", type=float, default=8.0, help="process start, for auto iterations")
    args = parser.parse_args()
    args.models_dir.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"

    slices = args.general_slices or args.out / "general-slices.npz"
    if not slices.is_file():
        run_all([relseg("pretrain-general", "--shared-data", str(args.shared_data), "--save-slices", str(slices),
                        "--prepare-only", "--cache-dir", str(args.out / "cache"), "--out", str(args.out / "general"))],
                1, logs / "prepare")
    args.general_model = args.out / "general" / "covid-general-encoder.pt"
    if str(args.iterations).startswith("auto:"):
        budget = float(args.iterations.split(":")[1])
        # A throw-away stage-1 model of a few iterations lets calibration run the dual network.
        run_all([relseg("pretrain-general", "--data", f"slices:{slices}", "--iterations", "2", "--batch-size", "2",
                        "--device", args.device, "--out", str(args.out / "general"), "--no-resume",
                        "--export", "covid-general-encoder")], 1, logs / "probe")
        per_iteration = calibrate(args, args.jobs)
        # Three waves at full concurrency (stage 1 + target-only, dual CV, final default), lighter ones faster.
        iterations = int(max(200, min(6000, (budget - 3 * args.startup_seconds) / (2.6 * per_iteration))) // 100 * 100)
    else:
        iterations = int(args.iterations)
    stage1_iterations = iterations
    print(f"iterations per training: {iterations}", flush=True)

    # Wave 1: stage 1, and everything that does not need it.
    stage1 = relseg("pretrain-general", "--data", f"slices:{slices}", "--iterations", str(stage1_iterations),
                    "--batch-size", str(args.batch_size), "--device", args.device, "--no-resume",
                    "--validate-every", str(max(stage1_iterations // 8, 1)), "--out", str(args.out / "general"),
                    "--export", "covid-general-encoder",
                    "--description", "general encoder: non-COVID lung lesions (stage 1 of the dual model)")
    target_cv = cv_commands(args, "target-only", args.general_model, iterations)
    target_final = final_command(args, "target-only", SHIPPED_TARGET_ONLY, args.general_model, iterations,
                                 "COVID-19 infection, 2D U-Net trained on COVID slices only (baseline)")
    run_all([stage1, *target_cv, target_final], args.jobs, logs / "wave1")

    # Wave 2: the dual configurations, cross-validated.
    dual = [name for name in CONFIGS if name != "target-only"]
    run_all([c for name in dual for c in cv_commands(args, name, args.general_model, iterations)], args.jobs,
            logs / "wave2")
    summaries = {name: cv_summary(args, name) for name in CONFIGS}
    best = max(dual, key=lambda name: summaries[name]["mean_dice"])

    # Wave 3: the default model, from the best dual configuration.
    run_all([final_command(args, best, SHIPPED_DEFAULT, args.general_model, iterations,
                           f"COVID-19 infection, dual encoder ({best}); general encoder from non-COVID lesions")],
            1, logs / "wave3")
    add_cv_to_card(args, SHIPPED_TARGET_ONLY, "target-only", summaries["target-only"],
                   cv_commands(args, "target-only", args.general_model, iterations))
    add_cv_to_card(args, SHIPPED_DEFAULT, best, summaries[best],
                   cv_commands(args, best, args.general_model, iterations))
    if args.shared_data:  # the cards also state how each model behaves on real CT (check_real_data.py --card)
        check = Path(__file__).resolve().parents[2] / "Testing" / "benchmarks" / "check_real_data.py"
        for export in (SHIPPED_TARGET_ONLY, SHIPPED_DEFAULT):
            subprocess.run([sys.executable, str(check), "--model", str(args.models_dir / f"{export}.json"),
                            "--device", args.device, "--card"], check=True,
                           env=dict(os.environ, RELSEG_SHARED_DATA=str(args.shared_data.resolve())))

    table = ["| configuration | mean Dice | sd | folds |", "|---|---|---|---|"]
    for name, summary in summaries.items():
        folds = ", ".join(f"{f['val_dice']:.3f}" for f in summary["folds"])
        table.append(f"| {name} | {summary['mean_dice']:.4f} | {summary['sd_dice']:.4f} | {folds} |")
    (args.out / "ablation.md").write_text("\n".join(table) + "\n")
    (args.out / "ablation.json").write_text(json.dumps(
        {"iterations": iterations, "batch_size": args.batch_size, "device": args.device, "best_dual": best,
         "summaries": summaries, "commands": {n: ["relseg " + shlex.join(c[3:]) for c in cv_commands(
             args, n, args.general_model, iterations)] for n in CONFIGS}}, indent=2) + "\n")
    print("\n".join(table))
    print(f"COVID-SemiSeg model: {SHIPPED_DEFAULT} <- {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
