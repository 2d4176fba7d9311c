"""Render the README/Extension-catalog screenshots offscreen (not part of the test suite).

    QT_QPA_PLATFORM=offscreen VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow \
        python Testing/make_screenshots.py [--ct PATH] [--model NAME] [--slice-offset MM]

1. ``Resources/Screenshots/slice_view.png``: a real CT in an axial slice view with the result
   overlay, rendered by Slicer's own vtkMRMLSliceLogic and segmentations displayable manager
   (slicer-core). The segmentation comes from the module's logic (``segment`` with the model).
2. ``Resources/Screenshots/panel.png``: the module panel (.ui loaded in PySide6 with stand-ins
   for Slicer widgets), filled with that run's numbers.

Needs an OpenGL context: Mesa EGL (Debian packages libegl1 libegl-mesa0 libgl1-mesa-dri).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "Testing" / "tests" / "slicer_extension"), str(REPO / "COVIDInfectionSeg")]
SCREENSHOTS = REPO / "Resources" / "Screenshots"


def render_slice_view(volume, segmentation, env, path: Path, offset_mm: float | None, size: int = 640) -> None:
    """Axial slice of ``volume`` with ``segmentation`` overlaid, as Slicer's Red view draws it, to PNG."""
    import slicer
    import vtk

    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(env.app_logic)
    slice_logic.SetMRMLScene(env.scene)
    slice_node = slice_logic.AddSliceNode("Red")
    slice_node.SetOrientationToAxial()
    slice_node.SetDimensions(size, size, 1)
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(volume.GetID())
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1500, -600)  # lung window
    slice_logic.FitSliceToAll()
    if offset_mm is not None:
        slice_logic.SetSliceOffset(offset_mm)

    render_window = vtk.vtkRenderWindow()
    render_window.SetOffScreenRendering(1)
    render_window.SetSize(size, size)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    render_window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # displayable managers attach their widgets to it
    interactor.SetRenderWindow(render_window)
    image_mapper = vtk.vtkImageMapper()
    image_mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    image_mapper.SetColorWindow(255)
    image_mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(image_mapper)
    renderer.AddViewProp(image_actor)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(env.app_logic)
    if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
        factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
    managers = factory.InstantiateDisplayableManagers(renderer)
    managers.SetMRMLDisplayableNode(slice_node)
    segmentation.GetDisplayNode().SetVisibility(True)
    render_window.Render()

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def covid_slices_volume(env, data_dir: Path):
    """A small volume of real COVID-19 CT slices in HU (covid-hu-slices, coronacases_001), as a volume node."""
    import numpy as np
    import slicer

    files = sorted(data_dir.glob("coronacases_001_slice*.npz"))
    array = np.stack([np.load(path)["image"] for path in files])  # anterior up, patient's left on the right
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "coronacases_001")
    slicer.util.updateVolumeFromArray(volume, array[::-1].copy())  # stored inferior to superior
    volume.SetSpacing(0.7, 0.7, 5.0)  # pixel spacing is not recorded in these slices; about 0.7 mm
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)  # LPS rows/columns, as in DICOM
    return volume


def collapse_sections(panel) -> None:
    """Stand-in collapsible buttons: hide the content of sections marked collapsed, as ctk draws them."""
    from qt_panel import CollapsibleButton

    for section in panel.findChildren(CollapsibleButton):
        if section.property("collapsed"):
            for child in section.findChildren(type(panel)):
                child.hide()
            section.setMaximumHeight(28)


def render_panel(path: Path, volume_name: str, segmentation_name: str, measurement: dict, report: dict) -> None:
    """The module panel after a run, with this run's numbers, to PNG."""
    from PySide6 import QtWidgets
    from qt_panel import load_panel, named_children

    from COVIDInfectionSegLib.panel import result_rows

    panel = load_panel()
    ui = named_children(panel)
    ui["inputVolumeSelector"].addItem(volume_name)
    model = report.get("model", {})
    from COVIDInfectionSegLib import models

    labels = {choice.name: choice.label for choice in models.model_choices()}
    ui["modelSelector"].addItem(labels.get(model.get("name"), f"{model.get('name')} {model.get('version')}"))
    for label in ("Auto", "GPU (none found)", "CPU"):
        ui["deviceSelector"].addItem(label)
    ui["outputSegmentationSelector"].addItem(segmentation_name)
    ui["progressBar"].setValue(100)
    ui["stageLabel"].setText(f"Done in {report.get('timing_s', {}).get('total', 0):.0f} s on {report.get('device')}.")
    table = ui["resultsTable"]
    rows = result_rows(measurement)  # what the module's widget shows
    table.setRowCount(len(rows))
    table.setVerticalHeaderLabels([name for name, _ in rows])
    for row, (_, cells) in enumerate(rows):
        for column, text in enumerate(cells):
            table.setItem(row, column, QtWidgets.QTableWidgetItem(text))
    table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    table.setFixedHeight(table.horizontalHeader().height() + len(rows) * table.rowHeight(0) + 4)
    sha = model.get("sha256", "")[:12]
    ui["modelInfoLabel"].setText(f"Model {model.get('name')} {model.get('version')} (sha256 {sha}...)")
    ui["correctionsDirEdit"].setText("~/.config/NA-MIC/COVIDInfectionSeg/Corrections")
    collapse_sections(panel)
    panel.resize(540, 610)
    panel.show()
    QtWidgets.QApplication.processEvents()
    panel.grab().save(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, help="CT file (default: the real COVID-19 HU slices in ../shared/data)")
    parser.add_argument("--model", default=None, help="model name or card path (default: the shipped default)")
    parser.add_argument("--slice-offset", type=float, default=None, help="axial slice position in mm (RAS S)")
    args = parser.parse_args(argv)

    import headless_slicer
    from headless_slicer import load_volume

    from COVIDInfectionSegLib import InfectionSegmentationLogic, stored_report

    env = headless_slicer.bootstrap()
    shared = REPO.parent / "shared" / "data"
    volume = load_volume(args.ct) if args.ct else covid_slices_volume(env, shared / "covid-hu-slices")
    logic = InfectionSegmentationLogic()
    segmentation = logic.segment(volume, model=args.model, device="cpu", show3D=False)
    report = stored_report(segmentation)
    measurement = logic.measure(segmentation, volume)
    print({key: report[key] for key in ("lungs", "percent_opacity", "percent_high_opacity", "model", "device")})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    render_slice_view(volume, segmentation, env, SCREENSHOTS / "slice_view.png", args.slice_offset)
    render_panel(SCREENSHOTS / "panel.png", volume.GetName(), segmentation.GetName(), measurement, report)
    print(f"wrote {SCREENSHOTS / 'slice_view.png'} and {SCREENSHOTS / 'panel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
