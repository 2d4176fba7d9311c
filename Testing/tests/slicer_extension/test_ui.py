"""The panel .ui: loads in Qt, names every widget the module's Python uses, binds the parameter node."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtUiTools")

from qt_panel import load_panel, named_children  # noqa: E402

MODULE_SCRIPT = Path(__file__).resolve().parents[3] / "COVIDInfectionSeg" / "COVIDInfectionSeg.py"


@pytest.fixture(scope="module")
def panel():
    return load_panel()


def test_every_ui_attribute_used_by_the_widget_exists(panel):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text()))
    assert len(used) > 15
    children = named_children(panel)
    assert sorted(used - children.keys()) == []


def test_widget_kinds_and_defaults(panel):
    children = named_children(panel)
    assert children["inputVolumeSelector"].property("slicerClass") == "qMRMLNodeComboBox"
    assert list(children["inputVolumeSelector"].property("nodeTypes")) == ["vtkMRMLScalarVolumeNode"]
    output = children["outputSegmentationSelector"]
    assert list(output.property("nodeTypes")) == ["vtkMRMLSegmentationNode"]
    assert output.property("noneEnabled") is True and output.property("noneDisplay") == "Create new segmentation"
    quality = children["qualitySelector"]
    assert [quality.itemText(i) for i in range(quality.count())] == ["Fast", "Accurate (test-time augmentation)"]
    assert children["cancelButton"].isEnabled() is False
    assert children["learnCollapsibleButton"].property("collapsed") is True
    for button in ("saveCorrectionButton", "fineTuneButton", "rollBackButton"):
        assert children[button].parent() is not None and children[button].text()


def parameter_node_fields() -> set[str]:
    tree = ast.parse(MODULE_SCRIPT.read_text())
    wrapper = next(node for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name == "COVIDInfectionSegParameterNode")
    return {statement.target.id for statement in wrapper.body if isinstance(statement, ast.AnnAssign)}


def test_parameter_names_in_the_ui_are_parameter_node_fields(panel):
    bound = {child.property("SlicerParameterName") for child in named_children(panel).values()
             if child.property("SlicerParameterName")}
    assert bound == parameter_node_fields() == {"inputVolume", "outputSegmentation"}
