"""Put a segmentation result into the scene: one segmentation node the radiologist can edit.

Lungs and infection are imported as two labelmap layers so that each lung segment stays
the whole lung while overlapping the infection. A fingerprint of the written labelmaps
is stored on the node; a later run compares it to refuse overwriting the user's edits.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .terms import apply_definition, definitions_by_label

FINGERPRINT_ATTRIBUTE = "COVIDInfectionSeg.Fingerprint"
REPORT_ATTRIBUTE = "COVIDInfectionSeg.Report"
CLASS_NAMES_ATTRIBUTE = "COVIDInfectionSeg.ClassNames"
LUNG_SEGMENT_NAMES = {1: "Left lung", 2: "Right lung"}


# The model's own infection labelmap per segmentation node ID, zlib-compressed (mostly zeros):
# "Save as correction" stores it beside the radiologist's edit. Kept for this Slicer session.
_ORIGINAL_INFECTION: dict[str, tuple[bytes, tuple[int, ...]]] = {}


class SegmentationEditedError(RuntimeError):
    """The output segmentation holds segments the user made or edited; overwriting needs consent."""


@dataclass
class ResultArrays:
    """A result on the input volume's voxel grid, arrays in (k, j, i) order as ``arrayFromVolume``."""

    lungs: np.ndarray
    infection: np.ndarray
    class_names: list[str]
    report: dict


def segmentation_fingerprint(segmentation_node) -> str:
    """Hash of segment names, label values and labelmap voxels: changes with any edit."""
    segmentation = segmentation_node.GetSegmentation()
    digest = hashlib.sha256()
    layers_seen: set[str] = set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        digest.update(f"{segment.GetName()}|{segment.GetLabelValue()};".encode())
        labelmap = segment.GetRepresentation("Binary labelmap")
        layer_address = labelmap.GetAddressAsString("vtkObject") if labelmap is not None else ""
        if labelmap is None or layer_address in layers_seen:
            continue
        layers_seen.add(layer_address)
        digest.update(np.array(labelmap.GetExtent(), dtype=np.int64).tobytes())
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is not None:
            digest.update(np.ascontiguousarray(numpy_support.vtk_to_numpy(scalars)).tobytes())
    return digest.hexdigest()


def check_overwrite_allowed(segmentation_node, overwrite: bool) -> None:
    """Raise ``SegmentationEditedError`` if the node holds segments that are not our unedited result."""
    if overwrite or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return
    stored = segmentation_node.GetAttribute(FINGERPRINT_ATTRIBUTE)
    if stored is None:
        raise SegmentationEditedError(
            f"Segmentation {segmentation_node.GetName()!r} already holds segments that this module did not create; "
            "choose another output or confirm overwriting."
        )
    if stored != segmentation_fingerprint(segmentation_node):
        raise SegmentationEditedError(
            f"Segmentation {segmentation_node.GetName()!r} was edited since it was computed; "
            "choose another output or confirm overwriting the edits."
        )


def _import_labels(segmentation_node, reference_volume, array: np.ndarray, names: dict[int, str]) -> dict[str, str]:
    """Import one multi-label array as a labelmap layer; return segment name -> segment ID."""
    volumes_logic = slicer.modules.volumes.logic()
    label_node = volumes_logic.CreateAndAddLabelVolume(slicer.mrmlScene, reference_volume, "COVIDInfectionSeg_tmp")
    try:
        slicer.util.updateVolumeFromArray(label_node, np.ascontiguousarray(array, dtype=np.uint8))
        segmentation = segmentation_node.GetSegmentation()
        before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label_node, segmentation_node):
            raise RuntimeError("Slicer could not import the result labelmap into the segmentation.")
        new_ids = [
            segmentation.GetNthSegmentID(i)
            for i in range(segmentation.GetNumberOfSegments())
            if segmentation.GetNthSegmentID(i) not in before
        ]
    finally:
        remove_with_display_nodes(label_node)
    by_name = {}
    for segment_id in new_ids:
        segment = segmentation.GetSegment(segment_id)
        label = segment.GetLabelValue()
        if label not in names:  # a label value the model should not produce: drop it
            segmentation.RemoveSegment(segment_id)
            continue
        segment.SetName(names[label])
        by_name[names[label]] = segment_id
    # Labels absent from the image still get an (empty) segment, so the user can paint them.
    for name in names.values():
        if name not in by_name:
            by_name[name] = segmentation.AddEmptySegment("", name)
    return by_name


