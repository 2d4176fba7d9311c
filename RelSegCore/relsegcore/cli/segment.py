"""``relseg segment``: a CT file, a DICOM folder, a folder of cases, a CSV list, or the built-in demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engines import ENGINES
from ..errors import InputError
from ..opacity import HIGH_OPACITY_HU
from ..progress import Progress
from . import add_device_argument, add_progress_argument, progress_display


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment lungs and COVID-19 infection on chest CT",
        description=(
            "Segment the lungs (1 left, 2 right) and COVID-19 infection (1 ground-glass, 2 consolidation) "
            "on a chest CT and write "
            "<name>.seg.nrrd, <name>_lungs.nii.gz, <name>_infection.nii.gz, <name>_report.json and "
            "<name>_overview.png into --out. INPUT is a NIfTI/NRRD/MHA file, a DICOM series folder, "
            "a folder of cases, or a CSV list of cases (column 'path', optional 'name' and 'series'). "
            "Research software: not for clinical use."
        ),
    )
    parser.add_argument("input", nargs="?", type=Path, metavar="INPUT", help="CT file, DICOM folder, folder or CSV")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the output files")
    parser.add_argument("--model", default=None, metavar="NAME|PATH",
                        help="model name or model card/weights path (default: the registry's default, "
                             "covid-infection-2d unless changed with 'relseg models use')")
    add_device_argument(parser)
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="what runs the network on the CPU: auto (OpenVINO when installed, about 1.7x faster "
                             "than PyTorch on 2 cores; pip install 'relsegcore[fast]'), torch (the reference) or "
                             "openvino (default: auto)")
    parser.add_argument("--tta", action="store_true",
                        help="average with left-right flipped predictions (2x time); models whose card sets "
                             "flip_tta, such as the default, always do")
    parser.add_argument("--lungs", default="hu", metavar="hu|auto|MODEL",
                        help="how the lungs are found: hu (HU thresholds, no network; the default, measured better "
                             "at keeping effusion out), auto (the learned covid-lungs-2d when installed), or a "
                             "lung model's name or path")
    parser.add_argument("--high-opacity-hu", type=float, default=HIGH_OPACITY_HU, metavar="HU",
                        help="infection at or above this HU is consolidation and counts in the percentage of "
                             f"high opacity (PHO); below it is ground-glass (default: {HIGH_OPACITY_HU:g})")
    parser.add_argument("--series", metavar="UID", help="DICOM series to read (UID, description or number)")
    parser.add_argument("--stored-window", metavar="LOW,HIGH",
                        help="the CT is stored windowed as grey values 0..255, not in HU (as the Radiopaedia cases "
                             "of COVID-19-CT-Seg: --stored-window=-1250,250, with '=' before a negative LOW): "
                             "map it back to HU in this window first")
    add_progress_argument(parser)
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes for a folder or CSV of cases (default: 1)")
    parser.add_argument("--demo", action="store_true",
                        help="segment the built-in synthetic chest CT (not clinical data) and compare with its "
                             "known masks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.demo == (args.input is not None):
        raise InputError("Give either an INPUT or --demo.")
    if args.workers < 1:
        raise InputError("--workers must be at least 1.")
    if args.stored_window is not None:
        if args.demo:
            raise InputError("The demo CT is in HU: --stored-window is for a CT stored as grey values 0..255.")
        args.stored_window = _window(args.stored_window)
    with progress_display(args.progress) as progress:
        if args.demo:
            return run_demo(args, progress)
        from ..batch import is_batch_input

        if is_batch_input(args.input):
            return run_batch(args, progress)
        return run_single(args, progress)


def run_single(args: argparse.Namespace, progress: Progress) -> int:
    from ..pipeline import segment_file

    paths = segment_file(args.input, args.out, model=args.model, device=args.device, tta=args.tta,
                         series=args.series, progress=progress, high_opacity_hu=args.high_opacity_hu,
                         lung_model=args.lungs, engine=args.engine, stored_window=args.stored_window)
    print_outputs(paths)
    return 0


def run_batch(args: argparse.Namespace, progress: Progress) -> int:
    from ..batch import SUMMARY_NAME, list_cases, run_batch

    outcomes = run_batch(list_cases(args.input, args.out), args.out, model=args.model, device=args.device, tta=args.tta,
                         workers=args.workers, progress=progress, high_opacity_hu=args.high_opacity_hu,
                         lung_model=args.lungs, engine=args.engine, stored_window=args.stored_window)
    for outcome in outcomes:
        detail = f": {outcome.error}" if outcome.error else ""
        opacity = outcome.report.get("percent_opacity", {}).get("overall") if outcome.report else None
        numbers = f" (opacity {opacity:.1f} % of lung)" if opacity is not None else ""
        print(f"{outcome.status:8} {outcome.case.name}{numbers}{detail}")
    failed = sum(outcome.status == "failed" for outcome in outcomes)
    print(f"{len(outcomes) - failed} of {len(outcomes)} cases segmented; summary: {args.out / SUMMARY_NAME}")
    return 1 if failed else 0


def run_demo(args: argparse.Namespace, progress: Progress) -> int:
    """The README's first command: the whole pipeline on a synthetic CT whose true masks are known."""
    import SimpleITK as sitk

    from ..demo import make_demo_ct
    from ..metrics import dice
    from ..pipeline import segment, write_result

    progress.update(0.0, "Synthetic CT")
    case = make_demo_ct()
    result = segment(case.image, model=args.model, device=args.device, tta=args.tta, progress=progress,
                     lung_model=args.lungs, high_opacity_hu=args.high_opacity_hu, engine=args.engine)
    known_lungs = sitk.GetArrayViewFromImage(case.lungs)
    known_infection = sitk.GetArrayViewFromImage(case.infection)
    found_lungs = sitk.GetArrayViewFromImage(result.lungs)
    found_infection = sitk.GetArrayViewFromImage(result.infection)
    check = {
        "note": "synthetic demo CT with known masks: a pipeline check, not a clinical measurement",
        "lung_dice": round(dice(found_lungs > 0, known_lungs > 0), 4),
        "infection_dice": round(dice(found_infection > 0, known_infection > 0), 4),
    }
    result.report["synthetic_demo"] = check
    paths = write_result(args.out, "demo", case.image, result)
    print_outputs(paths)
    print("Synthetic demo (known masks, not clinical data):")
    print(f"  lung Dice      {check['lung_dice']:.3f}")
    print(f"  infection Dice {check['infection_dice']:.3f}")
    return 0


