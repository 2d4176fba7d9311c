"""Annotation efficiency: fine-tuning a 10-slice model with k corrected slices vs training from scratch.

On the 50 COVID-SemiSeg training slices (held-out test slices are not available):

- held-out fold: ``crossval.fold_indices(50, 5)[0]`` (10 slices), never trained on;
- base model: trained from scratch on 10 of the remaining 40 slices (chosen by ``--seed``);
- for k in ``--extra`` (default 0, 5, 10, 20, 30: only 30 slices remain besides the base 10,
  so the issue's 40 is not possible): fine-tune the base with k more "corrected" slices
  (``relsegcore.finetune.finetune``: general encoder frozen, the k new slices drawn 3x as
  often as the replayed base slices), and train from scratch on the same 10 + k slices with
  the same total budget (base + fine-tuning iterations);
- mean Dice on the held-out fold (per slice, at the model's 256 px input, as the fine-tuning
  guard scores it) and the wall time of each run.

Writes ``results.json``, ``table.md`` and ``learning_curve.png`` to ``--out``. Sized for a GPU
(defaults: about 3 minutes on one H100); on 2 CPU cores use small settings, e.g.::

    python Testing/benchmarks/annotation_efficiency.py --data ../shared/data/covid-semiseg/train \
        --device cuda --out /tmp/annotation-efficiency
    python Testing/benchmarks/annotation_efficiency.py --data ../shared/data/covid-semiseg/train \
        --device cpu --out /tmp/ae-cpu --iterations 40 --finetune-iterations 15 --batch-size 4 --extra 0,5
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from relsegcore.crossval import fold_indices
from relsegcore.data.intensity import DEFAULT_WINDOW
from relsegcore.data.readers import read_image_folder
from relsegcore.device import describe_device, select_device
from relsegcore.fileutil import atomic_path, atomic_write_text
from relsegcore.finetune import DEFAULT_LEARNING_RATE, FinetuneSlices, finetune, holdout_dice
from relsegcore.models import NetworkConfig
from relsegcore.training import RelationConfig, TrainConfig, train
from relsegcore.zoo import ModelCard, save_model

BASE_SLICES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="covid-semiseg/train (images/ + masks/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md, PNG, models")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--iterations", type=int, default=400, help="base model's training iterations")
    parser.add_argument("--finetune-iterations", type=int, help="fine-tuning iterations (default: 3/8 of --iterations)")
    parser.add_argument("--extra", default="0,5,10,20,30", help="numbers of corrected slices added to the base 10")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate from scratch")
    parser.add_argument("--finetune-lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--general-encoder", type=Path,
                        help="stage-1 model whose encoder is the general encoder (default: single-encoder network)")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out fold 0, base 10, the others in the order they are added as corrections)."""
    held = fold_indices(count, 5)[0]
    rest = np.setdiff1d(np.arange(count), held)
    order = rest[np.random.default_rng(seed).permutation(len(rest))]
    return held, order[:BASE_SLICES], order[BASE_SLICES:]


def scratch_config(args: argparse.Namespace, out_dir: Path, iterations: int) -> TrainConfig:
    network = NetworkConfig(base_channels=args.base_channels, use_general_encoder=args.general_encoder is not None)
    relation = {"reading": "encoders"} if args.general_encoder is not None else {}
    return TrainConfig(out_dir=out_dir, network=network, iterations=iterations, batch_size=args.batch_size,
                       learning_rate=args.lr, seed=args.seed, general_encoder=args.general_encoder,
                       relation=RelationConfig(**relation), validate_every=iterations, checkpoint_every=iterations,
                       device=args.device)


def train_from_scratch(args, out_dir: Path, iterations: int, data, indices, held: FinetuneSlices,
                       device: torch.device) -> tuple[torch.nn.Module, float, float]:
    """(network, held-out Dice, wall seconds including the scoring)."""
    started = time.perf_counter()
    result = train(scratch_config(args, out_dir, iterations), data.images[indices], data.masks[indices],
                   resume=False)
    dice = holdout_dice(result.network, held, device)
    return result.network, dice, time.perf_counter() - started


def save_base(network: torch.nn.Module, args, directory: Path, size: int, seconds: float) -> Path:
    card = ModelCard(
        name="base-10-slices", version="1.0.0", description="annotation-efficiency base model (10 slices)",
        file="", sha256="", architecture={}, classes=["background", "infection"],
        preprocessing={"input_size": size, "window": list(DEFAULT_WINDOW), "crop": "lungs"},
        training={"data": f"{args.data} ({BASE_SLICES} slices)", "iterations": args.iterations,
                  "seconds": round(seconds, 1)},
    )
    directory.mkdir(parents=True, exist_ok=True)
    return save_model(network, card, directory)


