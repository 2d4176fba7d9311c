"""Losses: Dice + cross-entropy for segmentation, the relation-consistency regulariser, and distillation.

The relation loss follows the sample-relation consistency of SRC-MT (Liu et al., IEEE TMI
2020), the nearest public definition of the paper's "relation-driven collaborative
learning": for a batch of B samples, flatten each sample's activation map into a row of
``A`` (B x D), form the Gram matrix ``A @ A.T`` (B x B), L2-normalise each row, and take the
mean squared difference between two such matrices. What is compared with what is
configurable (see ``training.RelationConfig``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   false_negative_weight: float = 0.5, per_sample: bool = False) -> torch.Tensor:
    """1 - mean foreground soft Dice over classes 1..C-1, by default one Dice over the whole batch (batch Dice).

    ``false_negative_weight`` b makes it the Tversky index (Salehi et al., 2017), TP / (TP + (1-b) FP + b FN):
    0.5 is Dice exactly (the same floating-point result), above 0.5 a missed pixel costs more than a false one.
    ``per_sample`` computes one Dice per sample and averages them, as the benchmark's mean per-slice Dice does:
    a slice with a small structure then weighs as much as one with a large one (a sample without the class
    scores about 0 with almost no gradient, as in nnU-Net's non-batch Dice; cross-entropy still teaches it).
    """
    probabilities = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    reduce_dims = [*([] if per_sample else [0]), *range(2, logits.ndim)]
    intersection = (probabilities * one_hot).sum(reduce_dims)
    predicted, expected = probabilities.sum(reduce_dims), one_hot.sum(reduce_dims)
    # 2 TP + 2 (1-b) FP + 2 b FN = P + G + (2b - 1)(G - P); the last term is exactly 0 at b = 0.5
    denominator = predicted + expected + (2 * false_negative_weight - 1) * (expected - predicted)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice[..., 1:].mean()


def segmentation_loss(logits: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                      false_negative_weight: float = 0.5, dice_per_sample: bool = False) -> torch.Tensor:
    """Dice (or Tversky, ``soft_dice_loss``) + cross-entropy; with deep supervision (a list of logits, finest
    first) a weighted sum.

    Coarser outputs are compared with a nearest-downsampled target and weighted 1/2^k, as in nnU-Net.
    """
    if isinstance(logits, torch.Tensor):
        return (soft_dice_loss(logits, target, false_negative_weight=false_negative_weight,
                               per_sample=dice_per_sample)
                + F.cross_entropy(logits.float(), target.long()))
    weights = [0.5**k for k in range(len(logits))]
    total = 0.0
    for weight, level_logits in zip(weights, logits, strict=True):
        level_target = target
        if level_logits.shape[2:] != target.shape[1:]:
            level_target = F.interpolate(target[:, None].float(), size=level_logits.shape[2:], mode="nearest")[:, 0]
        total = total + weight * segmentation_loss(level_logits, level_target, false_negative_weight,
                                                   dice_per_sample)
    return total / sum(weights)


def relation_matrix(features: torch.Tensor) -> torch.Tensor:
    """Row-normalised B x B Gram matrix of the flattened per-sample features."""
    flat = features.float().flatten(start_dim=1)
    gram = flat @ flat.t()
    return F.normalize(gram, p=2, dim=1)


def relation_loss(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two batches' relation matrices (0 when relations agree).

    Features of different widths are allowed: only the B x B relations are compared.
    """
    if features_a.shape[0] != features_b.shape[0]:
        raise ValueError("relation_loss needs the same batch on both sides")
    return F.mse_loss(relation_matrix(features_a), relation_matrix(features_b))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """Per-pixel KL divergence from the teacher's softened class probabilities to the student's, times T^2
    (Hinton et al. 2015): 0 when the two agree. A small network learns a larger one's predictions, so the
    product runs at the small network's speed."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_pixel = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return per_pixel.mean() * temperature**2
