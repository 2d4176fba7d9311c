"""How noisy are real chest CTs? The noise of LIDC-IDRI's CTs, from their nodule crops.

The default infection model starts taking CT noise for ground-glass above ``noise.NOISY_CT_HU`` (35 HU), where
the report warns. The 12 non-COVID CTs of ``../shared/data`` are all below it; the LIDC-IDRI crops
(``lidc-nodules``: 994 crops of about 44 x 44 x Z voxels from 551 patients, many scanners, kernels and slice
thicknesses) tell how often real CTs are not. ``noise.estimate_noise_hu`` reads soft tissue, which the crops
lack, so this script reads lung parenchyma instead: the same 3 x 3 high-pass and robust std, inside pixels
whose smoothed HU is -950..-700 (eroded 2 pixels in-plane). The parenchyma's own fine structure adds a little to
it; how much is measured first on 44 x 44 x 8 crops inside the HU lungs of the 12 non-COVID CTs, as stored and
with white and sharp-kernel noise of 20, 40 and 80 HU added, against ``estimate_noise_hu`` on the whole CT.

    python Testing/benchmarks/lidc_noise.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from relsegcore.lungs import segment_lungs
from relsegcore.noise import NOISY_CT_HU, add_ct_noise, estimate_noise_hu, white_noise_std

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
PARENCHYMA_HU = (-950.0, -700.0)
CONDITIONS = (("white", 0), ("white", 20), ("white", 40), ("white", 80), ("sharp", 20), ("sharp", 40), ("sharp", 80))
THICKNESS_BANDS_MM = ((0.0, 1.3), (1.3, 2.1), (2.1, 2.6), (2.6, 10.0))


def parenchyma_noise_hu(crop: np.ndarray) -> float | None:
    """Noise (HU, as white noise's std) from the lung parenchyma of a small ``(Z, Y, X)`` crop; None if too little."""
    residuals = []
    for plane in np.asarray(crop, np.float32):
        smooth = ndimage.gaussian_filter(plane, 1.5)
        parenchyma = ndimage.binary_erosion((smooth >= PARENCHYMA_HU[0]) & (smooth <= PARENCHYMA_HU[1]), iterations=2)
        residuals.append((plane - ndimage.uniform_filter(plane, 3))[parenchyma])
    values = np.concatenate(residuals)
    return None if values.size < 500 else white_noise_std(values)


def crops_inside(lungs: np.ndarray, count: int = 12, size: int = 44, depth: int = 8) -> list[tuple[slice, ...]]:
    """``count`` crops of LIDC's size centred on random lung voxels (seed 0)."""
    zs, ys, xs = np.nonzero(lungs)
    picks = np.random.default_rng(0).choice(len(zs), count, replace=False)
    return [(slice(max(0, zs[i] - depth // 2), max(0, zs[i] - depth // 2) + depth),
             slice(max(0, ys[i] - size // 2), max(0, ys[i] - size // 2) + size),
             slice(max(0, xs[i] - size // 2), max(0, xs[i] - size // 2) + size)) for i in picks]


def calibration() -> list[dict]:
    """Parenchyma estimate (median over 12 crops) against estimate_noise_hu, on the 12 non-COVID CTs."""
    rows = []
    cts = (sorted((DATA / "pleural-effusion").glob("*_ct.nii.gz"))
           + sorted((DATA / "lung-tumor-volumes").glob("*_image.nrrd")))
    for path in cts:
        image = sitk.ReadImage(str(path))
        hu = sitk.GetArrayFromImage(image).astype(np.int16)
        crops = crops_inside(sitk.GetArrayFromImage(segment_lungs(image)) > 0)
        for kind, sigma in CONDITIONS:
            noisy = hu if sigma == 0 else add_ct_noise(hu, sigma, kind, seed=0)
            estimates = [e for box in crops if (e := parenchyma_noise_hu(noisy[box])) is not None]
            rows.append({"ct": path.name, "noise": f"{kind}:{sigma}", "tissue_hu": round(estimate_noise_hu(noisy), 2),
                         "parenchyma_hu": round(float(np.median(estimates)), 2)})
            print(rows[-1], file=sys.stderr)
    return rows


def lidc_patients() -> dict[str, dict]:
    """Each LIDC patient's parenchyma noise (median over its crops) and slice thickness."""
    by_patient: dict[str, list] = {}
    for path in sorted((DATA / "lidc-nodules" / "image").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        estimate = parenchyma_noise_hu(sitk.GetArrayFromImage(image))
        if estimate is not None:
            by_patient.setdefault(path.name.split("_")[0], []).append((estimate, image.GetSpacing()[2]))
    return {patient: {"parenchyma_hu": float(np.median([e for e, _ in crops])),
                      "slice_mm": float(np.median([s for _, s in crops]))}
            for patient, crops in by_patient.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = calibration()
    tissue = np.array([r["tissue_hu"] for r in rows])
    parenchyma = np.array([r["parenchyma_hu"] for r in rows])
    structure = float(np.median(np.sqrt(np.clip(parenchyma ** 2 - tissue ** 2, 0, None))))
    print(f"calibration, 12 CTs x {len(CONDITIONS)} noise levels: parenchyma - tissue estimate "
          f"{np.min(parenchyma - tissue):+.1f} .. {np.max(parenchyma - tissue):+.1f} HU "
          f"(as stored {np.median((parenchyma - tissue)[::len(CONDITIONS)]):+.1f} HU median); "
          f"the parenchyma's own structure, added in quadrature: {structure:.1f} HU")
    patients = lidc_patients()
    raw = np.array([p["parenchyma_hu"] for p in patients.values()])
    thickness = np.array([p["slice_mm"] for p in patients.values()])
    corrected = np.sqrt(np.clip(raw ** 2 - structure ** 2, 0, None))
    print(f"LIDC-IDRI, {len(patients)} patients (noise as estimate_noise_hu would read it):")
    for name, values in (("structure taken out", corrected), ("as read", raw)):
        percentiles = " / ".join(f"{v:.0f}" for v in np.percentile(values, [10, 25, 50, 75, 90]))
        print(f"  percentiles 10 / 25 / 50 / 75 / 90, {name}: {percentiles} HU")
    for limit in (NOISY_CT_HU, 50.0, 80.0):
        print(f"  above {limit:.0f} HU: {np.mean(corrected > limit) * 100:.1f} % of patients "
              f"(uncorrected {np.mean(raw > limit) * 100:.1f} %)")
    for low, high in THICKNESS_BANDS_MM:
        band = (thickness > low) & (thickness <= high)
        if band.any():
            print(f"  slices {low}-{high} mm: {band.sum()} patients, median {np.median(corrected[band]):.0f} HU, "
                  f"above {NOISY_CT_HU:.0f} HU {np.mean(corrected[band] > NOISY_CT_HU) * 100:.0f} %")
    if args.json:
        args.json.write_text(json.dumps({"calibration": rows, "structure_hu": structure, "lidc": patients}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
