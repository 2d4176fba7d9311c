"""Session 22 (measured, not adopted): a 2D pleural-effusion network taken out of the HU lungs, on two patient folds.

Issue 13 asks that at most 5 % of each expert effusion mask lie inside the lungs; the HU lungs keep 23.7 % of
LUNG1-002's (dependent fluid the z-closing takes in with consolidation) and 5.4-7.8 % of three others' (the
masks' edge). This trains the project's U-Net (base 8, target-only) on the effusion masks in the
``full-slice-clahe`` recipe the infection model already renders, with COVID-19 slices as chests without effusion
(half of each batch each), and scores it on held-out patients only:

- fold A holds out effusion patients LUNG1-001/002/005/008/013 and COVID-19 patients coronacases_001/003/005/008,
  radiopaedia_10/27; fold B the others;
- effusion inside the lungs, HU lungs before and after the predicted effusion is taken out (optionally grown
  ``--grow`` voxels in-plane), the HU lung volume removed, the effusion Dice;
- the share of each held-out COVID-19 patient's expert infection and lungs predicted as effusion (consolidation
  must stay lung); the lung volume removed on ``lung-tumor-volumes``; the per-lung Dice on ``covid-hu-slices``.

The rule and the result are in ``Testing/benchmarks/README.md`` (session 22)::

    python Testing/benchmarks/learned_effusion_folds.py train --fold A --out work-dirs/s22/eff-foldA   # ~22 min, 1 core
    python Testing/benchmarks/learned_effusion_folds.py score --fold A --run work-dirs/s22/eff-foldA [--grow 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from relsegcore.data.ctseg import patient_of_name, read_ctseg2d
from relsegcore.data.intensity import FULL_SLICE_CLAHE, render_full_slice, resize_slices
from relsegcore.data.readers import read_volume_pairs
from relsegcore.inference import class_probabilities
from relsegcore.lungs import LEFT_LUNG, RIGHT_LUNG, segment_lungs_array
from relsegcore.metrics import dice
from relsegcore.models.unet import NetworkConfig
from relsegcore.training import TrainConfig, build_network, load_checkpoint, train

DATA = Path(os.environ.get("RELSEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
EFFUSION = DATA / "pleural-effusion"
CTSEG = DATA / "covid-ct-seg-2d"
HELD_OUT = {
    "A": (["LUNG1-001", "LUNG1-002", "LUNG1-005", "LUNG1-008", "LUNG1-013"],
          ["coronacases_001", "coronacases_003", "coronacases_005", "coronacases_008", "radiopaedia_10",
           "radiopaedia_27"]),
    "B": (["LUNG1-016", "LUNG1-018", "LUNG1-024", "LUNG1-026", "LUNG1-028"],
          ["coronacases_002", "coronacases_004", "coronacases_007", "radiopaedia_14", "radiopaedia_29",
           "radiopaedia_36"]),
}
NETWORK = NetworkConfig(base_channels=8, use_general_encoder=False)
SIZE = 256


def training_slices(fold: str, cache_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, effusion masks and draw weights of the fold's training patients (the other fold's)."""
    other = "B" if fold == "A" else "A"
    effusion_cases, covid_patients = HELD_OUT[other]
    volumes = [read_volume_pairs(EFFUSION, size=SIZE, only_lesion_slices=False, context="lungs",
                                 recipe=FULL_SLICE_CLAHE, pattern=f"{case}_ct*", cache_dir=cache_dir)
               for case in effusion_cases]
    effusion_images = np.concatenate([v.images for v in volumes])
    effusion_masks = (np.concatenate([v.masks for v in volumes]) > 0).astype(np.uint8)
    covid = read_ctseg2d(CTSEG, target="infection", cases=covid_patients, upright=True)
    images = np.concatenate([effusion_images, covid.images])
    masks = np.concatenate([effusion_masks, np.zeros_like(covid.masks)])
    weights = np.r_[np.full(len(effusion_images), 0.5 / len(effusion_images)),
                    np.full(len(covid.images), 0.5 / len(covid.images))]
    print(f"fold {fold}: {len(effusion_images)} slices of {effusion_cases}, {len(covid.images)} COVID-19 slices "
          f"of {covid_patients}")
    return images, masks, weights


def run_train(args: argparse.Namespace) -> None:
    images, masks, weights = training_slices(args.fold, args.cache_dir)
    config = TrainConfig(out_dir=args.out, network=NETWORK, iterations=args.iterations, batch_size=8, seed=0,
                         validate_every=args.iterations, device="cpu")
    result = train(config, images, masks, sample_weights=weights)
    print(f"trained in {result.seconds:.0f} s: {args.out / 'checkpoint.pt'}")


