"""Where the module finds models: shipped with the extension, downloaded into Slicer's settings folder.

relsegcore's zoo searches the folders in ``RELSEG_MODELS_DIR``; this module puts the
extension's ``Resources/Models`` and the download cache there (in the environment, so the
segmentation subprocess sees them too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "covid-infection-2d"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    name: str
    label: str
    tooltip: str


def shipped_models_dirs() -> list[Path]:
    """The extension's models: ``<module>/Resources/Models`` when installed, the checkout's in a source tree."""
    candidates = (MODULE_DIR / "Resources" / "Models", MODULE_DIR.parent / "Resources" / "Models")
    return [path for path in candidates if path.is_dir()]


def download_cache_dir() -> Path:
    """Downloaded models live beside Slicer's user settings (kept across extension updates, works offline)."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is not None:
        return Path(app.slicerUserSettingsFilePath).parent / "COVIDInfectionSeg" / "Models"
    return Path.home() / ".relseg" / "models"


def configure_model_search(extra_dirs: list[Path] | None = None) -> list[Path]:
    """Put the shipped and downloaded model folders on ``RELSEG_MODELS_DIR``; return the full list."""
    current = [Path(p) for p in os.environ.get("RELSEG_MODELS_DIR", "").split(os.pathsep) if p]
    wanted = [download_cache_dir(), *shipped_models_dirs(), *(extra_dirs or [])]
    merged = current + [path for path in wanted if path not in current]
    os.environ["RELSEG_MODELS_DIR"] = os.pathsep.join(str(path) for path in merged)
    return merged


def model_choices() -> list[ModelChoice]:
    """Installed models for the selector: name, version and the card's one-line description."""
    from relsegcore import zoo

    choices = []
    for card in zoo.list_models():
        summary = (card.description or "").strip().splitlines()[0] if card.description else ""
        classes = ", ".join(card.infection_classes)
        choices.append(ModelChoice(card.name, f"{card.name} {card.version} - {summary}".strip(" -"),
                                   f"{summary}\nClasses: {classes}\nSHA-256: {card.sha256[:12]}..."))
    return choices


def models_in_index(index_url: str) -> list[dict]:
    """Models a models index (JSON list with name, version, url, sha256) offers."""
    from relsegcore import download

    return download.fetch_models_index(index_url)


def download_model_entry(entry: dict, progress=None) -> Path:
    """Download (or resume, or reuse from the cache) one index entry into the cache; return the weights path."""
    from relsegcore import download

    cache = download_cache_dir()
    configure_model_search([cache])
    return download.install_from_index(entry, cache_dir=cache, progress=progress)
