"""Learn from corrections: store the radiologist's corrected infection for fine-tuning (issue 5).

The corrected labelmap is read from the edited segments; the model's original prediction is
the one this module wrote into the node, so the store can measure what was changed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import sitk_image_from_volume
from .results import infection_class_names, original_infection, segment_mask, stored_report


class CorrectionError(RuntimeError):
    """The segmentation cannot be saved as a correction (not produced by this module, or not in memory)."""


def corrected_infection(segmentation_node, volume_node, class_names: list[str]) -> np.ndarray:
    """The edited infection segments as one labelmap (class i -> label i) on the volume's grid."""
    segmentation = segmentation_node.GetSegmentation()
    labels = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), dtype=np.uint8)
    for label, name in enumerate(class_names, start=1):
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not segment_id:
            continue  # the user deleted the segment: no voxels of that class
        labels[segment_mask(segmentation_node, segment_id, volume_node)] = label
    return labels


def case_id_for(volume_node) -> str:
    """A stable case identifier: the DICOM series UID when the CT came from DICOM, else its name."""
    uid = volume_node.GetAttribute("DICOM.instanceUIDs")
    name = uid.split()[0] if uid else volume_node.GetName()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "case"


def _label_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def save_correction(volume_node, segmentation_node, store_dir: str | Path, case_id: str | None = None):
    """Store CT, corrected and original infection and the model card in a ``CorrectionStore``; return its record."""
    class_names = infection_class_names(segmentation_node)
    original = original_infection(segmentation_node)
    report = stored_report(segmentation_node)
    if not class_names or report is None:
        raise CorrectionError("This segmentation was not produced by COVIDInfectionSeg; segment the CT first.")
    if original is None:
        raise CorrectionError("The model's original result is no longer in memory; segment the CT again first.")
    from relsegcore.corrections import CorrectionStore

    ct = sitk_image_from_volume(volume_node)
    corrected = corrected_infection(segmentation_node, volume_node, class_names)
    model = dict(report.get("model") or {"name": "unknown"})
    model["classes"] = class_names
    return CorrectionStore(store_dir).save(
        case_id or case_id_for(volume_node), ct, _label_image(corrected, ct), _label_image(original, ct), model
    )


def start_fine_tuning(model: str, store_dir: str | Path, device: str = "auto", iterations: int | None = None):
    """Fine-tune ``model`` on the saved corrections in a separate process (``relseg finetune``).

    The new version goes into the model registry and becomes the default only when it is not
    worse on held-out corrections; the command's last output line says which (the panel shows it).
    """
    from .process import CommandProcess, python_executable

    command = [python_executable(), "-m", "relsegcore.cli", "finetune", "--model", model, "--corrections",
               str(store_dir), "--register", "--make-default", "--device", device, "--progress", "lines"]
    command += ["--iterations", str(iterations)] if iterations else []
    process = CommandProcess(command)
    process.start()
    return process
