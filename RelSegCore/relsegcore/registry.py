"""Model versions: which model is the default, how it got there, and how to go back.

The default model is stored in ``<home>/registry.json`` (``home`` is ``$RELSEG_HOME``, by
default ``~/.relseg``) with the list of earlier defaults. It changes only through ``use``,
``rollback`` or ``register(..., make_default=True)``, never as a side effect: a fine-tuned
model that is merely registered does not become the default, and a default that goes
missing is reported as missing rather than silently replaced. Without ``registry.json`` the
default is the shipped model ``covid-infection-2d``.

Fine-tuned models are copied into ``<home>/models``, where ``zoo`` finds them like any
other model (the user's folder comes before the shipped ones).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, ModelError
from .fileutil import atomic_path, atomic_write_text, sha256_of

SHIPPED_DEFAULT = "covid-infection-2d"  # = zoo.DEFAULT_MODEL, repeated so reading the default needs no torch
STATE_FILE = "registry.json"
HISTORY_LIMIT = 50


@dataclass(frozen=True)
class RegistryEntry:
    """One installed model as ``relseg models list`` shows it."""

    name: str
    version: str
    parent: str | None
    origin: str  # "local" (in <home>/models) or "shipped"
    is_default: bool
    metrics: dict
    description: str
    date: str
    path: Path  # the weights file


class ModelRegistry:
    """Shipped and locally fine-tuned models, with a persisted default and its history."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home is not None else default_home()
        self.models_dir = self.home / "models"
        self.state_path = self.home / STATE_FILE

    def list(self) -> list[RegistryEntry]:
        default = self.default()
        return [self._entry(card, default) for card in sorted(self._cards().values(), key=lambda c: c.name)]

    def default(self) -> str:
        return self._state()["default"] or SHIPPED_DEFAULT

    def history(self) -> list[str]:
        """Earlier defaults, oldest first; ``rollback`` returns to the last one."""
        return list(self._state()["history"])

    def card(self, name: str):
        """The model card of an installed model (``zoo.ModelCard``)."""
        cards = self._cards()
        if name not in cards:
            installed = ", ".join(sorted(cards)) or "none"
            raise ModelError(f"no installed model is named {name!r}; installed models: {installed}")
        return cards[name]

    def entry(self, name: str) -> RegistryEntry:
        return self._entry(self.card(name), self.default())

    def use(self, name: str) -> RegistryEntry:
        """Make an installed, verified model the default; the previous default goes on the history."""
        role = self.card(name).role
        if role != "infection":
            raise ModelError(f"{name} is a {role} model, not an infection model: it cannot be the default "
                             "(a lung model runs in the lungs step: relseg segment --lungs NAME)")
        self.verify(name)
        state = self._state()
        current = state["default"] or SHIPPED_DEFAULT
        if name != current:
            self._write_state(name, [*state["history"], current])
        return self.entry(name)

    def rollback(self) -> str:
        """Go back to the previous default; returns its name."""
        state = self._state()
        if not state["history"]:
            raise ModelError(f"there is no earlier default model to roll back to (the default is {self.default()})")
        previous = state["history"][-1]
        try:
            self.verify(previous)
        except ModelError as error:
            raise ModelError(f"cannot roll back to {previous}: {error}") from None
        self._write_state(previous, state["history"][:-1])
        return previous

    def register(self, source: str | os.PathLike, make_default: bool = False) -> RegistryEntry:
        """Copy a model (``.pt`` or ``.json`` path, card beside the weights) into ``<home>/models``.

        A name already used by another model is refused, so registering never changes what an
        existing name (perhaps the default) means. Registering the same model again is a no-op.
        """
        from . import zoo

        source = Path(source)
        if not source.is_file():
            raise InputError(f"no model file at {source}")
        card = zoo.find_model(source)
        _verify_card(card)
        if not self._already_installed(card.name, card.sha256):
            self._install(card)
        return self.use(card.name) if make_default else self.entry(card.name)

    def install(self, index_entry: dict, progress=None, make_default: bool = False) -> RegistryEntry:
        """Download a models-index entry (see ``download.fetch_models_index``) into ``<home>/models``."""
        from .download import install_from_index

        name, sha256 = str(index_entry.get("name", "")), str(index_entry.get("sha256", "")).lower()
        if not self._already_installed(name, sha256):
            install_from_index(index_entry, self.models_dir, progress)
        return self.use(name) if make_default else self.entry(name)

    def verify(self, name: str) -> None:
        """Raise ``ModelError`` unless ``name`` is installed, its weights match the card and load."""
        _verify_card(self.card(name))

    # -- internals ----------------------------------------------------------------------------

    def _already_installed(self, name: str, sha256: str) -> bool:
        """True for the same model under this name; a different model under it is refused."""
        existing = self._cards().get(name)
        if existing is not None and existing.sha256 != sha256:
            raise ModelError(
                f"a different model named {name!r} is already installed ({existing.path}); "
                "give the new version its own name"
            )
        return existing is not None

    def _install(self, card) -> None:
        """Weights first, card last: the model appears to ``zoo`` only when both are complete."""
        weights = self.models_dir / f"{card.name}.pt"
        with atomic_path(weights) as tmp:
            shutil.copyfile(card.path, tmp)
            if sha256_of(tmp) != card.sha256:
                raise ModelError(f"{card.path} changed while it was being copied; try again")
        data = card.to_dict()
        data["file"] = weights.name
        atomic_write_text(self.models_dir / f"{card.name}.json", json.dumps(data, indent=2) + "\n")

    def _cards(self) -> dict:
        """Installed cards by name; this registry's own folder first, then the shipped folders."""
        from . import zoo

        local = self.models_dir.resolve()
        user_default = (zoo.user_home() / "models").resolve()
        folders = [self.models_dir] + [d for d in zoo.models_dirs() if d.resolve() not in (local, user_default)]
        cards: dict = {}
        for folder in folders:
            for card_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    card = zoo.read_card(card_path)
                except ModelError:
                    continue
                cards.setdefault(card.name, card)
        return cards

    def _entry(self, card, default: str) -> RegistryEntry:
        origin = "local" if card.path.parent.resolve() == self.models_dir.resolve() else "shipped"
        return RegistryEntry(
            name=card.name, version=card.version, parent=card.parent, origin=origin,
            is_default=card.name == default, metrics=dict(card.metrics), description=card.description,
            date=card.date, path=card.path,
        )

    def _state(self) -> dict:
        if not self.state_path.is_file():
            return {"default": None, "history": []}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            default, history = state.get("default"), state.get("history", [])
            if not (default is None or isinstance(default, str)) or not all(isinstance(h, str) for h in history):
                raise ValueError("unexpected content")
        except (OSError, ValueError, AttributeError, TypeError) as error:
            raise ModelError(
                f"the model registry {self.state_path} is unreadable ({error}); fix or delete it"
            ) from None
        return {"default": default, "history": history}

    def _write_state(self, default: str, history: list[str]) -> None:
        state = {"default": default, "history": history[-HISTORY_LIMIT:]}
        atomic_write_text(self.state_path, json.dumps(state, indent=2) + "\n")


def default_home() -> Path:
    """``$RELSEG_HOME`` or ``~/.relseg``: the one rule for the user's folder (models, registry, caches); here
    because this module does not import torch."""
    return Path(os.environ.get("RELSEG_HOME", Path.home() / ".relseg"))


def default_model_name(home: str | os.PathLike | None = None) -> str:
    """The model to use when the user names none: the registry's default. Cheap: reads one JSON file."""
    return ModelRegistry(home).default()


def _verify_card(card) -> None:
    """The weights exist, match the card's SHA-256 and fit the card's architecture."""
    from . import zoo

    state = zoo.load_state_dict_verified(card.path, card.sha256)
    try:
        zoo.build_network(card).load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ModelError(f"the weights of {card.name} do not fit its model card's architecture: {error}") from None
