"""Does a CT padded outside its scan field, or holding metal, segment like the clean CT? Per model, six real CTs.

Reads ``../shared/data`` (never copied into the repository). Each CT (the three coronacases_001 slices of
``covid-hu-slices`` as a thin volume, with real COVID-19 infection, and five non-COVID CTs) is segmented by
``relsegcore.segment`` as it is, with metal at 6000 HU on the skin, and with that metal and -3024 outside a
circular scan field (``relsegcore.scanner.padded_with_metal``). Printed and written: the overall opacity (PO)
clean -> variant and the infection and lung Dice against the clean CT. On the non-COVID CTs the infection is
false-positive specks, whose Dice is no measure; the opacity they move is (session 25, RelSegCore/EXPERIMENTS.md).
``Testing/tests/core/test_ctseg.py`` runs this script per CT and asserts on its ``--json`` rows; ``--card`` writes
the table into the model card's ``metrics.padded_scan_field``::

    python Testing/benchmarks/padded_scan_field.py [--model covid-infection-2d] [--cases CASE ...] [--json OUT] [--card]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from check_real_data import COVID_SLICE_SPACING, DATA, write_to_card

from relsegcore import pipeline, zoo
from relsegcore.metrics import dice
from relsegcore.scanner import padded_with_metal

CASES = ("covid-hu-slices", "LUNG1-001", "LUNG1-002", "LUNG1-005", "LUNG1-008", "LUNG1-013")


def clean_ct(case: str) -> sitk.Image:
    """A case of ``CASES`` as a HU volume."""
    if case != "covid-hu-slices":
        return sitk.ReadImage(str(DATA / "pleural-effusion" / f"{case}_ct.nii.gz"))
    paths = sorted((DATA / "covid-hu-slices").glob("coronacases_001_*.npz"))
    image = sitk.GetImageFromArray(np.stack([np.load(path)["image"] for path in paths]).astype(np.int16))
    image.SetSpacing(COVID_SLICE_SPACING)
    return image


def case_rows(model: str, case: str) -> list[dict]:
    """The metal and the padded variant of ``case`` against its clean CT."""
    clean = clean_ct(case)
    reference = pipeline.segment(clean, model=model, device="cpu")
    expected = {name: sitk.GetArrayFromImage(getattr(reference, name)) > 0 for name in ("infection", "lungs")}
    rows = []
    for kind, image in zip(("metal", "padding"), padded_with_metal(clean), strict=True):
        result = pipeline.segment(image, model=model, device="cpu")
        overlap = {name: float(dice(sitk.GetArrayFromImage(getattr(result, name)) > 0, expected[name]))
                   for name in expected}
        rows.append({"case": case, "variant": kind,
                     "percent_opacity_clean": reference.report["percent_opacity"]["overall"],
                     "percent_opacity": result.report["percent_opacity"]["overall"],
                     "infection_dice": overlap["infection"], "lung_dice": overlap["lungs"],
                     "infection_voxels_clean": int(expected["infection"].sum())})
    return rows


def rounded(row: dict) -> dict:
    """``row`` as printed and as written into the card: three decimals (``--json`` keeps them exact, for the test's
    thresholds)."""
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="the CTs (default: all six)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--card", action="store_true", help="also write them into the model's card")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rows = [row for case in args.cases for row in case_rows(args.model, case)]
    for row in rows:
        print("  ".join(f"{key}={value}" for key, value in rounded(row).items()))
    moved = [abs(row["percent_opacity"] - row["percent_opacity_clean"]) for row in rows]
    print(f"largest opacity move: {max(moved):.3f} points")
    options = ["--model", args.model] + (["--cases", *args.cases] if args.cases != list(CASES) else [])
    summary = {"command": "python Testing/benchmarks/padded_scan_field.py " + shlex.join(options),
               "measure": "percent_opacity overall, clean -> variant; infection and lung Dice against the clean CT",
               "cases": rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.card:
        card_summary = {**summary, "cases": [rounded(row) for row in rows]}
        print(f"card: {write_to_card(args.model, card_summary, key='padded_scan_field')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