def run(args: argparse.Namespace) -> dict:
    device = select_device(args.device)
    finetune_iterations = args.finetune_iterations or max(1, args.iterations * 3 // 8)
    extras = [int(k) for k in args.extra.split(",")]
    data = read_image_folder(args.data, size=256)
    data.masks = (data.masks > 0).astype(np.uint8)
    held_idx, base_idx, pool = split(len(data), args.seed)
    if max(extras) > len(pool):
        raise SystemExit(f"only {len(pool)} slices remain besides the base {BASE_SLICES}; --extra max is {len(pool)}")
    held = FinetuneSlices(data.images[held_idx], data.masks[held_idx], np.zeros(len(held_idx), bool),
                          [data.names[i] for i in held_idx], "held-out fold 0")
    print(f"{len(data)} slices: held out {len(held_idx)}, base {len(base_idx)}, pool {len(pool)}; "
          f"device {describe_device(device)}", flush=True)

    base_network, base_dice, base_seconds = train_from_scratch(args, args.out / "runs" / "base", args.iterations,
                                                               data, base_idx, held, device)
    base_path = save_base(base_network, args, args.out / "models", 256, base_seconds)
    print(f"base: Dice {base_dice:.4f} in {base_seconds:.0f} s", flush=True)
    rows = []
    for k in extras:
        added = pool[:k]
        indices = np.concatenate([base_idx, added])
        row = {"extra_slices": k, "train_slices": len(indices), "base_dice": base_dice}
        if k == 0:
            row.update(finetune_dice=base_dice, finetune_seconds=0.0, scratch_dice=base_dice,
                       scratch_seconds=base_seconds, scratch_iterations=args.iterations)
        else:
            edited = np.isin(indices, added)
            tuned = finetune(base_path, data.images[indices], data.masks[indices], edited,
                             args.out / "models" / f"finetuned-{k}.pt", holdout_images=held.images,
                             holdout_masks=held.masks, device=args.device, iterations=finetune_iterations,
                             batch_size=args.batch_size, learning_rate=args.finetune_lr, seed=args.seed,
                             source=f"{args.data}: base + {k} slices")
            _, scratch_dice, scratch_seconds = train_from_scratch(
                args, args.out / "runs" / f"scratch-{k}", args.iterations + finetune_iterations, data, indices, held,
                device)
            row.update(finetune_dice=tuned.dice_after, finetune_seconds=tuned.seconds, scratch_dice=scratch_dice,
                       scratch_seconds=scratch_seconds, scratch_iterations=args.iterations + finetune_iterations)
        rows.append(row)
        print(f"k={k:2d}: fine-tuned Dice {row['finetune_dice']:.4f} ({row['finetune_seconds']:.0f} s), "
              f"from scratch {row['scratch_dice']:.4f} ({row['scratch_seconds']:.0f} s)", flush=True)
    return {
        "command": "python " + shlex.join(sys.argv),
        "device": describe_device(device),
        "torch_threads": torch.get_num_threads(),
        "held_out": [data.names[i] for i in held_idx],
        "base": [data.names[i] for i in base_idx],
        "added_in_order": [data.names[i] for i in pool],
        "base_iterations": args.iterations, "finetune_iterations": finetune_iterations,
        "batch_size": args.batch_size, "lr": args.lr, "finetune_lr": args.finetune_lr,
        "general_encoder": str(args.general_encoder) if args.general_encoder else None,
        "base_seconds": base_seconds, "rows": rows,
    }


def markdown_table(results: dict) -> str:
    lines = [
        f"Held-out fold: {len(results['held_out'])} slices; base: {len(results['base'])} slices, "
        f"{results['base_iterations']} iterations; fine-tuning {results['finetune_iterations']} iterations; "
        f"from scratch {results['base_iterations']} + {results['finetune_iterations']} iterations; "
        f"batch {results['batch_size']}; {results['device']}.",
        "",
        "| corrected slices added | training slices | fine-tuned Dice | fine-tune time (s) | "
        "from-scratch Dice | from-scratch time (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['extra_slices']} | {row['train_slices']} | {row['finetune_dice']:.3f} | "
                     f"{row['finetune_seconds']:.0f} | {row['scratch_dice']:.3f} | {row['scratch_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = [row["extra_slices"] for row in results["rows"]]
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.plot(extra, [row["finetune_dice"] for row in results["rows"]], "o-", label="fine-tuned from base")
    axis.plot(extra, [row["scratch_dice"] for row in results["rows"]], "s--", label="from scratch, same slices")
    axis.axhline(results["rows"][0]["base_dice"], color="grey", lw=0.8, label="base (10 slices)")
    axis.set_xlabel("corrected slices added to the base 10")
    axis.set_ylabel("mean Dice, held-out fold (10 slices)")
    axis.set_title(f"Annotation efficiency ({results['device']})", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    atomic_write_text(args.out / "table.md", table)
    plot(results, args.out / "learning_curve.png")
    print(table)
    print(f"written: {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
