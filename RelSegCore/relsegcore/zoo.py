"""Model cards and safe model loading.

A model is ``<name>.pt`` (a ``state_dict``) beside ``<name>.json`` (its model card). The card
states what the model was trained on, the exact command, its measured metrics and the
weights' SHA-256, which is checked before ``torch.load(weights_only=True)``: loading
weights is loading code.

Models are looked up, in order, in the user's registry (``$RELSEG_HOME/models``, default
``~/.relseg/models``), folders named in ``$RELSEG_MODELS_DIR`` (``os.pathsep``-separated;
the Slicer module sets it to the extension's ``Resources/Models``), then the shipped models:
the copy a wheel carries (``relsegcore/shipped_models``, put there by setup.py) or, in a
source checkout, ``Resources/Models``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engines import resolve_engine
from .errors import ModelError
from .fileutil import atomic_write_bytes, atomic_write_text
from .models import DualEncoderUNet, EnsembleNetwork, NetworkConfig
from .registry import default_home

DEFAULT_MODEL = "covid-infection-2d"
PACKAGED_MODELS_DIR = Path(__file__).resolve().parent / "shipped_models"
CHECKOUT_MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
SHIPPED_MODELS_DIRS = (PACKAGED_MODELS_DIR, CHECKOUT_MODELS_DIR)


@dataclass
class ModelCard:
    name: str
    version: str
    description: str
    file: str
    sha256: str
    architecture: dict
    classes: list[str]
    preprocessing: dict = field(default_factory=lambda: {"input_size": 256})
    postprocessing: dict = field(default_factory=dict)  # {"threshold": t, how it was chosen}; {}: the argmax
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    date: str = ""
    parent: str | None = None
    clinical: bool = False
    recipe_models: dict = field(default_factory=dict)  # {preprocessing recipe: model} for 2D pictures (see below)
    path: Path | None = field(default=None, compare=False)  # the weights file, set when found on disk

    @property
    def role(self) -> str:
        """What the model segments: ``infection`` (the default, and every card without a role), ``lungs`` (the
        lungs step) or ``general-encoder`` (stage 1 of the dual model)."""
        role = str(self.training.get("role", "infection"))
        return "infection" if role == "fine-tuned" else role  # fine-tuned cards before 2.0 were all infection

    @property
    def threshold(self) -> float:
        """The foreground probability a binary model's pixel must exceed (``postprocessing["threshold"]``; 0.5,
        the argmax, when the card names none). Chosen on held-out folds of the training recipe, never on test
        patients (``Testing/benchmarks/choose_postprocessing.py``)."""
        return float(self.postprocessing.get("threshold", 0.5))

    @property
    def flip_tta(self) -> bool:
        """Whether every prediction averages with the left-right flipped one (``postprocessing["flip_tta"]``),
        as chosen on the recipe's folds; ``--tta`` asks for it on any model."""
        return bool(self.postprocessing.get("flip_tta", False))

    @property
    def upside_down_tta(self) -> bool:
        """Whether every prediction also averages with those on the image turned upside down
        (``postprocessing["upside_down_tta"]``): for networks trained on both orientations (``--augment-series``),
        as chosen on the recipe's folds."""
        return bool(self.postprocessing.get("upside_down_tta", False))

    @property
    def min_component_fraction(self) -> float:
        """A 2D slice's foreground components smaller than this fraction of its largest are dropped
        (``postprocessing["min_component_fraction"]``; 0 keeps all). For organ models such as the lungs, whose
        stray islands are errors; never for lesions, which are many and small."""
        return float(self.postprocessing.get("min_component_fraction", 0.0))

    @property
    def outside_body_dropped(self) -> bool:
        """Whether a 2D slice's foreground components lying mostly outside the body are dropped
        (``postprocessing["outside_body_dropped"]``, ``inference.drop_outside_body``): for organ models such as
        the lungs, which never lie outside the body; never for lesions."""
        return bool(self.postprocessing.get("outside_body_dropped", False))

    @property
    def within_lungs(self) -> str | None:
        """A lung model (name or path) whose lungs bound this model's labels on 2D slices evaluated without HU
        (``relseg evaluate --data ctseg2d:``, ``--images``), as the lungs step bounds them in ``segment``
        (``postprocessing["within_lungs"]``; None: unbounded there)."""
        return self.postprocessing.get("within_lungs")  # a non-empty string: _check_within_lungs

    def model_for_recipe(self, recipe: str) -> str | None:
        """The model (name or path) that scores 2D pictures prepared by ``recipe`` in this model's place, or None
        when this model scores them itself (``recipe_models``; ``relseg evaluate --images`` follows it and says
        so). A network trained on one appearance says little about another: ``covid-infection-2d``, trained on
        full-slice-clahe slices of real CT, names ``covid-semiseg-2d`` for COVID-SemiSeg's lung-window crops."""
        return self.recipe_models.get(recipe)

    @property
    def members(self) -> int:
        """How many networks the model averages (``architecture["members"]``; 1, a single network, without it)."""
        return int(self.architecture.get("members", 1))

    def member_config(self) -> NetworkConfig:
        """The architecture of each of the model's networks (the model's own when it is one network)."""
        return NetworkConfig(**{k: v for k, v in self.architecture.items() if k != "members"})

    @property
    def infection_classes(self) -> list[str]:
        """Class names without the background, as segment names."""
        return self.classes[1:]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        missing = {"name", "version", "description", "file", "sha256", "architecture", "classes"} - data.keys()
        if missing:
            raise ModelError(f"model card is missing {', '.join(sorted(missing))}")
        card = cls(**{k: v for k, v in data.items() if k in known}, path=path)
        _check_members(card)
        _check_threshold(card)
        _check_min_component_fraction(card)
        _check_within_lungs(card)
        _check_recipe_models(card)
        return card


