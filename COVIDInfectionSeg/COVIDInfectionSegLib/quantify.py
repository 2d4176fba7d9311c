"""Lung and infection volumes, percentages of opacity (PO) and of high opacity (PHO), as a table node.

Numbers are measured on the segmentation node itself (not copied from the report), so
they follow the radiologist's edits; on an unedited result they equal the report. PO is
the union of the infection segments over the lung; PHO the part of that union at or above
the high-opacity threshold in the CT's own HU (``relsegcore.opacity``), so that an edit of
either class segment, or a voxel moved from one to the other, is measured as the CT shows it.
"""

from __future__ import annotations

import math

import numpy as np
import slicer
import vtk

from .results import LUNG_SEGMENT_NAMES, segment_mask, stored_report

REGION_NAMES = ("Left lung", "Right lung", "Both lungs")
COLUMNS = ("Region", "Lung volume (mL)", "Infection volume (mL)", "Opacity PO (%)", "High opacity PHO (%)")
Row = tuple[str, float, float, float, float]


def _segment_masks(segmentation_node, reference_volume) -> dict[str, np.ndarray]:
    """Boolean mask of every segment on the reference volume's grid, by segment name."""
    segmentation = segmentation_node.GetSegmentation()
    masks = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        name = segmentation.GetSegment(segment_id).GetName()
        masks[name] = segment_mask(segmentation_node, segment_id, reference_volume)
    return masks


def high_opacity_threshold(segmentation_node, high_opacity_hu: float | None = None) -> float:
    """The PHO threshold: the one given, else the one the stored result was split at, else relsegcore's default."""
    if high_opacity_hu is not None:
        return float(high_opacity_hu)
    from relsegcore.opacity import HIGH_OPACITY_HU

    return float((stored_report(segmentation_node) or {}).get("high_opacity_hu", HIGH_OPACITY_HU))


def measure(segmentation_node, reference_volume, high_opacity_hu: float | None = None) -> dict:
    """Volumes (mL), PO and PHO (%) in the report's layout: lungs, infection (with classes), percent_opacity,
    percent_high_opacity, high_opacity_hu. ``reference_volume`` is the CT: its voxels give the HU of PHO."""
    from relsegcore.opacity import high_opacity

    masks = _segment_masks(segmentation_node, reference_volume)
    missing = [name for name in LUNG_SEGMENT_NAMES.values() if name not in masks]
    if missing:
        raise ValueError(f"Segmentation {segmentation_node.GetName()!r} has no {' or '.join(missing)} segment.")
    voxel_ml = float(np.prod(reference_volume.GetSpacing())) / 1000.0
    left, right = masks["Left lung"], masks["Right lung"]
    class_masks = {name: mask for name, mask in masks.items() if name not in LUNG_SEGMENT_NAMES.values()}
    infection = np.zeros_like(left)
    for mask in class_masks.values():
        infection |= mask
    threshold = high_opacity_threshold(segmentation_node, high_opacity_hu)
    high = high_opacity(infection, slicer.util.arrayFromVolume(reference_volume), threshold)

    def per_lung(mask: np.ndarray) -> dict[str, float]:
        left_ml, right_ml = (mask & left).sum() * voxel_ml, (mask & right).sum() * voxel_ml
        return {"left_ml": left_ml, "right_ml": right_ml, "total_ml": left_ml + right_ml}

    lungs = per_lung(left | right)
    # As in relsegcore's report: infection counts inside the lungs; what lies outside is reported apart.
    infected = {
        **per_lung(infection),
        "outside_lungs_ml": (infection & ~(left | right)).sum() * voxel_ml,
        "classes": {name: per_lung(mask) for name, mask in class_masks.items()},
    }
    return {"lungs": lungs, "infection": infected, "percent_opacity": _percentages(infected, lungs),
            "percent_high_opacity": _percentages(per_lung(high), lungs), "high_opacity_hu": threshold}


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _percentages(part: dict[str, float], lungs: dict[str, float]) -> dict[str, float]:
    return {"left": _percent(part["left_ml"], lungs["left_ml"]), "right": _percent(part["right_ml"], lungs["right_ml"]),
            "overall": _percent(part["total_ml"], lungs["total_ml"])}


def table_rows(measurement: dict) -> list[Row]:
    """One row per region (lung volume, infection volume, PO, PHO), then, when the infection has several
    classes (ground-glass, consolidation), one row per class: its volume and its share of both lungs as PO."""
    lungs, infection = measurement["lungs"], measurement["infection"]
    opacity, high = measurement["percent_opacity"], measurement["percent_high_opacity"]
    rows = [
        (name, lungs[f"{key}_ml"], infection[f"{key}_ml"], opacity[side], high[side])
        for name, key, side in zip(REGION_NAMES, ("left", "right", "total"), ("left", "right", "overall"), strict=True)
    ]
    if len(infection["classes"]) > 1:
        rows += [(name, math.nan, volumes["total_ml"], _percent(volumes["total_ml"], lungs["total_ml"]), math.nan)
                 for name, volumes in infection["classes"].items()]
    return rows


def fill_table(table_node, measurement: dict) -> None:
    """Write ``table_rows`` into a table node, replacing its content (NaN where a number does not apply)."""
    table_node.RemoveAllColumns()
    table = table_node.GetTable()
    region = vtk.vtkStringArray()
    region.SetName(COLUMNS[0])
    table.AddColumn(region)
    for title in COLUMNS[1:]:
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        table.AddColumn(column)
    rows = table_rows(measurement)
    table.SetNumberOfRows(len(rows))
    for row_index, row in enumerate(rows):
        table.SetValue(row_index, 0, vtk.vtkVariant(row[0]))
        for column_index, value in enumerate(row[1:], start=1):
            table.SetValue(row_index, column_index, vtk.vtkVariant(float(value)))
    table.Modified()
    table_node.Modified()
