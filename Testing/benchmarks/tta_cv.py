"""Does flip test-time augmentation (``--tta``) help? Measured on the folds of a finished search.

Each fold's final checkpoint (``search.py`` keeps ``checkpoint.pt`` and the fold's validation
cases) is scored on its own 10 validation slices at their native size, without and with the
horizontal flip, exactly as ``relseg evaluate`` does. Prints one row per fold and the mean
difference; the two numbers of a row come from the same model on the same slices.

    python Testing/benchmarks/tta_cv.py --runs work-dirs/search-cpu/target-only \
        --data ../shared/data/covid-semiseg/train
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from relsegcore import zoo
from relsegcore.evaluation import evaluate_image_folder
from relsegcore.models import DualEncoderUNet, NetworkConfig
from relsegcore.training import load_checkpoint


def fold_model(fold_dir: Path, folder: Path) -> zoo.LoadedModel:
    """The fold's final weights as a model file with a card, loaded the way ``relseg evaluate`` loads one."""
    checkpoint = load_checkpoint(fold_dir / "checkpoint.pt")
    network = DualEncoderUNet(NetworkConfig(**checkpoint["config"]["network"]))
    network.load_state_dict(checkpoint["model"])
    card = zoo.ModelCard(name="fold", version="0", description=str(fold_dir), file="", sha256="",
                         architecture={}, classes=["background", "infection"],  # save_model fills the architecture
                         preprocessing={"input_size": 256})
    return zoo.load_model(zoo.save_model(network, card, folder), torch.device("cpu"))


def validation_folder(fold_dir: Path, data: Path, folder: Path) -> None:
    """Links to the fold's validation slices and masks (``images/``, ``masks/``) in ``folder``."""
    stems = {case.split("/", 1)[1] for case in json.loads((fold_dir / "fold_result.json").read_text())["val_cases"]}
    for sub in ("images", "masks"):
        (folder / sub).mkdir()
        for path in (data / sub).iterdir():
            if path.stem in stems:
                (folder / sub / path.name).symlink_to(path.resolve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a configuration's folder with fold*/ runs")
    parser.add_argument("--data", type=Path, required=True, help="COVID-SemiSeg train folder (images/, masks/)")
    args = parser.parse_args()
    differences = []
    print("| fold | without flip | with flip | difference |\n|---:|---:|---:|---:|")
    for fold_dir in sorted(args.runs.glob("fold*")):
        if not (fold_dir / "checkpoint.pt").is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            loaded = fold_model(fold_dir, folder)
            validation_folder(fold_dir, args.data, folder)
            plain, flipped = (evaluate_image_folder(loaded, folder / "images", folder / "masks", tta=tta)["mean_dice"]
                              for tta in (False, True))
        differences.append(flipped - plain)
        print(f"| {fold_dir.name} | {plain:.4f} | {flipped:.4f} | {100 * (flipped - plain):+.2f} |")
    if not differences:
        print(f"no finished folds in {args.runs}", file=sys.stderr)
        return 1
    sd = statistics.stdev(differences) if len(differences) > 1 else 0.0
    print(f"mean difference {100 * statistics.fmean(differences):+.2f} ± {100 * sd:.2f} points, "
          f"flip better on {sum(d > 0 for d in differences)} of {len(differences)} folds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
