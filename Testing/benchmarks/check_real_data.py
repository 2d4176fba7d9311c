"""Does the infection model land on real ground-glass, and stay off effusion and tumours?

Reads ``../shared/data`` (never copied into the repository) and prints, with the shipped
default model (or ``--model``):

- ``covid-hu-slices`` lungs: Dice per lung of ``segment_lungs`` (one slice, 0.7 mm, no
  neighbours along z) against the expert lung masks.
- ``covid-hu-slices`` infection: real COVID-19 HU slices with expert lung masks and visible
  ground-glass, no infection mask. Run through the pipeline's own slice path (window,
  crop to the lungs, resize, paste back) inside the expert lungs: fraction of lung
  flagged, mean HU of the flagged pixels (ground-glass lies around -750..-300 HU),
  and how much of the lung in the GGO HU range vs of clearly aerated lung (< -850 HU)
  is flagged.
- ``pleural-effusion`` and ``lung-tumor-volumes``: non-COVID patients, run end to end
  (``relsegcore.segment``). All infection found there is a false positive; reported in
  mL and as a share of the lungs, split by where it lands: on the effusion / tumour label,
  in the dependent (posterior third) lung, on dense structures elsewhere (>= -300 HU:
  vessels, airway walls, scars) and the rest; the fraction of the label flagged (the model
  must not flag them wholesale); whether the case was among the model's training negatives;
  and the share of the effusion / tumour label that lies inside the lungs found.
- ``ct-fixtures/totalsegmentator-example``: lung Dice against TotalSegmentator's lobes.

    python Testing/benchmarks/check_real_data.py [--quick] [--json OUT] [--model NAME|PATH] [--device cpu]
        [--lungs auto|hu|MODEL] [--overviews DIR] [--card]

``--overviews DIR`` writes each non-COVID CT's ``_overview.png`` there, to look at as a radiologist would.

``--card`` also states the figures in the model's card (``metrics.real_data``, with this
command); the weights and their SHA-256 are not touched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from relsegcore import imageio, pipeline, zoo
from relsegcore.device import select_device
from relsegcore.lungs import LEFT_LUNG, RIGHT_LUNG
from relsegcore.metrics import dice

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
GGO_HU = (-750.0, -300.0)
AERATED_HU = -850.0
HALF_AIR_HU = -500.0  # fluid is 0..30 HU, air -1000: below this a voxel is more than half air
COVID_SLICE_SPACING = (0.7, 0.7, 5.0)  # not recorded with the slices; about 0.7 mm in-plane


TOTALSEG_LUNG_LABELS = (10, 11, 12, 13, 14)  # the five lobes (12 is absent in this crop of the lung bases)
DENSE_HU = -300.0  # flagged voxels this dense outside the dependent lung: vessels, airway walls, scars


def lung_dice(folder: Path, lung_model: str) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.npz")):
        data = np.load(path)
        labels = pipeline.lung_labels_for(data["image"][None], COVID_SLICE_SPACING, lung_model, "cpu")[0][0]
        rows.append({"slice": path.stem, **{
            f"{name}_lung_dice": float(dice(labels == side, data["lung_mask"] == side))
            for name, side in (("left", LEFT_LUNG), ("right", RIGHT_LUNG))
        }, "expert_lung_px": int((data["lung_mask"] > 0).sum())})
    return rows


def covid_hu_slices(loaded: zoo.LoadedModel, folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.npz")):
        data = np.load(path)
        hu, lungs = data["image"].astype(np.int16), data["lung_mask"].astype(np.uint8)
        infection, _ = pipeline.infection_labels_for(loaded, hu[None], lungs[None])
        flagged, lung = infection[0] > 0, lungs > 0
        ggo = lung & (hu >= GGO_HU[0]) & (hu <= GGO_HU[1])
        aerated = lung & (hu < AERATED_HU)
        rows.append({
            "slice": path.stem,
            "lung_fraction_flagged": float(flagged.sum() / lung.sum()),
            "flagged_mean_hu": float(hu[flagged].mean()) if flagged.any() else math.nan,
            "ggo_hu_fraction_flagged": float((flagged & ggo).sum() / max(ggo.sum(), 1)),
            "aerated_fraction_flagged": float((flagged & aerated).sum() / max(aerated.sum(), 1)),
            "flagged_outside_lungs_px": int((flagged & ~lung).sum()),
        })
    return rows


def false_positives(model: str, device: str, ct_path: Path, label_path: Path, lung_model: str,
                    training_data: str, overviews: Path | None) -> dict:
    image = sitk.ReadImage(str(ct_path))
    label = sitk.ReadImage(str(label_path))
    result = pipeline.segment(image, model=model, device=device, lung_model=lung_model)
    case = ct_path.name.split("_")[0] if "LUNG1" in ct_path.name else ct_path.stem.replace("_image", "")
    if overviews is not None:
        from relsegcore.outputs import write_overview_png

        overviews.mkdir(parents=True, exist_ok=True)
        write_overview_png(overviews / f"{case}_overview.png", image, result.lungs, result.infection,
                           class_names=result.class_names)
    canonical = [sitk.GetArrayFromImage(imageio.to_canonical(im)) for im in (image, result.infection, result.lungs)]
    hu, infection, lungs = canonical[0], canonical[1] > 0, canonical[2] > 0
    label_mask = sitk.GetArrayFromImage(imageio.to_canonical(_on_grid_image(label, image))) > 0
    voxel_ml = math.prod(image.GetSpacing()) / 1000
    dependent = _dependent_third(lungs)
    places = {"on_label": infection & label_mask}
    places["dependent_lung"] = infection & dependent & ~label_mask
    places["dense_elsewhere"] = infection & ~dependent & ~label_mask & (hu >= DENSE_HU)
    places["other"] = infection & ~dependent & ~label_mask & (hu < DENSE_HU)
    lungs_ml = result.report["lungs"]["total_ml"]
    label_voxels = max(int(label_mask.sum()), 1)

    def share_of_label(mask: np.ndarray) -> float:
        return round(float((mask & label_mask).sum() / label_voxels), 4)

    return {
        "case": case,
        "in_training_negatives": ct_path.name in training_data or f"{case}_" in training_data,
        "lungs_ml": round(lungs_ml, 1),
        "infection_ml": round(float(infection.sum() * voxel_ml), 2),
        "percent_of_lungs": round(100 * float(infection.sum() * voxel_ml) / max(lungs_ml, 1e-6), 2),
        **{f"{name}_ml": round(float(mask.sum() * voxel_ml), 2) for name, mask in places.items()},
        "label_ml": round(float(label_mask.sum() * voxel_ml), 1),
        "label_fraction_flagged": share_of_label(infection),
        "label_fraction_inside_lungs": share_of_label(lungs),
        # label voxels more than half air are lung the label overreaches: a correct lung mask keeps them
        "label_fraction_air": share_of_label(hu < HALF_AIR_HU),
        "lungs_method": result.report.get("lungs_method"),
        "noise_hu": result.report.get("noise_hu"),  # false positives rise with it (relsegcore.noise)
        "seconds": result.report["timing_s"]["total"],
    }


def _dependent_third(lungs: np.ndarray) -> np.ndarray:
    """The posterior third of the lungs (canonical rows grow towards the back): where a supine patient's
    lungs are denser, the first place a model mistakes normal lung for ground-glass."""
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    if rows.size == 0:
        return np.zeros_like(lungs)
    cut = rows[0] + 2 * (rows[-1] - rows[0]) // 3
    dependent = np.zeros_like(lungs)
    dependent[:, cut:, :] = lungs[:, cut:, :]
    return dependent


def totalsegmentator_lung_dice(lung_model: str) -> dict:
    """Lung Dice of the lungs found against TotalSegmentator's five lobes (a small real CT of the lung bases)."""
    folder = DATA / "ct-fixtures" / "totalsegmentator-example"
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))  # the grid of example_seg
    reference = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))),
                        TOTALSEG_LUNG_LABELS)
    found = sitk.GetArrayFromImage(pipeline.segment_lungs(image, model=lung_model, device="cpu")) > 0
    return {"case": "totalsegmentator-example", "lung_dice": round(float(dice(found, reference)), 4),
            "reference_ml": round(float(reference.sum() * math.prod(image.GetSpacing()) / 1000), 1)}


