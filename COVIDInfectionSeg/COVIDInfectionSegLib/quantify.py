"""Lung and infection volumes, percentage of opacity per lung, as a table node.

Numbers are measured on the segmentation node itself (not copied from the report), so
they follow the radiologist's edits; on an unedited result they equal the report.
"""

from __future__ import annotations

import numpy as np
import vtk

from .results import LUNG_SEGMENT_NAMES, segment_mask

REGION_NAMES = ("Left lung", "Right lung", "Both lungs")
COLUMNS = ("Region", "Lung volume (mL)", "Infection volume (mL)", "Opacity (%)")


def _segment_masks(segmentation_node, reference_volume) -> dict[str, np.ndarray]:
    """Boolean mask of every segment on the reference volume's grid, by segment name."""
    segmentation = segmentation_node.GetSegmentation()
    masks = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        name = segmentation.GetSegment(segment_id).GetName()
        masks[name] = segment_mask(segmentation_node, segment_id, reference_volume)
    return masks


def measure(segmentation_node, reference_volume) -> dict:
    """Volumes (mL) and opacity (%) in the report's layout: lungs, infection (with classes), percent_opacity."""
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
    lungs = {
        "left_ml": left.sum() * voxel_ml,
        "right_ml": right.sum() * voxel_ml,
        "total_ml": (left.sum() + right.sum()) * voxel_ml,
    }

    def per_lung(mask: np.ndarray) -> dict[str, float]:
        left_ml, right_ml = (mask & left).sum() * voxel_ml, (mask & right).sum() * voxel_ml
        return {"left_ml": left_ml, "right_ml": right_ml, "total_ml": left_ml + right_ml}

    # As in relsegcore's report: infection counts inside the lungs; what lies outside is reported apart.
    infected = {
        **per_lung(infection),
        "outside_lungs_ml": (infection & ~(left | right)).sum() * voxel_ml,
        "classes": {name: per_lung(mask) for name, mask in class_masks.items()},
    }

    def percent(part: float, whole: float) -> float:
        return 100.0 * part / whole if whole > 0 else 0.0

    opacity = {
        "left": percent(infected["left_ml"], lungs["left_ml"]),
        "right": percent(infected["right_ml"], lungs["right_ml"]),
        "overall": percent(infected["total_ml"], lungs["total_ml"]),
    }
    return {"lungs": lungs, "infection": infected, "percent_opacity": opacity}


def table_rows(measurement: dict) -> list[tuple[str, float, float, float]]:
    """One row per region: lung volume, infection volume, opacity."""
    lungs, infection, opacity = measurement["lungs"], measurement["infection"], measurement["percent_opacity"]
    return [
        ("Left lung", lungs["left_ml"], infection["left_ml"], opacity["left"]),
        ("Right lung", lungs["right_ml"], infection["right_ml"], opacity["right"]),
        ("Both lungs", lungs["total_ml"], infection["total_ml"], opacity["overall"]),
    ]


def fill_table(table_node, measurement: dict) -> None:
    """Write the rows (and one row per infection class) into a table node, replacing its content."""
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
    if len(measurement["infection"]["classes"]) > 1:
        rows += [(name, float("nan"), volumes["total_ml"], float("nan"))
                 for name, volumes in measurement["infection"]["classes"].items()]
    table.SetNumberOfRows(len(rows))
    for row_index, row in enumerate(rows):
        table.SetValue(row_index, 0, vtk.vtkVariant(row[0]))
        for column_index, value in enumerate(row[1:], start=1):
            table.SetValue(row_index, column_index, vtk.vtkVariant(float(value)))
    table.Modified()
    table_node.Modified()
