"""``relseg finetune``: a new model version from corrected cases or a 2D image folder."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import InputError
from . import add_device_argument, add_progress_argument, case_list, ctseg_folder

OPTIONS_IN_COMMAND = ("model", "data", "cases", "store", "images", "masks", "holdout_images", "holdout_masks", "out",
                      "iterations", "batch_size", "lr", "edited_weight", "seed", "device")


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..finetune import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_ITERATIONS,
        DEFAULT_LEARNING_RATE,
        DEFAULT_TRAINABLE,
        EDITED_WEIGHT,
    )
    from ..training import TRAINABLE

    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model on corrected cases (new model version, checked on held-out cases)",
        description="Start from --model, keep its general encoder frozen and train the rest briefly on the "
                    "corrections, edited slices drawn more often. Dice on held-out corrections is measured "
                    "before and after; a worse version never becomes the default. Without --out the new "
                    "version goes into the local model registry (not the default unless --make-default).",
    )
    parser.add_argument("--model", required=True, help="the model to start from: a name or a NAME.pt path")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", "--corrections", type=Path, metavar="DIR", help="a correction store folder")
    source.add_argument("--images", type=Path, metavar="DIR", help="2D images (COVID-SemiSeg layout), with --masks")
    source.add_argument("--data", metavar="ctseg2d:DIR",
                        help="a covid-ct-seg-2d folder (needs a full-slice-clahe model); the guard scores "
                             "its other cases, never slices within 2 of a corrected one")
    parser.add_argument("--guard", metavar="ctseg2d:DIR",
                        help="with --data: score the guard on this covid-ct-seg-2d folder (e.g. the other slices "
                             "of the corrected patients) and train on every correction; without it, a folder of "
                             "corrections only holds a quarter of its patients out (of one patient: a quarter of "
                             "its slices, each at least 3 from a kept one)")
    parser.add_argument("--cases", metavar="A,B",
                        help="with --data: the corrected cases or patients (default: every slice of DIR)")
    parser.add_argument("--masks", type=Path, metavar="DIR", help="masks with the images' names (sibling folder)")
    parser.add_argument("--holdout-images", type=Path, metavar="DIR",
                        help="held-out images for the before/after check (default: a quarter of the cases)")
    parser.add_argument("--holdout-masks", type=Path, metavar="DIR")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, metavar="PATH.pt", help="write the new model (and its card) here")
    target.add_argument("--register", action="store_true",
                        help="put the new model into the local registry (the default without --out)")
    parser.add_argument("--make-default", action="store_true",
                        help="make the registered model the default, only if it is not worse on held-out cases")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--edited-weight", type=float, default=EDITED_WEIGHT,
                        help="how much more often an edited slice is drawn than an unedited one")
    parser.add_argument("--trainable", choices=TRAINABLE, default=DEFAULT_TRAINABLE,
                        help="which layers learn: all (target encoder, decoder and head), decoder (and head), norm "
                             f"(the normalisation layers' scales and shifts) (default: {DEFAULT_TRAINABLE})")
    parser.add_argument("--seed", type=int, default=0)
    add_progress_argument(parser)
    add_device_argument(parser)
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    from ..finetune import (
        GUARD_MAX_SLICES,
        finetune,
        slices_from_ctseg2d,
        slices_from_folder,
        slices_from_store,
        spread,
    )
    from ..training import distributed_context
    from ..zoo import find_model
    from . import progress_display

    _check_arguments(args)
    parent = find_model(args.model)
    size = int(parent.preprocessing.get("input_size", 256))
    multiclass = len(parent.classes) > 2
    holdout = None
    if args.holdout_images is not None:
        holdout = slices_from_folder(args.holdout_images, args.holdout_masks, size, multiclass)
    if args.data is not None:
        folder = ctseg_folder(args.data, "finetune", "other corrections as --images/--masks or --store")
        if args.guard is not None:
            guard_folder = ctseg_folder(args.guard, "finetune --guard", "--holdout-images/--holdout-masks")
            guard_slices, _ = slices_from_ctseg2d(guard_folder, parent, None, guard=False, fingerprint=False)
            holdout = guard_slices.subset(spread(np.arange(len(guard_slices)), GUARD_MAX_SLICES))
        data, guard = slices_from_ctseg2d(folder, parent, case_list(args.cases), guard=holdout is None,
                                          seed=args.seed)
        holdout = guard if holdout is None else holdout
    elif args.store is not None:
        data = slices_from_store(args.store, {"input_size": size, **parent.preprocessing})
    else:
        data = slices_from_folder(args.images, args.masks, size, multiclass)
    first_rank = distributed_context()[0] == 0  # under torchrun, rank 0 alone speaks (and writes the model)
    if first_rank:
        print(f"fine-tuning {parent.name} {parent.version} on {len(data)} slices "
              f"({int(data.edited.sum())} edited) from {len(set(data.cases))} case(s) in {data.source}", flush=True)
    if holdout is not None and first_rank:
        print(f"guard: {len(holdout)} held-out slices of {len(set(holdout.cases))} case(s)", flush=True)
    with progress_display(args.progress if first_rank else "none") as progress:
        result = finetune(
            parent.path, data.images, data.masks, data.edited, args.out, cases=data.cases,
            fingerprints=data.fingerprints,
            holdout_images=holdout.images if holdout else None, holdout_masks=holdout.masks if holdout else None,
            holdout_cases=holdout.cases if holdout else None,
            make_default=args.make_default, device=args.device, iterations=args.iterations,
            batch_size=args.batch_size, learning_rate=args.lr, edited_weight=args.edited_weight,
            trainable=args.trainable, source=data.source, command=command_line(args), progress=progress, seed=args.seed,
        )
    if not first_rank:
        return 0
    print(f"model written: {result.path} ({result.card.name} {result.card.version}, {result.seconds:.0f} s)")
    print(f"Dice on held-out slices: before {result.dice_before:.4f}, after {result.dice_after:.4f}; "
          f"{'accepted' if result.accepted else 'NOT accepted'}")
    print(result.message)  # the last line: the Slicer module shows it
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if (args.images is None) != (args.masks is None):
        raise InputError("give --images and --masks together")
    if args.guard is not None and (args.data is None or args.holdout_images is not None):
        raise InputError("--guard goes with --data ctseg2d:DIR, instead of --holdout-images")
    if args.cases is not None and args.data is None:
        raise InputError("--cases selects the corrected cases of --data ctseg2d:DIR")
    if (args.holdout_images is None) != (args.holdout_masks is None):
        raise InputError("give --holdout-images and --holdout-masks together")
    if args.make_default and args.out is not None:
        raise InputError("--make-default applies to registered models; it cannot be used with --out")
    if args.iterations < 1 or args.batch_size < 1:
        raise InputError("--iterations and --batch-size must be at least 1")


def command_line(args: argparse.Namespace) -> str:
    """The ``relseg finetune`` command that reproduces this run, for the model card."""
    words = ["relseg", "finetune"]
    for name in OPTIONS_IN_COMMAND:
        value = getattr(args, name, None)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    if args.make_default:
        words.append("--make-default")
    return shlex.join(words)