def _on_grid_image(label: sitk.Image, image: sitk.Image) -> sitk.Image:
    """The label on the CT's grid (masks are aligned in physical space, not always on the same grid)."""
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def _label_voxels(path: Path) -> int:
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))))


def run(model: str, device: str, quick: bool, lung_model: str = "hu", overviews: Path | None = None) -> dict:
    loaded = zoo.load_model(model, select_device(device))
    results: dict = {"model": {"name": loaded.card.name, "version": loaded.card.version}, "lungs": lung_model}
    results["covid_hu_lungs"] = lung_dice(DATA / "covid-hu-slices", lung_model)
    results["totalsegmentator_lungs"] = [totalsegmentator_lung_dice(lung_model)]
    results["covid_hu_slices"] = covid_hu_slices(loaded, DATA / "covid-hu-slices")
    training_data = str(loaded.card.training.get("data", ""))
    effusion_cts = sorted((DATA / "pleural-effusion").glob("*_ct.nii.gz"))[: 1 if quick else None]
    results["pleural_effusion"] = [
        false_positives(model, device, ct, ct.with_name(ct.name.replace("_ct", "_effusion")), lung_model,
                        training_data, overviews) for ct in effusion_cts
    ]
    tumour_cts = sorted((DATA / "lung-tumor-volumes").glob("*_image.nrrd"))
    if quick:  # the larger tumour: a mass, where flagging it wholesale would matter
        tumour_cts = [max(tumour_cts, key=lambda ct: _label_voxels(ct.with_name(ct.name.replace("_image", "_label"))))]
    results["lung_tumor"] = [
        false_positives(model, device, ct, ct.with_name(ct.name.replace("_image", "_label")), lung_model,
                        training_data, overviews) for ct in tumour_cts
    ]
    return results


