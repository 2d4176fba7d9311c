"""The module's self-test body (``COVIDInfectionSegLib.selftest``), run against slicer-core's real scene.

Inside Slicer, ``COVIDInfectionSegTest.runTest`` runs these same steps with the installed
default model; here they run with a tiny random model (the lung checks do not depend on the
model, and it keeps the steps fast), so a broken self-test is caught without the Slicer application.
"""

from __future__ import annotations

import pytest

from COVIDInfectionSegLib import InfectionSegmentationLogic, selftest


@pytest.mark.parametrize("step", selftest.STEPS, ids=lambda step: step.__name__)
def test_self_test_step_passes(mrml, test_model, step):
    step(InfectionSegmentationLogic(), model=str(test_model))


def test_self_test_fails_on_a_wrong_result(mrml, test_model, monkeypatch):
    """The checks can fail: a segmentation whose left lung is emptied is reported by name."""
    import slicer

    original = InfectionSegmentationLogic.segment

    def segment_and_damage(self, *args, **kwargs):
        node = original(self, *args, **kwargs)
        segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Left lung")
        volume = args[0]
        empty = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) * 0
        slicer.util.updateSegmentBinaryLabelmapFromArray(empty, node, segment_id, volume)
        return node

    monkeypatch.setattr(InfectionSegmentationLogic, "segment", segment_and_damage)
    with pytest.raises(AssertionError, match="Left lung Dice"):
        selftest.check_segment_demo_ct(InfectionSegmentationLogic(), model=str(test_model))


def test_self_test_is_what_the_module_runs():
    """The module's ScriptedLoadableModuleTest calls every step of ``selftest.STEPS`` (read from its source)."""
    from conftest import REPO

    source = (REPO / "COVIDInfectionSeg" / "COVIDInfectionSeg.py").read_text()
    assert "for step in selftest.STEPS:" in source
    assert "step(COVIDInfectionSegLogic())" in source
