"""The default infection model's recipe in one command: ``covid-infection-2d`` 2.6.0's three stages in a row.

2.6.0 was made one stage a session, each stage going on from the weights the one before exported:

1. from scratch: 1,200 iterations of batch 8 on the 1,163 slices of ``covid-ct-seg-2d``, every chest anterior up
   (``--upright``), non-COVID CT slices as negatives (15 % of each batch): 2.3.0's weights;
2. 1,200 more iterations of the same: 2.4.0's;
3. 800 more with the negatives' normal lung also rendered with 25-150 HU of white and sharp-kernel noise added,
   so CT noise is not taken for ground-glass (2.5.0's), and a missed pixel costing the overlap loss a little more
   than a false one (``--false-negative-weight 0.6``, a Tversky index; 2.5.0 had 0.5, Dice): 2.6.0's.

Each stage is a plain ``relseg train`` command, printed as it runs; a stage whose model is already exported is
skipped, so the recipe can be stopped and resumed between stages. ``--fold K`` (repeatable) makes fold models
instead: the same stages on 9 of the 12 patients (``--fold K --folds 4``), scored on the other three by
``python Testing/benchmarks/choose_postprocessing.py --folds OUT/foldK/stage3 --thresholds 0.3 --flip-tta``
(the four-fold table of RelSegCore/README.md). About 2.5 hours a model on one CPU core (3 s an iteration)::

    python RelSegCore/recipes/default_infection.py --out work-dirs/default [--fold 0 --fold 3 --jobs 2]
        [--data ../shared/data/covid-ct-seg-2d] [--shared-data ../shared/data] [--device cpu] [--dry-run]
        [-- EXTRA relseg train ARGUMENTS]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipped_models import relseg, run_all  # noqa: E402  (a sibling script, not a package)

MODEL = "covid-infection-2d"


class Stage(NamedTuple):
    folder: str
    iterations: int
    seed: int
    extra: tuple[str, ...]  # what this stage adds to the shared arguments


STAGES = (
    Stage("stage1", 1200, 0, ()),
    Stage("stage2", 1200, 2, ()),
    Stage("stage3", 800, 3, ("--augment-noise", "0.1", "--negative-noise", "25,50,100,150",
                             "--false-negative-weight", "0.6")),
)


def shared_arguments(data: Path, shared_data: Path, cache_dir: Path, device: str) -> list[str]:
    """What every stage trains on and how: the COVID-19 slices upright, the non-COVID CT negatives."""
    return ["--data", f"ctseg2d:{data}", "--upright",
            "--negatives", f"ct:{shared_data}/pleural-effusion/LUNG1-00*_ct.nii.gz",
            "--negatives", f"ct:{shared_data}/lung-tumor-volumes/lung1_image.nrrd", "--negative-fraction", "0.15",
            "--cache-dir", str(cache_dir), "--batch-size", "8", "--no-validation", "--device", device]


class Step(NamedTuple):
    command: list[str]
    model: Path  # what the command exports; the next stage starts from it


def stage_commands(out: Path, shared: list[str], fold: int | None, extra: list[str]) -> list[Step]:
    """The three ``relseg train`` steps of one model (all patients, or fold ``fold`` of 4), in order."""
    name = MODEL if fold is None else f"fold{fold}"
    folds = [] if fold is None else ["--fold", str(fold), "--folds", "4"]
    steps: list[Step] = []
    for stage in STAGES:
        init = ["--init", str(steps[-1].model)] if steps else []
        folder = out / stage.folder
        steps.append(Step(relseg("train", *shared, "--iterations", str(stage.iterations), "--seed", str(stage.seed),
                                 *init, *stage.extra, *folds, *extra, "--out", str(folder), "--export", name),
                          folder / f"{name}.pt"))
    return steps


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/covid-ct-seg-2d"))
    parser.add_argument("--shared-data", type=Path, default=Path("../shared/data"),
                        help="holds pleural-effusion/ and lung-tumor-volumes/, the negatives")
    parser.add_argument("--cache-dir", type=Path, help="the negatives' rendered slices (default OUT/cache)")
    parser.add_argument("--fold", type=int, action="append", choices=range(4),
                        help="make fold K's models (9 patients) instead of the all-patient one; repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="folds trained side by side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    shared = shared_arguments(args.data, args.shared_data, args.cache_dir or args.out / "cache", args.device)
    chains = ([stage_commands(args.out, shared, None, extra)] if args.fold is None else
              [stage_commands(args.out / f"fold{k}", shared, k, extra) for k in args.fold])
    for index, stage in enumerate(STAGES):
        steps = [chain[index] for chain in chains]
        if args.dry_run:
            print("\n".join("relseg " + shlex.join(step.command[3:]) for step in steps))
            continue
        todo = []
        for step in steps:
            if step.model.is_file():
                print(f"# {stage.folder} done: {step.model}")
            else:
                todo.append(step.command)
        if todo:
            run_all(todo, args.jobs, args.out / "logs" / stage.folder)
    if not args.dry_run:
        print("\n".join(str(chain[-1].model) for chain in chains))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
