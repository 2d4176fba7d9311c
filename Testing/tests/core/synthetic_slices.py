"""Tiny synthetic training data shared by the training and fine-tuning tests."""

from __future__ import annotations

import numpy as np


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
