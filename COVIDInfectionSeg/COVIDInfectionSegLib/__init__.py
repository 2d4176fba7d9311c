"""Qt-free logic of the COVIDInfectionSeg Slicer module (imports numpy, vtk, slicer; relsegcore lazily).

Everything here runs inside Slicer and, for tests, against slicer-core's real MRML scene.
"""

from .dependencies import DependencyError, ensure_dependencies, estimate_seconds, long_run_warning, missing_packages
from .geometry import GeometryError, sitk_image_from_volume, update_volume_from_sitk
from .logic import InfectionSegmentationLogic
from .process import SegmentationProcess
from .results import ResultArrays, SegmentationEditedError, segmentation_fingerprint, stored_report

__all__ = [
    "DependencyError",
    "GeometryError",
    "InfectionSegmentationLogic",
    "ResultArrays",
    "SegmentationEditedError",
    "SegmentationProcess",
    "ensure_dependencies",
    "estimate_seconds",
    "long_run_warning",
    "missing_packages",
    "segmentation_fingerprint",
    "sitk_image_from_volume",
    "stored_report",
    "update_volume_from_sitk",
]
