"""Load the module's .ui in PySide6 (offscreen) with stand-ins for the Slicer and CTK widget classes.

Used by test_ui.py and by Testing/make_screenshots.py. PythonQt widget code cannot run here;
the stand-ins give the structure and a faithful-enough look for the panel screenshot.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

UI_FILE = Path(__file__).resolve().parents[3] / "COVIDInfectionSeg" / "Resources" / "UI" / "COVIDInfectionSeg.ui"


class CollapsibleButton(QtWidgets.QGroupBox):
    """ctkCollapsibleButton: a titled section (its ``text`` arrives as a dynamic property)."""

    def apply_properties(self) -> None:
        collapsed = bool(self.property("collapsed"))
        self.setTitle(("▸ " if collapsed else "▾ ") + str(self.property("text") or ""))


class NodeComboBox(QtWidgets.QComboBox):
    """qMRMLNodeComboBox: shows the node it would list, or its ``noneDisplay`` text."""


class PathLineEdit(QtWidgets.QLineEdit):
    """ctkPathLineEdit."""


STAND_INS = {
    "qMRMLWidget": QtWidgets.QWidget,
    "qMRMLNodeComboBox": NodeComboBox,
    "ctkCollapsibleButton": CollapsibleButton,
    "ctkPathLineEdit": PathLineEdit,
}


class SlicerUiLoader(QUiLoader):
    def createWidget(self, class_name, parent=None, name=""):  # noqa: N802 (Qt API)
        stand_in = STAND_INS.get(class_name)
        if stand_in is None:
            return super().createWidget(class_name, parent, name)
        widget = stand_in(parent)
        widget.setObjectName(name)
        widget.setProperty("slicerClass", class_name)
        return widget


def application() -> QtWidgets.QApplication:
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load_panel(ui_file: Path = UI_FILE) -> QtWidgets.QWidget:
    """The panel widget; raises if Qt cannot parse the file."""
    application()
    loader = SlicerUiLoader()
    handle = QtCore.QFile(str(ui_file))
    if not handle.open(QtCore.QFile.ReadOnly):
        raise OSError(f"cannot open {ui_file}")
    try:
        widget = loader.load(handle)
    finally:
        handle.close()
    if widget is None:
        raise ValueError(f"Qt could not load {ui_file}: {loader.errorString()}")
    for section in widget.findChildren(CollapsibleButton):
        section.apply_properties()
    return widget


def named_children(widget: QtWidgets.QWidget) -> dict[str, QtCore.QObject]:
    """Every named child, as ``slicer.util.childWidgetVariables`` exposes them on ``self.ui``."""
    return {child.objectName(): child for child in widget.findChildren(QtCore.QObject) if child.objectName()}
