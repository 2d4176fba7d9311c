"""The module's self-test steps, Qt-free, so that one body of checks runs in two places.

Slicer's ``ScriptedLoadableModuleTest`` (``COVIDInfectionSegTest`` in the module file) calls
these inside a real Slicer; the pytest suite calls the same functions against slicer-core's
real MRML scene. Each step builds the synthetic demo CT (known lung and infection masks, from
``relsegcore.demo``) into a volume node and raises ``AssertionError`` naming what is wrong.
"""

from __future__ import annotations

import numpy as np
import slicer

from .geometry import array_on_volume_grid, update_volume_from_sitk
from .process import CANCELLED, SUCCEEDED
from .results import stored_report

LUNG_DICE_MIN = 0.95  # the demo CT's lungs are found with Dice 0.999 by relsegcore; 0.95 leaves room
VOLUME_TOLERANCE_ML = 0.5
PERCENT_TOLERANCE = 0.5  # points of PO / PHO
SEGMENT_NAMES = ("Left lung", "Right lung", "Ground-glass opacity", "Consolidation")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def demo_volume(name: str = "DemoCT"):
    """The synthetic demo CT (seed 0) as a scalar volume node, and its known lung labels (1 left, 2 right)."""
    from relsegcore.demo import make_demo_ct

    case = make_demo_ct(seed=0)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_volume_from_sitk(volume, case.image)
    return volume, array_on_volume_grid(case.lungs, volume)


def _segment_mask(segmentation, name: str, volume) -> np.ndarray:
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    _expect(bool(segment_id), f"no segment named {name!r}")
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0


def check_segment_demo_ct(logic, model: str | None = None, device: str = "cpu") -> None:
    """Blocking ``segment``: segment names, lungs against the known masks, infection inside the lungs,
    PHO and the table node equal to the pipeline's report."""
    from relsegcore.metrics import dice as dice_of

    volume, known_lungs = demo_volume()
    segmentation = logic.segment(volume, model=model, device=device)
    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    _expect(names == list(SEGMENT_NAMES), f"segments are {names}, not {list(SEGMENT_NAMES)}")
    lungs = np.zeros(known_lungs.shape, bool)
    for side, name in ((1, "Left lung"), (2, "Right lung")):
        found = _segment_mask(segmentation, name, volume)
        dice = dice_of(found, known_lungs == side)
        _expect(dice >= LUNG_DICE_MIN, f"{name} Dice {dice:.3f} against the demo's known lung < {LUNG_DICE_MIN}")
        lungs |= found
    for name in names[2:]:
        _expect(not (_segment_mask(segmentation, name, volume) & ~lungs).any(), f"{name} reaches outside the lungs")
    report = stored_report(segmentation)
    _expect(report is not None, "the segmentation node carries no report")
    measured = logic.measure(segmentation, volume)
    for key in ("left_ml", "right_ml", "total_ml"):
        _expect(abs(measured["lungs"][key] - report["lungs"][key]) <= VOLUME_TOLERANCE_ML,
                f"lungs {key}: measured {measured['lungs'][key]:.1f} mL, report {report['lungs'][key]:.1f} mL")
    for side, value in report["percent_high_opacity"].items():
        _expect(abs(measured["percent_high_opacity"][side] - (value or 0.0)) <= PERCENT_TOLERANCE,
                f"PHO {side}: measured {measured['percent_high_opacity'][side]:.2f} %, report {value} %")
    table = logic.quantify(segmentation, volume)
    _expect(table.GetNumberOfRows() == 5, f"the table has {table.GetNumberOfRows()} rows, not 5 "
            "(left, right, both lungs, ground-glass, consolidation)")
    column = slicer.util.arrayFromTableColumn(table, "Lung volume (mL)")
    _expect(abs(float(column[2]) - report["lungs"]["total_ml"]) <= VOLUME_TOLERANCE_ML,
            "the table's total lung volume differs from the report")


def check_background_matches_blocking(logic, model: str | None = None, device: str = "cpu",
                                      timeout_s: float = 600.0) -> None:
    """The separate-process path gives the same segmentation as the blocking path."""
    volume, _ = demo_volume()
    process = logic.start_segmentation(volume, model=model, device=device)
    state = process.wait(timeout_s=timeout_s)
    _expect(state == SUCCEEDED, f"the background segmentation {state}: {process.error}")
    background = logic.measure(process.output_segmentation, volume)
    blocking = logic.measure(logic.segment(volume, model=model, device=device), volume)
    for group in ("lungs", "infection"):
        difference = abs(background[group]["total_ml"] - blocking[group]["total_ml"])
        _expect(difference <= 0.01, f"{group}: background and blocking results differ by {difference:.3f} mL")


def check_cancel_leaves_scene_unchanged(logic, model: str | None = None, device: str = "cpu") -> None:
    """Cancel kills the process and adds no node to the scene."""
    volume, _ = demo_volume()
    before = slicer.mrmlScene.GetNumberOfNodes()
    process = logic.start_segmentation(volume, model=model, device=device)
    process.cancel()
    _expect(process.state == CANCELLED, f"after cancel the process is {process.state}")
    _expect(slicer.mrmlScene.GetNumberOfNodes() == before, "cancel left nodes in the scene")


STEPS = (check_segment_demo_ct, check_background_matches_blocking, check_cancel_leaves_scene_unchanged)
