"""Is CT noise taken for ground-glass? Opacity on real CTs with CT-like noise added, side by side per model.

Reads ``../shared/data`` (never copied into the repository). For each model and each non-COVID CT
(default: LUNG1-001, LUNG1-013, LUNG1-026, session 26's three), ``relsegcore.segment`` on the clean
CT and on the CT with noise added in HU (``relsegcore.noise.add_ct_noise``, seed 0): white noise
(a low dose) and sharp-kernel noise (a lung kernel) of the given stds. Every infection found there
is a false positive: the opacity above the clean CT's is what the noise made. Also the report's
``noise_hu`` estimate for each variant. On the three ``covid-hu-slices`` with real ground-glass
(inside the expert lungs), the infection found with ``--slice-noise`` HU of white noise against
the same model's on the clean slice (Dice): noise must not hide real infection.

    python Testing/benchmarks/noise_robustness.py --model covid-infection-2d --model work-dirs/X/model.pt
        [--cases LUNG1-001 LUNG1-013 LUNG1-026] [--conditions white:30 white:60 sharp:60 sharp:100]
        [--slice-noise 60] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from relsegcore import pipeline, zoo
from relsegcore.device import select_device
from relsegcore.metrics import dice
from relsegcore.noise import add_ct_noise, estimate_noise_hu

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
DEFAULT_CASES = ("LUNG1-001", "LUNG1-013", "LUNG1-026")
DEFAULT_CONDITIONS = ("white:30", "white:60", "sharp:60", "sharp:100")
COVID_SLICES = ("coronacases_001_slice098", "coronacases_001_slice110", "coronacases_001_slice122")


def ct_path(case: str) -> Path:
    """A case name of ``pleural-effusion`` (LUNG1-...) or ``lung-tumor-volumes`` (lung1, lung2) as its CT file."""
    effusion = DATA / "pleural-effusion" / f"{case}_ct.nii.gz"
    return effusion if effusion.exists() else DATA / "lung-tumor-volumes" / f"{case}_image.nrrd"


def noisy_image(image: sitk.Image, kind: str, sigma_hu: float) -> sitk.Image:
    """``image`` with ``add_ct_noise`` (seed 0) in HU, on the same grid."""
    noisy = sitk.GetImageFromArray(add_ct_noise(sitk.GetArrayFromImage(image), sigma_hu, kind, seed=0))
    noisy.CopyInformation(image)
    return noisy


def opacity_rows(model: str, cases: list[str], conditions: list[tuple[str, float]]) -> list[dict]:
    """Per case: the clean CT's opacity and noise estimate, and each noisy variant's."""
    rows = []
    for case in cases:
        image = sitk.ReadImage(str(ct_path(case)))
        variants = [("clean", 0.0, image)] + [(kind, sigma, noisy_image(image, kind, sigma))
                                             for kind, sigma in conditions]
        row: dict = {"case": case}
        for kind, sigma, variant in variants:
            report = pipeline.segment(variant, model=model, device="cpu").report
            name = kind if kind == "clean" else f"{kind}_{sigma:g}"
            row[f"{name}_percent"] = round(report["percent_opacity"]["overall"], 3)
            row[f"{name}_noise_hu"] = report.get("noise_hu")
        rows.append(row)
    return rows


def slice_overlaps(model: str, sigma_hu: float) -> list[dict]:
    """Real ground-glass: infection with ``sigma_hu`` of white noise against the clean slice's (Dice)."""
    loaded = zoo.load_model(model, select_device("cpu"))
    rows = []
    for name in COVID_SLICES:
        data = np.load(DATA / "covid-hu-slices" / f"{name}.npz")
        hu, lungs = data["image"].astype(np.float32), data["lung_mask"].astype(np.uint8)
        clean = pipeline.infection_labels_for(loaded, hu[None], lungs[None])[0][0] > 0
        noisy_hu = add_ct_noise(hu, sigma_hu, "white", seed=0)
        noisy = pipeline.infection_labels_for(loaded, noisy_hu[None], lungs[None])[0][0] > 0
        rows.append({"slice": name, "clean_lung_flagged": round(float(clean.sum() / (lungs > 0).sum()), 4),
                     "noisy_lung_flagged": round(float(noisy.sum() / (lungs > 0).sum()), 4),
                     "dice_noisy_vs_clean": round(float(dice(noisy, clean)), 4),
                     "noise_hu": round(float(estimate_noise_hu(noisy_hu)), 1)})
    return rows


def summary(rows: list[dict], conditions: list[tuple[str, float]]) -> dict:
    """Mean opacity excess over the clean CT (points, over every case and condition) and the largest."""
    excess = [row[f"{kind}_{sigma:g}_percent"] - row["clean_percent"] for row in rows for kind, sigma in conditions]
    return {"mean_excess_points": round(float(np.mean(excess)), 3), "max_excess_points": round(float(max(excess)), 3)}


def parse_condition(text: str) -> tuple[str, float]:
    kind, _, sigma = text.partition(":")
    return kind, float(sigma)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a model name or .pt (repeat to compare; default: the "
                                                         "shipped default)")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS), metavar="KIND:HU")
    parser.add_argument("--slice-noise", type=float, default=60.0, help="white noise (HU) on the covid-hu-slices")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    conditions = [parse_condition(text) for text in args.conditions]
    results = {}
    for model in args.model or [zoo.DEFAULT_MODEL]:
        rows = opacity_rows(model, args.cases, conditions)
        results[model] = {"opacity": rows, **summary(rows, conditions),
                          "covid_hu_slices": slice_overlaps(model, args.slice_noise)}
        print(f"\n{model}: mean excess {results[model]['mean_excess_points']} points, "
              f"max {results[model]['max_excess_points']}")
        for row in rows:
            print("  " + "  ".join(f"{key}={value}" for key, value in row.items()))
        for row in results[model]["covid_hu_slices"]:
            print("  " + "  ".join(f"{key}={value}" for key, value in row.items()))
    if args.json:
        args.json.write_text(json.dumps({"cases": args.cases, "conditions": args.conditions,
                                         "slice_noise_hu": args.slice_noise, "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
