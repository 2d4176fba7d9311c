"""Make one model of several trained runs of a recipe: ``relseg models ensemble A B --out NAME.pt``.

The members must be interchangeable: the same architecture, classes, role and input recipe (a network trained
on one appearance says nothing about another), and each single networks (an ensemble's members are named
instead). The card keeps each member's name, version, SHA-256, training command and data, and takes the first
member's postprocessing; its metrics are left for the ensemble's own measurement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError, ModelError
from .models import EnsembleNetwork
from .zoo import ModelCard, find_model, load_state_dict_verified, save_model

SAME_IN_EVERY_MEMBER = ("classes", "preprocessing", "role")


def make_ensemble(models: Sequence[str | os.PathLike], out: str | os.PathLike, version: str = "1.0.0",
                  description: str = "", command: str = "") -> ModelCard:
    """Write ``out`` (``NAME.pt`` and ``NAME.json``): the models' probabilities averaged, as one model."""
    out = Path(out)
    if out.suffix != ".pt":
        raise InputError(f"the ensemble's path must end in .pt (NAME.pt), not {out.name}")
    if len(models) < 2:
        raise InputError(f"an ensemble needs at least two models, {len(models)} given")
    cards = [find_model(model) for model in models]
    _check_interchangeable(cards, out)
    states = [load_state_dict_verified(card.path, card.sha256) for card in cards]
    first = cards[0]
    network = EnsembleNetwork.of(first.member_config(), states)
    card = ModelCard(
        name=out.stem, version=version, file="", sha256="", architecture={}, classes=list(first.classes),
        description=description or f"mean probability of {len(cards)} networks: "
                                   + ", ".join(f"{c.name} {c.version}" for c in cards),
        preprocessing=dict(first.preprocessing), postprocessing=dict(first.postprocessing),
        recipe_models=dict(first.recipe_models),
        training={
            "role": first.role, "command": command,
            "ensemble_of": [{"name": c.name, "version": c.version, "sha256": c.sha256,
                             "command": c.training.get("command"), "data": c.training.get("data"),
                             "seconds": c.training.get("seconds")} for c in cards],
            # every slice any member saw: relseg evaluate warns when the ensemble is scored on them
            "image_fingerprints": list(dict.fromkeys(f for c in cards
                                                     for f in c.training.get("image_fingerprints", []))),
        },
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(network, card, out.parent)
    return card


def _check_interchangeable(cards: list[ModelCard], out: Path) -> None:
    """Refuse members that are ensembles, that differ where the ensemble needs them equal, or that ``out`` would
    overwrite."""
    first = cards[0]
    for card in cards:
        if card.members > 1:
            raise ModelError(f"{card.name} is itself an ensemble of {card.members} networks: name its members")
        if card.path is not None and card.path.resolve() == out.resolve():
            raise InputError(f"the ensemble would overwrite its member {card.path}; choose another path")
        if card.member_config() != first.member_config():
            raise ModelError(f"{card.name} and {first.name} have different architectures; an ensemble's members "
                             "must share one")
        for field in SAME_IN_EVERY_MEMBER:
            if getattr(card, field) != getattr(first, field):
                raise ModelError(f"{card.name} and {first.name} differ in {field} ({getattr(card, field)!r} against "
                                 f"{getattr(first, field)!r}); an ensemble's members must agree")