def effusion_probability(network: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """P(effusion) float32 (N, S, S) for uint8 images (N, S, S)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            x = torch.from_numpy(images[start:start + 16]).float().div(255).unsqueeze(1)
            out.append(class_probabilities(network, x)[:, 1].numpy())
    return np.concatenate(out)


def effusion_labels(network, hu: np.ndarray, grow: int) -> np.ndarray:
    """The predicted effusion of a canonical HU volume on its grid (probabilities resized, then > 0.5)."""
    probability = effusion_probability(network, np.stack([render_full_slice(s, SIZE) for s in hu]))
    labels = resize_slices(probability, hu.shape[1:], order=1) > 0.5
    return np.stack([ndimage.binary_dilation(s, iterations=grow) for s in labels]) if grow else labels


def canonical_array(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def score_effusion_patients(network, cases: list[str], grow: int) -> list[dict]:
    rows = []
    for case in cases:
        hu, spacing = canonical_array(EFFUSION / f"{case}_ct.nii.gz")
        effusion = canonical_array(EFFUSION / f"{case}_effusion.nii.gz")[0] > 0
        lungs = segment_lungs_array(hu.astype(np.float32), spacing) > 0
        predicted = effusion_labels(network, hu.astype(np.float32), grow)
        rows.append({"case": case, "inside_hu_lungs": float((effusion & lungs).sum() / effusion.sum()),
                     "inside_after": float((effusion & lungs & ~predicted).sum() / effusion.sum()),
                     "lung_volume_removed": float((lungs & predicted).sum() / lungs.sum()),
                     "effusion_dice": float(dice(predicted, effusion))})
    return rows


def score_covid_patients(network, patients: list[str], grow: int) -> list[dict]:
    infection = read_ctseg2d(CTSEG, target="infection", cases=patients, upright=True)
    lungs = read_ctseg2d(CTSEG, target="lungs", cases=patients, upright=True)
    predicted = effusion_probability(network, infection.images) > 0.5
    if grow:  # one pixel at 256 is about two voxels of a 512 slice: errs towards taking more
        predicted = np.stack([ndimage.binary_dilation(s, iterations=grow) for s in predicted])
    owner = np.array([patient_of_name(name) for name in infection.names])
    rows = []
    for patient in sorted(set(owner)):
        mine = owner == patient
        expert_infection, expert_lungs = infection.masks[mine] > 0, lungs.masks[mine] > 0
        rows.append({"patient": patient,
                     "infection_as_effusion": float((predicted[mine] & expert_infection).sum()
                                                    / max(expert_infection.sum(), 1)),
                     "lungs_as_effusion": float((predicted[mine] & expert_lungs).sum() / expert_lungs.sum())})
    return rows


def score_tumour_volumes(network, grow: int) -> list[dict]:
    rows = []
    for case in ("lung1", "lung2"):
        hu, spacing = canonical_array(DATA / "lung-tumor-volumes" / f"{case}_image.nrrd")
        lungs = segment_lungs_array(hu.astype(np.float32), spacing) > 0
        predicted = effusion_labels(network, hu.astype(np.float32), grow)
        rows.append({"case": case, "lung_volume_removed": float((lungs & predicted).sum() / lungs.sum())})
    return rows


def score_hu_slices(network, grow: int) -> list[dict]:
    rows = []
    for path in sorted((DATA / "covid-hu-slices").glob("*.npz")):
        data = np.load(path)
        hu = data["image"][None].astype(np.float32)
        labels = segment_lungs_array(hu, (0.7, 0.7, 5.0))
        labels[effusion_labels(network, hu, grow)] = 0
        rows.append({"slice": path.stem, **{side: float(dice(labels[0] == value, data["lung_mask"] == value))
                                           for side, value in (("left", LEFT_LUNG), ("right", RIGHT_LUNG))}})
    return rows


def run_score(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    network = build_network(TrainConfig(out_dir=args.run, network=NETWORK))
    network.load_state_dict(load_checkpoint(args.run / "checkpoint.pt")["model"])
    network.eval()
    effusion_cases, covid_patients = HELD_OUT[args.fold]
    result = {"fold": args.fold, "grow": args.grow,
              "effusion": score_effusion_patients(network, effusion_cases, args.grow),
              "covid": score_covid_patients(network, covid_patients, args.grow),
              "tumour_volumes": score_tumour_volumes(network, args.grow),
              "covid_hu_slices": score_hu_slices(network, args.grow)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train the fold's effusion network")
    trainer.add_argument("--fold", choices=sorted(HELD_OUT), required=True)
    trainer.add_argument("--out", type=Path, required=True)
    trainer.add_argument("--iterations", type=int, default=1500)
    trainer.add_argument("--cache-dir", default="work-dirs/cache")
    trainer.set_defaults(func=run_train)
    scorer = commands.add_parser("score", help="score a fold's network on its held-out patients")
    scorer.add_argument("--fold", choices=sorted(HELD_OUT), required=True)
    scorer.add_argument("--run", type=Path, required=True)
    scorer.add_argument("--grow", type=int, default=0, help="voxels the predicted effusion grows in-plane")
    scorer.add_argument("--json", type=Path)
    scorer.set_defaults(func=run_score)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
