"""Ground-glass and consolidation by attenuation: the split behind the percentages radiologists report.

Percentage of opacity (PO) is the share of a lung's volume that is infection. Percentage of
high opacity (PHO) is the share that is infection at or above ``HIGH_OPACITY_HU``: the
attenuation that separates ground-glass opacity (still aerated, below) from consolidation
(airless, at or above) in published COVID-19 CT quantification (PO and PHO of Chaganti et
al., Radiology: Artificial Intelligence 2020). Every function here takes the threshold as a
parameter defaulting to that one constant; ``relseg segment --high-opacity-hu`` overrides it.

A model with a single infection class says nothing about the kind of opacity, so its
infection is split here into ground-glass (label 1) and consolidation (label 2), the labels
a 3-class model produces itself. A model with classes of its own keeps them; PHO is still
measured from the HU, so that it means the same for every model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .terminology import infection_definitions, segment_definition

HIGH_OPACITY_HU = -200.0
GROUND_GLASS_LABEL = 1
CONSOLIDATION_LABEL = 2


def high_opacity(infected: np.ndarray, hu: np.ndarray, threshold_hu: float = HIGH_OPACITY_HU) -> np.ndarray:
    """Infected voxels at or above ``threshold_hu``: what PHO counts (``infected`` boolean, same shape as ``hu``)."""
    return infected & (np.asarray(hu) >= threshold_hu)


def split_by_attenuation(infection: np.ndarray, hu: np.ndarray, threshold_hu: float = HIGH_OPACITY_HU) -> np.ndarray:
    """Labels uint8: 1 ground-glass (infected, below ``threshold_hu``), 2 consolidation (at or above), else 0.

    ``infection`` is infected where non-zero. Only the infected voxels are looked at, so that a
    whole CT costs one more uint8 volume, not several boolean ones.
    """
    labels = np.zeros(infection.shape, np.uint8)
    infected = np.flatnonzero(infection)
    dense = np.asarray(hu).reshape(-1)[infected] >= threshold_hu
    labels.reshape(-1)[infected] = np.where(dense, CONSOLIDATION_LABEL, GROUND_GLASS_LABEL)
    return labels


def has_single_infection_class(class_names: Sequence[str]) -> bool:
    """True for a binary model (one infection class besides any background): its infection gets split by HU."""
    return len(infection_definitions(list(class_names))) == 1


def split_class_names() -> list[str]:
    """Names of labels 1 and 2 after ``split_by_attenuation``, as the terminology names the segments."""
    return [segment_definition("ground_glass").name, segment_definition("consolidation").name]
