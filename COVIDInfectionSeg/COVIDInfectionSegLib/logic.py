"""The module's scripting API: ``InfectionSegmentationLogic`` (Qt-free, uses ``slicer.mrmlScene``).

One-liner from Slicer's Python console::

    seg = COVIDInfectionSegLib.InfectionSegmentationLogic().segment(getNode("CT"))
"""

from __future__ import annotations

from collections.abc import Callable

import slicer

from . import models
from .geometry import array_on_volume_grid, sitk_image_from_volume
from .learning import save_correction
from .process import SegmentationProcess, new_segmentation_node
from .quantify import fill_table, measure
from .results import ResultArrays, SegmentationEditedError, check_overwrite_allowed, write_result
from .terms import load_into_slicer

ProgressLike = Callable[[float, str], None]


def _as_progress(progress):
    """Accept a relsegcore Progress, a ``callback(fraction, stage)`` or None."""
    if progress is None or hasattr(progress, "update"):
        return progress
    from relsegcore.progress import Progress

    return Progress(callback=progress)


class InfectionSegmentationLogic:
    """Segment lungs and infection of a CT volume node into an editable segmentation; quantify it."""

    def __init__(self) -> None:
        models.configure_model_search()

    def segment(
        self,
        inputVolumeNode,
        outputSegmentationNode=None,
        model: str | None = None,
        device: str = "auto",
        tta: bool = False,
        progress=None,
        overwrite: bool = False,
        show3D: bool = True,
    ):
        """Blocking segmentation (scripting, tests): returns the segmentation node holding the result.

        An ``outputSegmentationNode`` the user edited is only replaced with ``overwrite=True``.
        """
        if outputSegmentationNode is not None:
            check_overwrite_allowed(outputSegmentationNode, overwrite)
        from relsegcore import pipeline

        result = pipeline.segment(
            sitk_image_from_volume(inputVolumeNode), model=model or models.default_model(), device=device, tta=tta,
            progress=_as_progress(progress),
        )
        arrays = ResultArrays(
            lungs=array_on_volume_grid(result.lungs, inputVolumeNode),
            infection=array_on_volume_grid(result.infection, inputVolumeNode),
            class_names=list(result.class_names),
            report=result.report,
        )
        return self.show_result(inputVolumeNode, arrays, outputSegmentationNode, overwrite, show3D)

    def show_result(self, inputVolumeNode, arrays: ResultArrays, outputSegmentationNode=None,
                    overwrite: bool = False, show3D: bool = True):
        """Write a result into ``outputSegmentationNode`` (a new node when None); the scene is unchanged on error."""
        node = outputSegmentationNode or new_segmentation_node(inputVolumeNode)
        try:
            load_into_slicer()
            write_result(node, inputVolumeNode, arrays, overwrite=overwrite, show_3d=show3D)
        except Exception:
            if outputSegmentationNode is None:
                slicer.mrmlScene.RemoveNode(node)
            raise
        return node

    def start_segmentation(
        self, inputVolumeNode, outputSegmentationNode=None, model: str | None = None, device: str = "auto",
        tta: bool = False, overwrite: bool = False,
    ) -> SegmentationProcess:
        """Non-blocking segmentation in a separate process; poll the returned process from a timer."""
        process = SegmentationProcess(inputVolumeNode, outputSegmentationNode, model or models.default_model(),
                                      device, tta, overwrite)
        process.start()
        return process

    def quantify(self, segmentationNode, inputVolumeNode, tableNode=None, highOpacityHU: float | None = None):
        """Lung and infection volumes (mL), PO and PHO (%) per lung and per infection class, measured on the
        (possibly edited) segments and the CT's HU, as a table node. ``highOpacityHU`` None: the threshold
        the result was made with (-200 HU unless changed)."""
        measurement = measure(segmentationNode, inputVolumeNode, highOpacityHU)
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(f"{segmentationNode.GetName()} volumes")
            )
        fill_table(tableNode, measurement)
        return tableNode

    def measure(self, segmentationNode, inputVolumeNode, highOpacityHU: float | None = None) -> dict:
        """The numbers behind ``quantify`` as a dict in the report's layout."""
        return measure(segmentationNode, inputVolumeNode, highOpacityHU)

    def save_correction(self, volumeNode, segmentationNode, store_dir, case_id: str | None = None):
        """Keep the radiologist's corrected infection (with the model's original) for fine-tuning."""
        return save_correction(volumeNode, segmentationNode, store_dir, case_id)

    def isEdited(self, segmentationNode) -> bool:
        """True when re-segmenting into this node would discard the user's segments or edits."""
        try:
            check_overwrite_allowed(segmentationNode, overwrite=False)
        except SegmentationEditedError:
            return True
        return False

    @staticmethod
    def resolveDevice(device: str) -> str:
        """``auto`` -> ``cuda`` or ``cpu``, as relsegcore will choose it (for the run-time estimate)."""
        from relsegcore.device import select_device

        return select_device(device).type
