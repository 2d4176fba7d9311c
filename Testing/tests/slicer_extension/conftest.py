"""Fixtures for the Slicer module's tests: a real MRML scene with Slicer's module logics (slicer-core).

``mrml`` bootstraps vtkMRMLScene + application, colour, volumes, segmentations, tables and
subject-hierarchy logics and installs them as ``slicer.mrmlScene`` / ``slicer.modules``; the
module's Qt-free package ``COVIDInfectionSegLib`` is imported from the checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
for path in (HERE, REPO / "COVIDInfectionSeg"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import headless_slicer  # noqa: E402
from headless_slicer import load_volume, volume_from_image  # noqa: E402


@pytest.fixture
def mrml():
    """A fresh scene with Slicer's logics, installed in the ``slicer`` module; cleared afterwards."""
    env = headless_slicer.bootstrap()
    yield env
    headless_slicer.teardown(env)


@pytest.fixture
def lung_ct(mrml, shared_data):
    """Real chest CT in HU (pyradiomics lung1, 512x512x48 NRRD) as a volume node."""
    return load_volume(shared_data / "lung-tumor-volumes" / "lung1_image.nrrd", "lung1")


@pytest.fixture(scope="session")
def demo_ct():
    """The synthetic demo CT in HU (``relsegcore.demo``, seed 0; 256x256x80): in every checkout, no data needed."""
    from relsegcore.demo import make_demo_ct

    return make_demo_ct(seed=0).image


@pytest.fixture(params=["demo", "lung1"])
def ct_volume(request, mrml, demo_ct):
    """A chest CT in HU as a volume node: the synthetic demo CT always, the real lung1 CT where ../shared/data is."""
    if request.param == "lung1":
        return request.getfixturevalue("lung_ct")
    return volume_from_image(demo_ct, "demo")


@pytest.fixture(scope="session")
def test_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised model saved like a shipped one (card, SHA-256): fast on 2 CPU cores.

    The pipeline, card checks and weights loading are all real; only the weights are random.
    """
    import torch

    from relsegcore import zoo
    from relsegcore.models import DualEncoderUNet, NetworkConfig

    torch.manual_seed(0)
    config = NetworkConfig(dims=2, num_classes=2, base_channels=4, depth=3)
    card = zoo.ModelCard(name="tiny-slicer-test", version="0.0.1", description="random weights, for tests", file="",
                         sha256="", architecture={}, classes=["background", "infection"],
                         preprocessing={"input_size": 32, "window": [-1250, 250]})
    return zoo.save_model(DualEncoderUNet(config), card, tmp_path_factory.mktemp("model")).with_suffix(".json")


@pytest.fixture(scope="session")
def shipped_model(test_model) -> Path:
    """The shipped default model (Resources/Models) when the checkout has it, else the tiny one."""
    from relsegcore import zoo

    shipped = zoo.CHECKOUT_MODELS_DIR / f"{zoo.DEFAULT_MODEL}.json"
    return shipped if shipped.is_file() else test_model
