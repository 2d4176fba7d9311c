"""Tiny synthetic training data shared by the training and fine-tuning tests."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image


def squares(count: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares on dark noise: a task a tiny network learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, size, size)).astype(np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for i in range(count):
        y, x = rng.integers(2, size - 14, 2)
        images[i, y:y + 12, x:x + 12] += 150
        masks[i, y:y + 12, x:x + 12] = 1
    return images, masks


# (series, slices): two series of radiopaedia_10, as in the real set
SERIES = [("coronacases_001", 3), ("coronacases_002", 2), ("radiopaedia_10_85902_1", 1),
          ("radiopaedia_10_85902_3", 2), ("radiopaedia_14_85914_0", 2)]


def chest_lungs(size: int = 32, posterior_up: bool = False) -> np.ndarray:
    """Lungs 0/255 widest near their posterior (bottom) rows, as on a real axial slice; upside down when
    ``posterior_up``."""
    lungs = np.zeros((size, size), np.uint8)
    for row in range(size // 8, size - size // 8):
        half = 2 + (row * (size // 2 - 4)) // size
        lungs[row, size // 2 - half: size // 2 + half] = 255
    return lungs[::-1].copy() if posterior_up else lungs


def make_ctseg_folder(root: Path, size: int = 32, chest: bool = False) -> Path:
    """A tiny folder in the covid-ct-seg-2d layout; slice i has its infection in row i (so order is checkable).
    ``chest``: lungs shaped by ``chest_lungs``, the Radiopaedia series posterior up as in the real set (else a box)."""
    for folder in ("images", "masks", "lungs"):
        (root / folder).mkdir(parents=True)
    rows, index = [], 0
    for case, count in SERIES:
        for order in range(count):
            name = f"{index:04d}.png"
            image = np.full((size, size), 40 + index, np.uint8)
            image[:, : size // 2] = 200  # asymmetric: a transposition would show
            infection = np.zeros((size, size), np.uint8)
            infection[index, 2:6] = 255
            lungs = np.zeros((size, size), np.uint8)
            lungs[4:28, 4:28] = 255
            if chest:
                lungs = chest_lungs(size, posterior_up=case.startswith("radiopaedia"))
            Image.fromarray(image).save(root / "images" / name)
            Image.fromarray(infection).save(root / "masks" / name)
            Image.fromarray(lungs).save(root / "lungs" / name)
            rows.append({"file": name, "case": case, "source": case.split("_")[0], "order_in_case": order})
            index += 1
    with open(root / "cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "case", "source", "order_in_case"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def save_constant_model(directory: Path, foreground: bool, name: str = "constant", preprocessing: dict | None = None,
                        training: dict | None = None, probability: float | None = None,
                        postprocessing: dict | None = None, recipe_models: dict | None = None) -> Path:
    """A tiny network that predicts the same class everywhere (its Dice on any mask is known exactly), saved with
    its card; returns the weights' path. ``probability``: the foreground probability it gives every pixel
    instead (``foreground`` is then ignored)."""
    import torch

    from relsegcore import zoo
    from relsegcore.models import DualEncoderUNet, NetworkConfig

    network = DualEncoderUNet(NetworkConfig(base_channels=4, depth=3, use_general_encoder=False))
    with torch.no_grad():
        network.head.weight.zero_()
        if probability is not None:
            network.head.bias.copy_(torch.tensor([0.0, math.log(probability / (1.0 - probability))]))
        else:
            network.head.bias.copy_(torch.tensor([0.0, 5.0] if foreground else [5.0, 0.0]))
    card = zoo.ModelCard(name=name, version="1", description="test", file="", sha256="", architecture={},
                         classes=["background", "infection"], preprocessing=preprocessing or {"input_size": 32},
                         postprocessing=postprocessing or {}, training=training or {},
                         recipe_models=recipe_models or {})
    return zoo.save_model(network, card, directory)
