"""First-use installation of PyTorch and relsegcore, with one confirmation.

Nothing is installed or downloaded at import time. PyTorch comes from the PyTorch
extension's ``PyTorchUtils`` when present (it picks the build matching the GPU driver),
otherwise from pip; relsegcore is installed from the copy shipped inside the extension
(``<module>/Resources/RelSegCore``, or ``RelSegCore`` beside the module in a source checkout).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
TORCH_REQUIREMENT = ">=2.1"


class DependencyError(RuntimeError):
    """A required Python package is missing and was not (or could not be) installed."""


def bundled_relsegcore_dir() -> Path | None:
    """The relsegcore source shipped with the extension (installed layout first, then the source checkout)."""
    for candidate in (MODULE_DIR / "Resources" / "RelSegCore", MODULE_DIR.parent / "RelSegCore"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def missing_packages(names: tuple[str, ...] = ("torch", "relsegcore")) -> list[str]:
    """Which of ``names`` cannot be imported in this Python."""
    importlib.invalidate_caches()
    return [name for name in names if importlib.util.find_spec(name) is None]


def install_torch() -> None:
    """CUDA-matched torch through PyTorchUtils when the PyTorch extension is installed, else pip."""
    try:
        import PyTorchUtils  # the PyTorch extension's module, only inside Slicer
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        return
    import slicer

    slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")


def install_relsegcore() -> None:
    """pip-install the relsegcore copy shipped with the extension (its other requirements come with it), with
    the ``fast`` extra: OpenVINO runs the network 1.7x faster than PyTorch on the CPU (``relsegcore.engines``)."""
    source = bundled_relsegcore_dir()
    if source is None:
        raise DependencyError(f"The extension's copy of relsegcore was not found next to {MODULE_DIR}.")
    import slicer

    slicer.util.pip_install([f"{source}[fast]"])


INSTALLERS: dict[str, Callable[[], None]] = {"torch": install_torch, "relsegcore": install_relsegcore}


def ensure_dependencies(
    confirm: Callable[[str], bool], installers: dict[str, Callable[[], None]] | None = None
) -> list[str]:
    """Install what is missing after one ``confirm(message)``; return what was installed (empty: nothing to do).

    torch is installed before relsegcore so that pip keeps the CUDA build PyTorchUtils chose.
    """
    installers = installers or INSTALLERS
    missing = missing_packages(tuple(installers))
    if not missing:
        return []
    message = (
        "COVIDInfectionSeg needs these Python packages, which are not installed yet: "
        f"{', '.join(missing)}. Install them now? This downloads several hundred MB once."
    )
    if not confirm(message):
        raise DependencyError(f"Segmentation needs {', '.join(missing)}; installation was declined.")
    for name in missing:
        try:
            installers[name]()
        except Exception as error:
            raise DependencyError(f"Installing {name} failed: {error}") from error
    still_missing = missing_packages(tuple(missing))
    if still_missing:
        names = ", ".join(still_missing)
        raise DependencyError(f"{names} still cannot be imported after installation; restart Slicer.")
    return missing


# Measured on the user's command, a real 512x512x300 chest CT (Testing/benchmarks/README.md): 2 CPU cores 14.0-14.5 s
# wall without the mirror, 20.4-21.5 s with it (sessions 20-21); one H200 12.0-13.2 s, mostly start-up (session 15).
SECONDS_PER_SLICE = {"cpu": 0.035, "cuda": 0.025}
TTA_FACTOR = 2  # the mirror doubles the network, the larger part of each slice's time
STARTUP_SECONDS = 5.0
LONG_RUN_SECONDS = 60.0


def estimate_seconds(num_slices: int, device_type: str = "cpu", tta: bool = False) -> float:
    """Rough run time: a fixed start-up plus a per-slice cost (test-time augmentation multiplies it)."""
    per_slice = SECONDS_PER_SLICE.get(device_type, SECONDS_PER_SLICE["cpu"]) * (TTA_FACTOR if tta else 1)
    return STARTUP_SECONDS + num_slices * per_slice


def long_run_warning(num_slices: int, device_type: str, tta: bool) -> str | None:
    """The message to show before a run expected to take over a minute, or None."""
    seconds = estimate_seconds(num_slices, device_type, tta)
    if seconds < LONG_RUN_SECONDS:
        return None
    where = "on the CPU" if device_type == "cpu" else f"on {device_type}"
    return (
        f"Segmenting {num_slices} slices {where}{' with test-time augmentation' if tta else ''} "
        f"will take about {seconds / 60:.0f} min. Continue?"
    )