def _check_members(card: ModelCard) -> None:
    """``architecture.members``, when present, is a whole number of networks, at least 2."""
    if "members" not in card.architecture:
        return
    members = card.architecture["members"]
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ModelError(f"model card {card.name}: architecture.members must be a whole number of at least 2, "
                         f"not {members!r}")


def _check_threshold(card: ModelCard) -> None:
    """A threshold applies to a binary model's foreground probability only, strictly between 0 and 1."""
    if "threshold" not in card.postprocessing:
        return
    threshold = _postprocessing_number(card, "threshold", 0.5)
    if not 0.0 < threshold < 1.0:
        raise ModelError(f"model card {card.name}: postprocessing.threshold must lie between 0 and 1, "
                         f"not {card.postprocessing['threshold']!r}")
    if len(card.classes) != 2:
        raise ModelError(f"model card {card.name}: a postprocessing.threshold needs a model of 2 classes, "
                         f"not {len(card.classes)}")


def _check_min_component_fraction(card: ModelCard) -> None:
    """A component fraction is a share of the largest component: 0 (keep all) up to, not including, 1."""
    if not 0.0 <= _postprocessing_number(card, "min_component_fraction", 0.0) < 1.0:
        raise ModelError(f"model card {card.name}: postprocessing.min_component_fraction must lie in [0, 1), "
                         f"not {card.postprocessing['min_component_fraction']!r}")


def _check_recipe_models(card: ModelCard) -> None:
    """``recipe_models`` maps known recipes other than the card's own to a model name or path, never itself."""
    from .data.intensity import RECIPES, recipe_of

    if not isinstance(card.recipe_models, dict):
        raise ModelError(f"model card {card.name}: recipe_models must map recipes to models, "
                         f"not {card.recipe_models!r}")
    own = recipe_of(card.preprocessing)
    for recipe, model in card.recipe_models.items():
        if recipe not in RECIPES or recipe == own:
            raise ModelError(f"model card {card.name}: recipe_models names {recipe!r}, which is not one of the "
                             f"other recipes ({', '.join(r for r in RECIPES if r != own)})")
        _check_names_another_model(card, f"recipe_models[{recipe!r}]", model)


def _check_within_lungs(card: ModelCard) -> None:
    """``within_lungs`` names a lung model other than the card's own."""
    value = card.postprocessing.get("within_lungs")
    if value is not None:
        _check_names_another_model(card, "postprocessing.within_lungs", value)


def _check_names_another_model(card: ModelCard, field_name: str, value: object) -> None:
    """A card field that hands work to another model holds a non-empty name or path, and never the card's own
    model (which would hand the work back to itself)."""
    if not isinstance(value, str) or not value.strip() or Path(value).stem == card.name:
        raise ModelError(f"model card {card.name}: {field_name} must name another model, not {value!r}")


def _postprocessing_number(card: ModelCard, key: str, default: float) -> float:
    """``card.postprocessing[key]`` as a float (``default`` when absent), NaN when it is not a number."""
    try:
        return float(card.postprocessing.get(key, default))
    except (TypeError, ValueError):
        return math.nan


@dataclass
class LoadedModel:
    network: DualEncoderUNet | EnsembleNetwork
    card: ModelCard
    device: torch.device
    engine: str = "torch"  # what runs predict_slices' forward passes (``engines``): "torch" or "openvino"
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)  # the engine's forward


def user_home() -> Path:
    """``$RELSEG_HOME`` or ``~/.relseg`` (``registry.default_home``)."""
    return default_home()


