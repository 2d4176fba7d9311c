"""K-fold cross-validation on training slices: the only place hyper-parameters are tuned."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from .fileutil import atomic_write_text


def fold_indices(count: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Split ``range(count)`` into ``folds`` disjoint, near-equal, shuffled parts (deterministic by seed)."""
    if not 2 <= folds <= count:
        raise ValueError(f"need 2 <= folds <= {count}, got {folds}")
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, folds)]


def train_val_split(count: int, folds: int, fold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    parts = fold_indices(count, folds, seed)
    val = parts[fold]
    train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold]))
    return train, val


def summarise_folds(fold_results: list[dict]) -> dict:
    """Mean and sample sd of each fold's final validation mean Dice."""
    dice = [r["val_dice"] for r in fold_results]
    return {
        "folds": fold_results,
        "mean_dice": statistics.fmean(dice),
        "sd_dice": statistics.stdev(dice) if len(dice) > 1 else 0.0,
    }


def write_summary(path: Path, summary: dict) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
