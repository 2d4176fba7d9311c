"""Build hook: a wheel of relsegcore carries the shipped models.

The models live at the repository's top level (``Resources/Models``, which the Slicer
extension installs). An editable install finds them there; a wheel or sdist built from the
checkout gets a copy in ``relsegcore/shipped_models`` so that ``pip install ./RelSegCore``
gives a ``relseg`` that segments with its default model. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

REPOSITORY_MODELS = Path(__file__).resolve().parent.parent / "Resources" / "Models"
PACKAGED_MODELS = Path("relsegcore") / "shipped_models"  # zoo.PACKAGED_MODELS_DIR


def copy_models(destination: Path) -> None:
    """Weights and their model cards; nothing when building from an sdist (they are in it already)."""
    if not REPOSITORY_MODELS.is_dir():
        return
    destination.mkdir(parents=True, exist_ok=True)
    for source in sorted(REPOSITORY_MODELS.iterdir()):
        if source.suffix in (".pt", ".json"):
            shutil.copyfile(source, destination / source.name)


class BuildPyWithModels(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads Resources/Models in place
            copy_models(Path(self.build_lib) / PACKAGED_MODELS)


class SdistWithModels(sdist):
    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        copy_models(Path(base_dir) / PACKAGED_MODELS)


setup(cmdclass={"build_py": BuildPyWithModels, "sdist": SdistWithModels})