def models_dirs() -> list[Path]:
    dirs = [user_home() / "models"]
    dirs += [Path(p) for p in os.environ.get("RELSEG_MODELS_DIR", "").split(os.pathsep) if p]
    dirs += SHIPPED_MODELS_DIRS
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def read_card(card_path: Path) -> ModelCard:
    try:
        data = json.loads(Path(card_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read model card {card_path}: {error}") from None
    card = ModelCard.from_dict(data)
    card.path = Path(card_path).with_name(card.file)
    return card


def list_models() -> list[ModelCard]:
    """All models found, first occurrence of each name wins (the user's registry before shipped)."""
    seen: dict[str, ModelCard] = {}
    for directory in models_dirs():
        for card_path in sorted(directory.glob("*.json")):
            try:
                card = read_card(card_path)
            except ModelError:
                continue
            seen.setdefault(card.name, card)
    return list(seen.values())


def find_model(name_or_path: str | os.PathLike | None = None) -> ModelCard:
    """A model by name, by card path (``.json``) or by weights path (``.pt`` with its card beside it).

    ``None`` means the registry's current default (``relseg models use``), normally ``DEFAULT_MODEL``.
    """
    if not name_or_path:
        from .registry import default_model_name

        name_or_path = default_model_name()
    path = Path(name_or_path)
    if path.suffix in (".json", ".pt") or path.exists():
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise ModelError(f"no model card {card_path.name} beside {path}")
        return read_card(card_path)
    for card in list_models():
        if card.name == str(name_or_path):
            return card
    names = ", ".join(card.name for card in list_models()) or "none"
    raise ModelError(f"unknown model {name_or_path!r}; installed models: {names}")


def build_network(card: ModelCard) -> DualEncoderUNet | EnsembleNetwork:
    """The card's network, untrained: one U-Net, or an ensemble of ``card.members`` of them."""
    config = card.member_config()
    return EnsembleNetwork(config, card.members) if card.members > 1 else DualEncoderUNet(config)


def architecture_of(network: torch.nn.Module) -> dict:
    """What a card's ``architecture`` says to rebuild ``network``: its config, and its member count if an ensemble."""
    architecture = network.config.to_dict()
    if isinstance(network, EnsembleNetwork):
        architecture["members"] = len(network.members)
    return architecture


def load_state_dict_verified(path: Path, sha256: str) -> dict:
    """Read weights only after their SHA-256 matches the card; never unpickle arbitrary objects."""
    if not path.is_file():
        raise ModelError(f"model weights not found: {path}")
    data = path.read_bytes()
    import hashlib

    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ModelError(f"checksum mismatch for {path.name}: card says {sha256[:12]}..., file is {actual[:12]}...")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad model file
        raise ModelError(f"cannot load model weights {path.name}: {error}") from None


def verified_network(card: ModelCard) -> tuple[DualEncoderUNet | EnsembleNetwork, dict]:
    """The card's network with its weights (read only after their SHA-256 matches the card), and those weights."""
    network = build_network(card)
    state = load_state_dict_verified(card.path, card.sha256)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"weights of {card.name} do not match its architecture: {error}") from None
    return network, state


def load_model(name_or_path: str | os.PathLike | ModelCard | None, device: torch.device,
               engine: str = "torch") -> LoadedModel:
    """The verified network on ``device``; ``engine`` ("auto", "torch", "openvino": see ``engines``) says what
    runs its forward passes in ``inference``. A card already found is used as it is."""
    card = name_or_path if isinstance(name_or_path, ModelCard) else find_model(name_or_path)
    network, _ = verified_network(card)
    network.to(device).eval()
    resolved = resolve_engine(engine, device, int(card.architecture.get("dims", 2)))
    return LoadedModel(network=network, card=card, device=device, engine=resolved)


def save_model(network: torch.nn.Module, card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``<name>.pt`` then ``<name>.json`` atomically; the card's sha256 and date are filled in."""
    directory = Path(directory)
    weights_path = directory / f"{card.name}.pt"
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    # Saved to memory first: torch.save names the archive's records after the file it writes, and a temporary
    # file's name is random, so equal weights would give files (and SHA-256) that differ from save to save.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(weights_path, data)
    sha = hashlib.sha256(data).hexdigest()
    card.file = weights_path.name
    card.sha256 = sha
    card.date = card.date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    card.architecture = architecture_of(network) if hasattr(network, "config") else card.architecture
    atomic_write_text(directory / f"{card.name}.json", json.dumps(card.to_dict(), indent=2) + "\n")
    card.path = weights_path
    return weights_path