def card_summary(results: dict, command: str) -> dict:
    """What a model card states of these checks: per case, the figures a reader of the card needs."""
    def per_case(rows: list[dict], key: str) -> dict:
        return {row["case"]: row[key] for row in rows}

    non_covid = results["pleural_effusion"] + results["lung_tumor"]
    return {
        "command": command,
        "data": "../shared/data: covid-hu-slices (4 real COVID-19 HU slices, expert lung masks), pleural-effusion "
                "(10 non-COVID lung-cancer patients with effusion masks), lung-tumor-volumes (2, tumour masks)",
        "covid_hu_slices_ggo_range_lung_flagged": {row["slice"]: round(row["ggo_hu_fraction_flagged"], 3)
                                                   for row in results["covid_hu_slices"]},
        "covid_hu_slices_aerated_lung_flagged": {row["slice"]: round(row["aerated_fraction_flagged"], 4)
                                                 for row in results["covid_hu_slices"]},
        "non_covid_false_positive_ml": per_case(non_covid, "infection_ml"),
        "non_covid_false_positive_percent_of_lungs": per_case(non_covid, "percent_of_lungs"),
        "non_covid_false_positive_median_percent": round(
            float(np.median([row["percent_of_lungs"] for row in non_covid])), 2),
        "non_covid_false_positives_where_ml": {
            row["case"]: {key[:-3]: row[key] for key in ("on_label_ml", "dependent_lung_ml", "dense_elsewhere_ml",
                                                         "other_ml")} for row in non_covid},
        "non_covid_cases_in_training_negatives": [row["case"] for row in non_covid if row["in_training_negatives"]],
        "effusion_fraction_flagged": per_case(results["pleural_effusion"], "label_fraction_flagged"),
        "tumour_fraction_flagged": per_case(results["lung_tumor"], "label_fraction_flagged"),
    }


def write_to_card(model: str, summary: dict, key: str = "real_data") -> Path:
    """``summary`` as the card's ``metrics.<key>``, written atomically beside the unchanged weights."""
    from relsegcore.fileutil import atomic_write_text

    card_path = zoo.find_model(model).path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["metrics"][key] = summary
    atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    return card_path


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    columns = list(rows[0])
    print("  " + "  ".join(f"{c:>24}" if i else f"{c:<24}" for i, c in enumerate(columns)))
    for row in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("  " + "  ".join(f"{c:>24}" if i else f"{c:<24}" for i, c in enumerate(cells)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the first effusion volume and the larger tumour only")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    parser.add_argument("--card", action="store_true", help="also state the figures in the model's card")
    parser.add_argument("--lungs", default="hu", help="lungs method: auto, hu or a lung model (see relseg segment)")
    parser.add_argument("--overviews", type=Path, help="write each non-COVID CT's overview PNG here")
    args = parser.parse_args()
    if args.card and args.quick:
        parser.error("--card needs the full checks, not --quick")
    if not DATA.is_dir():
        print(f"real data not found at {DATA}", file=sys.stderr)
        return 1
    torch.set_num_threads(os.cpu_count() or 1)
    results = run(args.model, args.device, args.quick, args.lungs, args.overviews)
    print(f"model: {results['model']['name']} {results['model']['version']}")
    print(f"lungs: {args.lungs}")
    print_table("COVID-19 HU slices: lung segmentation vs the expert lung masks", results["covid_hu_lungs"])
    print_table("TotalSegmentator example (lung bases): lungs vs the five lobes", results["totalsegmentator_lungs"])
    print_table(f"COVID-19 HU slices (ground-glass lies within {GGO_HU[0]:g}..{GGO_HU[1]:g} HU)",
                results["covid_hu_slices"])
    print_table("Pleural effusion (non-COVID): false-positive infection", results["pleural_effusion"])
    print_table("Lung tumour (non-COVID): false-positive infection", results["lung_tumor"])
    shares = [row["percent_of_lungs"] for row in results["pleural_effusion"] + results["lung_tumor"]]
    print(f"\nnon-COVID false positives, % of the lungs: median {np.median(shares):.2f}, max {max(shares):.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.card:
        command = "python Testing/benchmarks/check_real_data.py " + shlex.join(
            ["--model", results["model"]["name"], "--device", args.device, "--lungs", args.lungs, "--card"])
        print(f"card: {write_to_card(args.model, card_summary(results, command))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
