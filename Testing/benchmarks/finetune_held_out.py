"""Does ``relseg finetune`` on 16 new real slices improve a dual model on other unseen slices?

The shipped ``covid-infection-2d`` was trained on all 50 COVID-SemiSeg training slices, so
on this project's machines there are no unseen real slices to fine-tune and score it on (the
48 test slices are kept elsewhere). This benchmark stands in for that: the 50 slices are split
by the cross-validation folds (``crossval.fold_indices(50, 5, seed=0)``) into

- ``base`` (24 slices: folds 3, 4 and 4 slices of fold 2): a dual model trained with the
  shipped recipe's configuration (general encoder frozen, relation loss ``encoders`` w 10);
- ``finetune`` (16 slices: fold 0 and 6 slices of fold 1): what the site corrects;
- ``holdout`` (10 slices: the rest of folds 1 and 2): never seen by either model.

It runs the plain commands (printed), then ``relseg evaluate`` of both models on ``holdout``,
and prints mean Dice before/after and the fine-tuning wall time.

    python Testing/benchmarks/finetune_held_out.py --data ../shared/data/covid-semiseg/train \\
        --general work-dirs/recipe/general/covid-general-encoder.pt --out work-dirs/ft-held-out --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from relsegcore.crossval import fold_indices
from relsegcore.data.readers import read_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "RelSegCore" / "recipes"))
from shipped_models import CONFIGS  # noqa: E402  (the recipe's own arguments: one definition of "shipped dual")

SHIPPED_DUAL = CONFIGS["dual-frozen+relation-encoders"]  # the configuration of covid-infection-2d 1.0.0


def split(data: Path, out: Path) -> dict[str, list[str]]:
    """Link the 50 slices into ``out/{base,finetune,holdout}/{images,masks}`` by fold."""
    names = [name.split("/")[-1] for name in read_image_folder(data, size=32).names]
    parts = fold_indices(len(names), 5, seed=0)
    groups = {"base": [*parts[3], *parts[4], *parts[2][:4]], "finetune": [*parts[0], *parts[1][:6]],
              "holdout": [*parts[1][6:], *parts[2][4:]]}
    for group, indices in groups.items():
        for sub in ("images", "masks"):
            (out / group / sub).mkdir(parents=True, exist_ok=True)
            for index in indices:
                source = next((data / sub).glob(names[index] + ".*")).resolve()
                target = out / group / sub / source.name
                if not target.exists():
                    os.symlink(source, target)
    return {group: sorted(names[i] for i in indices) for group, indices in groups.items()}


def relseg(*args: str) -> float:
    """Run one ``relseg`` command (printed); returns its wall time in seconds."""
    print("$ relseg " + shlex.join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "relsegcore.cli", *args], check=True)
    return time.perf_counter() - started


def evaluate(model: Path, folder: Path, out: Path, device: str) -> float:
    relseg("evaluate", "--model", str(model), "--images", str(folder / "images"), "--masks", str(folder / "masks"),
           "--json", str(out), "--device", device)
    return json.loads(out.read_text())["mean_dice"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="COVID-SemiSeg train folder (images/, masks/)")
    parser.add_argument("--general", type=Path, required=True, help="the recipe's stage-1 model (.pt)")
    parser.add_argument("--out", type=Path, default=Path("work-dirs/ft-held-out"))
    parser.add_argument("--iterations", type=int, default=300, help="training of the base model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    groups = split(args.data, args.out)
    base_dir = args.out / "base"
    base = base_dir / "run" / "base-model.pt"
    if not base.is_file():
        relseg("train", "--images", str(base_dir / "images"), "--masks", str(base_dir / "masks"),
               *[a.replace("{general}", str(args.general)) for a in SHIPPED_DUAL],
               "--iterations", str(args.iterations), "--batch-size", str(args.batch_size), "--device", args.device,
               "--out", str(base_dir / "run"), "--export", "base-model")
    tuned = args.out / "finetuned.pt"
    seconds = relseg("finetune", "--model", str(base), "--images", str(args.out / "finetune" / "images"),
                     "--masks", str(args.out / "finetune" / "masks"), "--out", str(tuned), "--device", args.device)
    before = evaluate(base, args.out / "holdout", args.out / "before.json", args.device)
    after = evaluate(tuned, args.out / "holdout", args.out / "after.json", args.device)
    result = {"groups": groups, "holdout_dice_before": before, "holdout_dice_after": after,
              "finetune_seconds": round(seconds, 1), "device": args.device}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out Dice (10 unseen slices): base {before:.4f} -> fine-tuned {after:.4f} "
          f"({after - before:+.4f}); fine-tuning took {seconds:.0f} s on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
