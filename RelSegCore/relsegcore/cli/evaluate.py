"""``relseg evaluate``: per-case and mean metrics of a model on a labelled folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_device_argument, add_progress_argument, case_list, ctseg_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a model against expert masks",
        description="Evaluate on a 2D image folder (images already windowed and cropped, as COVID-SemiSeg) or on CT "
                    "volumes (NIfTI/NRRD/MHA, scored in mm with NSD and HD95). Prints the mean Dice over cases. "
                    "Pictures that look prepared by another recipe than the model's (lung-window crops, whole "
                    "slices) are scored by the model its card names for that recipe, and the output says so.",
    )
    parser.add_argument("--model", default=None, help="shipped model name or path to a .pt with its card")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--masks", type=Path)
    parser.add_argument("--data", metavar="ctseg2d:DIR",
                        help="a covid-ct-seg-2d folder (images/, masks/, lungs/, cases.csv), not --images/--masks")
    parser.add_argument("--target", choices=("infection", "lungs"), default="infection",
                        help="with --data: score against the infection or the lung masks; with --volumes: lungs "
                             "scores the pipeline's lungs step (--lungs) against lung masks")
    parser.add_argument("--lungs", default="hu", metavar="hu|auto|MODEL",
                        help="with --volumes --target lungs: the lungs step scored, as relseg segment --lungs "
                             "(default: hu, the HU method)")
    parser.add_argument("--cases", help="with --data or --volumes: only these cases or patients (comma-separated), "
                                        "e.g. the val_patients of a fold's fold_result.json")
    parser.add_argument("--volumes", action="store_true",
                        help="--images holds CT volumes and --masks their masks under the same file names, or "
                             "the masks lie beside the CTs without --masks (default: 2D slices)")
    parser.add_argument("--tolerance-mm", type=float, default=3.0, help="NSD tolerance for volumes (default 3 mm)")
    parser.add_argument("--tta", action="store_true",
                        help="flip test-time augmentation (always on for models whose card sets flip_tta)")
    parser.add_argument("--json", type=Path, help="write per-case and summary metrics here")
    add_progress_argument(parser)
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device import select_device
    from ..errors import RelSegError
    from ..evaluation import evaluate_image_folder, evaluate_volumes
    from ..fileutil import atomic_write_text
    from ..zoo import load_model
    from . import progress_display

    if args.lungs != "hu" and not (args.volumes and args.target == "lungs"):
        raise RelSegError("--lungs chooses the lungs step scored by --volumes --target lungs; with --data, score a "
                          "lung model with --model")
    if not args.data and (args.images is None or (args.masks is None and not args.volumes)):
        raise RelSegError("give --data ctseg2d:DIR, or --images DIR and --masks DIR")
    if args.cases and not (args.data or args.volumes):
        raise RelSegError("--cases selects cases of --data ctseg2d:DIR or of --volumes; a picture folder has none")
    with progress_display(args.progress) as progress:
        if args.data:
            from ..evaluation import evaluate_ctseg2d

            path = ctseg_folder(args.data, "evaluate", "picture folders as --images/--masks, or --volumes")
            result = evaluate_ctseg2d(load_model(args.model, select_device(args.device)), path, args.target,
                                      tta=args.tta, progress=progress, cases=case_list(args.cases))
        elif args.volumes:
            result = evaluate_volumes(args.model, args.images, args.masks, device=args.device, tta=args.tta,
                                      tolerance_mm=args.tolerance_mm, progress=progress, cases=case_list(args.cases),
                                      target=args.target, lung_model=args.lungs)
        else:
            loaded = load_model(args.model, select_device(args.device))
            result = evaluate_image_folder(loaded, args.images, args.masks, tta=args.tta, progress=progress)
    for case in result["per_case"]:
        print(f"{case['case']:>24}  Dice {case['dice']:.4f}  sensitivity {case['sensitivity']:.4f}  "
              f"specificity {case['specificity']:.4f}")
    sd = result["metrics"]["dice"]["sd"] or 0.0
    scored = " ".join(filter(None, (result["model"]["name"], result["model"]["version"])))
    print(f"mean Dice {result['mean_dice']:.4f} ± {sd:.4f} over {result['cases']} cases ({scored})")
    if result.get("per_patient_dice"):
        print("per patient: " + ", ".join(f"{p} {d:.4f}" for p, d in result["per_patient_dice"].items()))
    for key in ("note", "orientation_note"):
        if result.get(key):
            print(f"Note: {result[key]}")
    seen = result.get("cases_seen_in_training")
    if seen:
        print(f"Warning: {seen} of these {result['cases']} images were in the model's training data (its card says "
              "so): this is not a held-out score.")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, default=float) + "\n")
    return 0
