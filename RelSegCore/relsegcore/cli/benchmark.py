"""``relseg benchmark task1|task3``: the COVID-19-CT-Seg protocols, one command each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.general import DATA_KINDS
from ..data.intensity import FULL_SLICE_CLAHE, RECIPES
from . import add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    benchmark = subparsers.add_parser(
        "benchmark", help="run the COVID-19-CT-Seg benchmark protocols (Task 1, Task 3)",
        description="Train one model per fold on the benchmark's few COVID cases, score the other cases "
                    "through the full pipeline (DSC, NSD at 3 mm) and write the benchmark's table.",
    )
    tasks = benchmark.add_subparsers(dest="task", metavar="TASK", required=True)
    task1 = tasks.add_parser(
        "task1", help="limited annotations: each fold trains on 4 COVID cases and tests on the other 16",
        description="COVID-19-CT-Seg Task 1: the cases are split into --folds groups of --train-cases; each "
                    "group is one fold's training set, all other cases its test set.",
    )
    _add_common(task1)
    task3 = tasks.add_parser(
        "task3", help="non-COVID lesion data plus the 4 COVID cases of each fold",
        description="COVID-19-CT-Seg Task 3: the Task 1 folds with non-COVID lesion data added, pooled into one "
                    "training (the benchmark's baseline) or through this project's dual encoder.",
    )
    _add_common(task3)
    task3.add_argument("--general-data", action="append", default=[], metavar="KIND:PATH",
                       help=f"non-COVID lesion data, KIND one of {', '.join(DATA_KINDS)} "
                            "(e.g. decathlon:Task06_Lung, pairs:NSCLC-PE); repeat for several")
    task3.add_argument("--method", choices=("dual", "pooled"), default="dual",
                       help="dual: general encoder from the non-COVID data + dual model with the relation loss "
                            "(default); pooled: the benchmark's one training on all data")
    task3.add_argument("--general-encoder", type=Path, metavar="MODEL",
                       help="dual: an existing stage-1 model (.pt) instead of training one on --general-data")
    task3.add_argument("--general-iterations", type=int, help="stage-1 iterations (default: --iterations)")
    task3.add_argument("--relation-weight", type=float, default=10.0,
                       help="weight of the relation loss, reading 'encoders' (default: 10, as the shipped model)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of CT volumes (e.g. COVID-19-CT-Seg_20cases), or a folder holding "
                             "imagesTr/ and labelsTr/")
    parser.add_argument("--masks", type=Path, help="folder of infection masks with the CTs' file names "
                                                   "(e.g. Infection_Mask)")
    parser.add_argument("--out", type=Path, required=True,
                        help="results folder: foldK/, results.json, table.md; finished folds are skipped")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--train-cases", type=int, default=4, help="training cases per fold")
    parser.add_argument("--splits", type=Path, metavar="JSON",
                        help="each fold's training cases instead of the seeded split: [[case, ...], ...] or "
                             "nnU-Net's splits_final.json ([{\"train\": [...], \"val\": [...]}, ...])")
    parser.add_argument("--fold", type=int, help="run only this fold (1-based); the table shows the finished ones")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the training")
    parser.add_argument("--size", type=int, default=256, help="network input size in pixels")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--recipe", choices=RECIPES, default=FULL_SLICE_CLAHE,
                        help="how HU slices look to the networks: full-slice-clahe (the whole slice, as the "
                             "shipped models 2.x; default) or lung-crop (lung window cropped to the lungs, as 1.x)")
    parser.add_argument("--cache-dir", type=Path, help="cache preprocessed slices (default: OUT/cache)")
    add_device_argument(parser)
    parser.set_defaults(func=run_benchmark_command)


def run_benchmark_command(args: argparse.Namespace) -> int:
    from ..benchmark import BenchmarkConfig, command_line, format_table, run_benchmark

    config = BenchmarkConfig(
        task=args.task, images=args.images, masks=args.masks, out_dir=args.out, folds=args.folds,
        train_cases=args.train_cases, splits=args.splits, seed=args.seed,
        method=getattr(args, "method", "dual"), general_data=tuple(getattr(args, "general_data", ())),
        general_encoder=getattr(args, "general_encoder", None), iterations=args.iterations,
        general_iterations=getattr(args, "general_iterations", None), batch_size=args.batch_size,
        learning_rate=args.lr, size=args.size, base_channels=args.base_channels, depth=args.depth,
        relation_weight=getattr(args, "relation_weight", 10.0), recipe=args.recipe, device=args.device,
        cache_dir=args.cache_dir or args.out / "cache", command=command_line(getattr(args, "argv", [])),
    )
    summary = run_benchmark(config, only_fold=args.fold, show_bar=sys.stderr.isatty())
    print(format_table(summary), end="")
    print(f"results: {args.out / 'results.json'}")
    return 0
