"""Is augmentation cheap next to the network? Time of one batch's augmentation vs one training step.

Training draws its batch from tensors already on the training device and augments it there
(``data/augment.py``), so there is no loader to wait for; the only question is whether the
augmentation itself takes a noticeable share of an iteration. Both are timed alternately in
one process on the same batch shape (the shipped dual network, 256 px, batch 8 by default),
so machine noise hits both alike; the ratio is what to read.

    python Testing/benchmarks/bench_augment.py --device cpu --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from relsegcore.data.augment import augment_batch
from relsegcore.device import autocast, select_device
from relsegcore.losses import segmentation_loss
from relsegcore.models import DualEncoderUNet, NetworkConfig


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = select_device(args.device)
    network = DualEncoderUNet(NetworkConfig(use_general_encoder=True)).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch_size, 1, args.size, args.size, device=device, generator=generator)
    masks = (images[:, 0] > 0.7).long()

    def augment() -> tuple[torch.Tensor, torch.Tensor]:
        return augment_batch(images, masks, generator=generator)

    def step() -> None:
        with autocast(device):
            loss = segmentation_loss(network(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    timings: dict[str, list[float]] = {"augmentation": [], "training step": []}
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        augment()
        step()
    for _ in range(args.repeats):
        for name, work in (("augmentation", augment), ("training step", step)):
            synchronise(device)
            start = time.perf_counter()
            work()
            synchronise(device)
            timings[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"device {device}, batch {args.batch_size} x {args.size}x{args.size}, {args.repeats} alternating repeats,"
          f" {torch.get_num_threads()} threads")
    for name, value in median.items():
        print(f"  {name:>14}: median {1000 * value:8.1f} ms")
    share = median["augmentation"] / (median["augmentation"] + median["training step"])
    print(f"augmentation / training step = {median['augmentation'] / median['training step']:.3f}"
          f" ({100 * share:.1f} % of an iteration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
