"""Which patients of a 2D slice folder are stored posterior up (spine at the top), told by their lungs.

The pipeline feeds the network HU slices anterior up, always; ``covid-ct-seg-2d`` stores every Radiopaedia
series posterior up. A network trained with ``--upright`` only ever sees chests anterior up, so such slices are
turned upright before it sees them (in training and in ``relseg evaluate``) and its labels turned back.

The lungs tell the orientation without any annotation of it: on an axial slice they are widest in their
posterior part (the paravertebral gutters and the posterior recesses reach further out than the lung behind
the sternum). Measured on the expert lung masks of ``covid-ct-seg-2d``: the widest row lies at a median 62-68 %
of the lungs' height from the top on each coronacases series (anterior up; 88-100 % of each series' slices
beyond 50 %) and at 31-42 % on each Radiopaedia series of more than one slice (posterior up; 0-18 % beyond).
One slice can mislead (radiopaedia_29's one-slice series: 54 %), so the decision pools every slice of a
patient (the series of one patient come from one archive).
"""

from __future__ import annotations

import numpy as np

MIN_LUNG_FRACTION = 0.005  # slices whose lungs cover less of the image (apex, bases) do not vote


def widest_row_fraction(lungs: np.ndarray) -> float | None:
    """Where the lungs of one slice ``(H, W)`` are widest, as a fraction of their height from the top (0 = the
    lungs' top row, 1 = their bottom row; rows equally wide count by their mean), or None when they cover too
    little of the slice to tell."""
    lungs = np.asarray(lungs) > 0
    if lungs.sum() < MIN_LUNG_FRACTION * lungs.size:
        return None
    rows = np.flatnonzero(lungs.any(axis=1))
    widths = lungs[rows[0]:rows[-1] + 1].sum(axis=1)
    widest = np.flatnonzero(widths == widths.max()).mean()  # ties (a box) average out to the middle
    return float(widest) / max(len(widths) - 1, 1)


def posterior_up_groups(lung_masks: np.ndarray | list[np.ndarray], groups: list[str]) -> set[str]:
    """The groups (patients) whose slices are stored posterior up: the median widest-row fraction of their
    slices is below 0.5, in the lungs' top half (exactly 0.5 cannot tell and leaves the group as stored).
    ``lung_masks[i]`` belongs to ``groups[i]``; a group with no slice large enough to vote is taken as stored
    anterior up."""
    if len(lung_masks) != len(groups):
        raise ValueError(f"{len(lung_masks)} lung masks but {len(groups)} group names")
    votes: dict[str, list[float]] = {}
    for lungs, group in zip(lung_masks, groups, strict=True):
        fraction = widest_row_fraction(lungs)
        if fraction is not None:
            votes.setdefault(group, []).append(fraction)
    return {group for group, fractions in votes.items() if float(np.median(fractions)) < 0.5}