def print_outputs(paths: dict[str, Path]) -> None:
    import json

    report = json.loads(Path(paths["report"]).read_text(encoding="utf-8"))
    print("Outputs:")
    for path in paths.values():
        print(f"  {path}")
    series = report.get("dicom_series")
    if series:
        details = [f"{label} {series[key]}" for key, label in (("number", "number"), ("uid", "UID")) if series[key]]
        details.append(f"{series['files']} files")
        print(f"DICOM series: {series['description'] or 'no description'} ({', '.join(details)})")
    lungs, infection, opacity = report["lungs"], report["infection"], report["percent_opacity"]
    print(f"Lungs:     left {lungs['left_ml']:.0f} mL, right {lungs['right_ml']:.0f} mL, "
          f"total {lungs['total_ml']:.0f} mL")
    print(f"Infection: {infection['total_ml']:.1f} mL, {_percent(opacity['overall'])} of lung volume "
          f"(left {_percent(opacity['left'])}, right {_percent(opacity['right'])})")
    classes = sorted(infection["classes"].values(), key=lambda item: item["label"])
    if len(classes) > 1:
        print("  " + ", ".join(f"{item['name']} {item['total_ml']:.1f} mL" for item in classes))
    high = report.get("percent_high_opacity")
    if high:
        print(f"High opacity (>= {report['high_opacity_hu']:g} HU): {_percent(high['overall'])} of lung volume "
              f"(left {_percent(high['left'])}, right {_percent(high['right'])})")
    for warning in report.get("warnings", []):
        print(f"Warning: {warning}")
    model = report["model"]
    engine = f" ({report['engine']})" if report.get("engine") not in (None, "torch") else ""
    print(f"Model: {model['name']} {model['version']} on {report['device']}{engine}, "
          f"{report['timing_s']['total']:.1f} s")
    if report.get("lungs_method"):
        print(f"Lungs: {report['lungs_method']}")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"


def _window(text: str) -> tuple[float, float]:
    """``"-1250,250"`` -> ``(-1250.0, 250.0)``, checked before any case is read (``imageio.checked_window``)."""
    from ..imageio import checked_window

    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--stored-window expects LOW,HIGH in HU (e.g. --stored-window=-1250,250), "
                         f"not {text!r}.") from None
    return checked_window((low, high))