def remove_with_display_nodes(node) -> None:
    """Remove a temporary node and its display nodes (removing the node alone leaves them in the scene)."""
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    slicer.mrmlScene.RemoveNode(node)
    for display_node in display_nodes:
        if display_node is not None:
            slicer.mrmlScene.RemoveNode(display_node)


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """A segment as a (k, j, i) boolean array on the reference volume's grid, leaving no node behind."""
    segment_ids = vtk.vtkStringArray()
    segment_ids.InsertNextValue(segment_id)
    label_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "COVIDInfectionSeg_tmp")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, label_node, reference_volume
        ):
            raise RuntimeError(f"Could not export segment {segment_id!r} on the volume's grid.")
        return slicer.util.arrayFromVolume(label_node) > 0
    finally:
        remove_with_display_nodes(label_node)


def _place_under_input_study(segmentation_node, input_volume) -> None:
    """Put the segmentation beside the CT in the subject hierarchy (DICOM SEG export needs the study)."""
    sh_node = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if sh_node is None:
        return
    volume_item = sh_node.GetItemByDataNode(input_volume)
    parent = sh_node.GetItemParent(volume_item) if volume_item else 0
    if not parent or parent == sh_node.GetSceneItemID():
        return
    segmentation_item = sh_node.GetItemByDataNode(segmentation_node)
    if segmentation_item:
        sh_node.SetItemParent(segmentation_item, parent)
    else:  # Slicer's GUI adds items for new nodes; without it, add one
        sh_node.CreateItem(parent, segmentation_node)


def _configure_display(segmentation_node, segment_ids: dict[str, str], show_3d: bool) -> None:
    """Infection filled in 2D and solid in 3D; lungs as outlines and a faint 3D shell."""
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    for name, segment_id in segment_ids.items():
        is_lung = name in LUNG_SEGMENT_NAMES.values()
        display.SetSegmentVisibility(segment_id, True)
        display.SetSegmentOpacity2DFill(segment_id, 0.1 if is_lung else 0.6)
        display.SetSegmentOpacity3D(segment_id, 0.15 if is_lung else 1.0)
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()


def write_result(
    segmentation_node, input_volume, result: ResultArrays, overwrite: bool = False, show_3d: bool = True
) -> None:
    """Replace the node's segments by Left lung, Right lung and the infection classes of ``result``."""
    check_overwrite_allowed(segmentation_node, overwrite)
    expected = tuple(reversed(input_volume.GetImageData().GetDimensions()))
    for array in (result.lungs, result.infection):
        if array.shape != expected:
            raise ValueError(f"Result shape {array.shape} differs from the input volume's {expected}.")
    lung_definitions, infection_definitions = definitions_by_label(result.class_names)
    # Segment names, colours and codes all come from relsegcore.terminology (as in its .seg.nrrd).
    lung_names = {label: definition.name for label, definition in lung_definitions.items()}
    infection_names = {label: definition.name for label, definition in infection_definitions.items()}
    definitions = {definition.name: definition for definition in [*lung_definitions.values(),
                                                                   *infection_definitions.values()]}
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
        segment_ids = _import_labels(segmentation_node, input_volume, result.lungs, lung_names)
        segment_ids.update(_import_labels(segmentation_node, input_volume, result.infection, infection_names))
        segmentation = segmentation_node.GetSegmentation()
        for name, segment_id in segment_ids.items():
            apply_definition(segmentation.GetSegment(segment_id), definitions[name])
        segmentation_node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report))
        segmentation_node.SetAttribute(CLASS_NAMES_ATTRIBUTE, json.dumps(list(infection_names.values())))
        segmentation_node.SetAttribute(FINGERPRINT_ATTRIBUTE, segmentation_fingerprint(segmentation_node))
    finally:
        segmentation_node.EndModify(was_modifying)
    infection = np.ascontiguousarray(result.infection, dtype=np.uint8)
    _ORIGINAL_INFECTION[segmentation_node.GetID()] = (zlib.compress(infection.tobytes(), 1), infection.shape)
    _configure_display(segmentation_node, segment_ids, show_3d)
    _place_under_input_study(segmentation_node, input_volume)


def original_infection(segmentation_node) -> np.ndarray | None:
    """The model's infection labelmap as first written into this node (None after a Slicer restart)."""
    stored = _ORIGINAL_INFECTION.get(segmentation_node.GetID())
    if stored is None:
        return None
    data, shape = stored
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)


def infection_class_names(segmentation_node) -> list[str]:
    """The infection segments' names in label order (label 1 first), as written by ``write_result``."""
    text = segmentation_node.GetAttribute(CLASS_NAMES_ATTRIBUTE)
    return json.loads(text) if text else []


def stored_report(segmentation_node) -> dict | None:
    """The report saved on the node by ``write_result`` (model, device), or None."""
    text = segmentation_node.GetAttribute(REPORT_ATTRIBUTE)
    return json.loads(text) if text else None
