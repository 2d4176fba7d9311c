"""Which models the module offers, and where they live.

- Shipped models: the extension's ``Resources/Models`` (put on ``RELSEG_MODELS_DIR``, which
  relsegcore's zoo searches; the variable is inherited by the segmentation subprocess).
- Downloaded and fine-tuned models, and the persisted default: relsegcore's ``ModelRegistry``
  in ``RELSEG_HOME``, which inside Slicer is ``<Slicer settings folder>/COVIDInfectionSeg``,
  so a download is kept across extension updates and works offline once cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
SUMMARY_CHARS = 48  # one line of the model card's description in the selector


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    name: str
    label: str
    tooltip: str
    is_default: bool
    always_tta: bool = False  # the card averages every slice with its mirror (flip_tta): no Fast quality to offer


def shipped_models_dirs() -> list[Path]:
    """The extension's models: ``<module>/Resources/Models`` when installed, the checkout's in a source tree."""
    candidates = (MODULE_DIR / "Resources" / "Models", MODULE_DIR.parent / "Resources" / "Models")
    return [path for path in candidates if path.is_dir()]


def slicer_settings_home() -> Path | None:
    """``<folder of Slicer's user settings>/COVIDInfectionSeg`` inside Slicer, else None."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return None
    return Path(app.slicerUserSettingsFilePath).parent / "COVIDInfectionSeg"


def configure_model_search() -> list[Path]:
    """Set ``RELSEG_HOME`` (inside Slicer, unless the user set it) and add shipped folders to ``RELSEG_MODELS_DIR``."""
    home = slicer_settings_home()
    if home is not None:
        os.environ.setdefault("RELSEG_HOME", str(home))
    current = [Path(p) for p in os.environ.get("RELSEG_MODELS_DIR", "").split(os.pathsep) if p]
    merged = current + [path for path in shipped_models_dirs() if path not in current]
    os.environ["RELSEG_MODELS_DIR"] = os.pathsep.join(str(path) for path in merged)
    return merged


def default_model() -> str:
    """The registry's default model (the shipped one until the user chooses another)."""
    from relsegcore.registry import default_model_name

    return default_model_name()


def model_choices() -> list[ModelChoice]:
    """Installed infection models for the selector (the lung model runs in the lungs step): name, version and
    the card's one-line description; default first."""
    from relsegcore.registry import ModelRegistry

    registry = ModelRegistry()
    choices = []
    for entry in registry.list():
        card = registry.card(entry.name)
        if card.role != "infection":
            continue
        summary = (entry.description or "").strip().splitlines()[0] if entry.description else ""
        summary = summary if len(summary) <= SUMMARY_CHARS else summary[: SUMMARY_CHARS - 3].rstrip() + "..."
        label = f"{entry.name} {entry.version}" + (f" - {summary}" if summary else "")
        origin = f"fine-tuned from {entry.parent}" if entry.parent else entry.origin
        choices.append(ModelChoice(entry.name, label + (" (default)" if entry.is_default else ""),
                                   f"{summary}\n{origin}, {entry.date}", entry.is_default, card.flip_tta))
    return sorted(choices, key=lambda choice: not choice.is_default)


def models_in_index(index_url: str) -> list[dict]:
    """Models a models index (JSON list with name, version, url, sha256) offers."""
    from relsegcore import download

    return download.fetch_models_index(index_url)


def download_model_entry(entry: dict, progress: Callable[[float, str], None] | None = None):
    """Download (resuming, verifying SHA-256, reusing the cache) one index entry into the registry.

    ``progress(fraction, stage)`` is called as bytes arrive (the panel's progress bar).
    """
    from relsegcore.progress import Progress
    from relsegcore.registry import ModelRegistry

    return ModelRegistry().install(entry, progress=Progress(callback=progress) if progress else None)


def use_model(name: str):
    """Make an installed model the default (checks its weights first)."""
    from relsegcore.registry import ModelRegistry

    return ModelRegistry().use(name)


def roll_back() -> str:
    """Return to the previous default model; returns its name."""
    from relsegcore.registry import ModelRegistry

    return ModelRegistry().rollback()
