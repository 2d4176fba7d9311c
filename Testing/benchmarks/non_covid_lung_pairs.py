"""Lung labels for the 12 non-COVID CTs of ``../shared/data``, without an expert: HU lungs, corrected by the labels
those CTs do have.

- ``pleural-effusion/LUNG1-xxx``: the HU lungs minus the expert effusion mask (effusion is not lung);
- ``lung-tumor-volumes/lung1|2``: the HU lungs plus the tumour mask (a tumour is lung).

Written as ``CASE_image.nii.gz`` + ``CASE_label.nii.gz`` (both lungs 1) for ``relseg train --target lungs --pooled
pairs:OUT`` (session 23's experiment, ``Testing/benchmarks/README.md``); prints each case's HU lung voxels, label
voxels and the share of its effusion or tumour mask that the HU lungs held. The CTs are copied into ``OUT``
(keep it outside the repository, e.g. under the ignored ``work-dirs/``)::

    python Testing/benchmarks/non_covid_lung_pairs.py work-dirs/s23/lung-pairs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from relsegcore.lungs import segment_lungs

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def cases(data: Path) -> list[tuple[Path, Path, bool]]:
    """``(ct, mask, mask_is_lung)`` for every non-COVID CT."""
    effusions = [(ct, ct.with_name(ct.name.replace("_ct", "_effusion")), False)
                 for ct in sorted((data / "pleural-effusion").glob("*_ct.nii.gz"))]
    tumours = [(data / f"lung-tumor-volumes/lung{i}_image.nrrd", data / f"lung-tumor-volumes/lung{i}_label.nrrd", True)
               for i in (1, 2)]
    return effusions + tumours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for ct_path, mask_path, mask_is_lung in cases(args.data):
        ct = sitk.ReadImage(str(ct_path))
        name = ct_path.name.split("_")[0]
        lungs = sitk.GetArrayFromImage(segment_lungs(ct)) > 0
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
        label = (lungs | mask) if mask_is_lung else (lungs & ~mask)
        label_image = sitk.GetImageFromArray(label.astype(np.uint8))
        label_image.CopyInformation(ct)
        sitk.WriteImage(ct, str(args.out / f"{name}_image.nii.gz"))
        sitk.WriteImage(label_image, str(args.out / f"{name}_label.nii.gz"))
        inside = (lungs & mask).sum() / max(mask.sum(), 1)
        print(f"{name}: HU lungs {int(lungs.sum())} voxels, label {int(label.sum())}, "
              f"{'tumour' if mask_is_lung else 'effusion'} inside the HU lungs {inside:.3f}")


if __name__ == "__main__":
    main()
