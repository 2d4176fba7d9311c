"""Stand up Slicer's real MRML scene and module logics from slicer-core, without the application.

Used by the slicer tests' conftest and by ``Testing/make_screenshots.py``: after
``bootstrap()``, ``slicer.mrmlScene`` and ``slicer.modules.{volumes,segmentations,...}.logic()``
work as inside Slicer, so the module's Qt-free logic runs unchanged.
"""

from __future__ import annotations

import types
from pathlib import Path

import slicer


class _ModuleEntry:
    """What ``slicer.modules.<name>`` offers that the logic uses: ``logic()``."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def bootstrap() -> types.SimpleNamespace:
    """Create a scene with application, colour, volumes, segmentations and tables logics; install it in ``slicer``."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)

    logics = {}
    for name, logic_class in (
        ("volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("tables", slicer.vtkSlicerTablesLogic),
        ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name.capitalize(), logic)
        logics[name] = logic
    app_logic.SetModuleLogic("Segmentations", logics["segmentations"])
    app_logic.SetModuleLogic("SubjectHierarchy", logics["subjecthierarchy"])

    slicer.mrmlScene = scene
    slicer.app = None
    slicer.modules = types.SimpleNamespace(**{name: _ModuleEntry(logic) for name, logic in logics.items()})
    return types.SimpleNamespace(scene=scene, app_logic=app_logic, color_logic=color_logic, **logics)


def teardown(env: types.SimpleNamespace) -> None:
    """Clear the scene so that the next test starts empty."""
    env.scene.Clear(True)


def load_volume(path: Path, name: str = "CT"):
    """Read a CT file into a scalar volume node through Slicer's own storage node."""
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(volume):
        raise OSError(f"Slicer could not read {path}")
    return volume


def volume_from_image(image, name: str = "CT"):
    """A scalar volume node holding a SimpleITK image's voxels and geometry (the module's own conversion)."""
    from COVIDInfectionSegLib.geometry import update_volume_from_sitk

    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_volume_from_sitk(volume, image)
    return volume
