"""COVIDInfectionSeg: lungs and COVID-19 infection on chest CT, as an editable segmentation with the numbers.

Thin Slicer layer: the computation lives in the Qt-free ``COVIDInfectionSegLib`` (tested against
slicer-core's real MRML scene) and in ``relsegcore`` (the same code as the ``relseg`` command).
"""

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

import COVIDInfectionSegLib as Lib
from COVIDInfectionSegLib import learning, models, quantify


class COVIDInfectionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "COVID Infection Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["COVIDInfectionSeg contributors"]
        self.parent.helpText = (
            "Segments the left and right lung and COVID-19 infection (or ground-glass opacity and consolidation) "
            "on a chest CT with a dual-encoder network, and measures lung and infection volumes and opacity. "
            "Research use only; not for diagnosis."
        )
        self.parent.acknowledgementText = "Method: Zhang et al., IEEE JBHI 2021 (relation-driven dual encoder)."


@parameterNodeWrapper
class COVIDInfectionSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode


class COVIDInfectionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: wires the .ui to the logic; a timer polls the background segmentation process."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/COVIDInfectionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = COVIDInfectionSegLogic()
        self.process = None
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.timeout.connect(self.onTimer)
        self.settings = qt.QSettings()
        self.ui.modelsIndexUrlEdit.text = self.settings.value("COVIDInfectionSeg/ModelsIndexURL", "")
        self.ui.correctionsDirEdit.currentPath = self.settings.value(
            "COVIDInfectionSeg/CorrectionsDir", str(models.slicer_settings_home() / "Corrections"))
        for label, device in (("Auto", "auto"), ("GPU", "cuda"), ("CPU", "cpu")):
            self.ui.deviceSelector.addItem(label, device)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.updateResultsButton.clicked.connect(self.showResults)
        self.ui.downloadModelsButton.clicked.connect(self.onDownloadModels)
        self.ui.saveCorrectionButton.clicked.connect(self.onSaveCorrection)
        self.ui.fineTuneButton.clicked.connect(self.onFineTune)
        self.ui.useVersionButton.clicked.connect(self.onUseVersion)
        self.ui.rollBackButton.clicked.connect(self.onRollBack)
        self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(COVIDInfectionSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        self._parameterNode = parameterNode
        self._parameterNode.connectGui(self.ui)

    def enter(self):
        self.initializeParameterNode()
        if self.ui.modelSelector.count == 0 and not Lib.missing_packages():
            self.refreshModels()

    def cleanup(self):
        self.onCancel()
        self.removeObservers()

    def refreshModels(self):
        """Fill the model and version selectors and show the GPU PyTorch sees (needs the dependencies)."""
        import torch

        choices = models.model_choices()
        for selector in (self.ui.modelSelector, self.ui.modelVersionSelector):
            selected = selector.currentData
            selector.clear()
            for choice in choices:
                selector.addItem(choice.label, choice.name)
                selector.setItemData(selector.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            selector.currentIndex = max(selector.findData(selected), 0)  # keep the user's choice
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none found"
        self.ui.deviceSelector.setItemText(1, f"GPU ({gpu})")

    def onSegment(self):
        volume = self._parameterNode.inputVolume
        if volume is None:
            slicer.util.errorDisplay("Select a chest CT first.")
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if Lib.ensure_dependencies(lambda message: slicer.util.confirmOkCancelDisplay(message)):
                self.refreshModels()  # first use: the selectors can be filled only now
            device = self.ui.deviceSelector.currentData
            tta = self.ui.qualitySelector.currentIndex == 1
            slices = volume.GetImageData().GetDimensions()[2]
            warning = Lib.long_run_warning(slices, self.logic.resolveDevice(device), tta)
            if warning and not slicer.util.confirmOkCancelDisplay(warning):
                return
            output = self._parameterNode.outputSegmentation
            overwrite = False
            if output is not None and self.logic.isEdited(output):
                if not slicer.util.confirmYesNoDisplay(f"{output.GetName()} was edited. Overwrite the edits?"):
                    return
                overwrite = True
            self.process = self.logic.start_segmentation(volume, output, self.ui.modelSelector.currentData,
                                                         device, tta, overwrite)
            self.setRunning(True)

    def onTimer(self):
        state = self.process.poll()
        self.ui.progressBar.value = int(100 * self.process.fraction)
        remaining = self.process.remaining_seconds()
        left = f" - about {remaining:.0f} s left" if remaining is not None else ""
        self.ui.stageLabel.text = (self.process.stage or "Starting...") + left
        if state == "running":
            return
        self.setRunning(False)
        if state == "succeeded" and isinstance(self.process, Lib.SegmentationProcess):
            self._parameterNode.outputSegmentation = self.process.output_segmentation
            self.showResults()
        elif state == "succeeded":  # fine-tuning: its summary (Dice before/after) is the last output line
            self.refreshModels()
            self.ui.correctionsLabel.text = (self.process.output_lines or ["Fine-tuning finished."])[-1]
        elif state == "failed":
            self.ui.stageLabel.text = "Failed."
            slicer.util.errorDisplay(f"Segmentation failed: {self.process.error}")

    def onCancel(self):
        if self.process is not None and self.process.state == "running":
            self.process.cancel()
            self.setRunning(False)
            self.ui.stageLabel.text = "Cancelled; the scene was not changed."

    def setRunning(self, running):
        self.ui.segmentButton.enabled = not running
        self.ui.cancelButton.enabled = running
        self.timer.start() if running else self.timer.stop()

    def showResults(self):
        """Numbers measured on the (possibly edited) segments, in the panel and in a table node."""
        segmentation, volume = self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
        if segmentation is None or volume is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not measure the segmentation."):
            measurement = self.logic.measure(segmentation, volume)
            for row, values in enumerate(quantify.table_rows(measurement)):
                for column, value in enumerate(values[1:]):
                    self.ui.resultsTable.setItem(row, column, qt.QTableWidgetItem(f"{value:.1f}"))
            self.logic.quantify(segmentation, volume)
            report = Lib.stored_report(segmentation) or {}
            model = report.get("model", {})
            where = report.get("device", "?")
            self.ui.modelInfoLabel.text = f"Model {model.get('name', '?')} {model.get('version', '')} on {where}"

    def onDownloadModels(self):
        url = self.ui.modelsIndexUrlEdit.text.strip()
        self.settings.setValue("COVIDInfectionSeg/ModelsIndexURL", url)
        with slicer.util.tryWithErrorDisplay("Model download failed.", waitCursor=True):
            Lib.ensure_dependencies(lambda message: slicer.util.confirmOkCancelDisplay(message))
            for entry in models.models_in_index(url):
                self.ui.stageLabel.text = f"Downloading {entry['name']} {entry['version']}..."
                slicer.app.processEvents()
                models.download_model_entry(entry)
            self.refreshModels()
            self.ui.stageLabel.text = "Models are up to date."

    def onSaveCorrection(self):
        store = self.ui.correctionsDirEdit.currentPath
        self.settings.setValue("COVIDInfectionSeg/CorrectionsDir", store)
        with slicer.util.tryWithErrorDisplay("Could not save the correction.", waitCursor=True):
            parameters = self._parameterNode
            record = self.logic.save_correction(parameters.inputVolume, parameters.outputSegmentation, store)
            if not record.edited:
                slicer.util.warningDisplay("Nothing was edited: the correction equals the model's result.")
            self.ui.correctionsLabel.text = f"Saved {record.case_id} in {store}."

    def onFineTune(self):
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            self.process = learning.start_fine_tuning(
                self.ui.modelSelector.currentData, self.ui.correctionsDirEdit.currentPath,
                self.ui.deviceSelector.currentData)
            self.setRunning(True)

    def onUseVersion(self):
        with slicer.util.tryWithErrorDisplay("Could not change the default model.", waitCursor=True):
            models.use_model(self.ui.modelVersionSelector.currentData)
            self.refreshModels()

    def onRollBack(self):
        with slicer.util.tryWithErrorDisplay("Could not roll back.", waitCursor=True):
            previous = models.roll_back()
            self.refreshModels()
            self.ui.correctionsLabel.text = f"Default model is {previous} again."


class COVIDInfectionSegLogic(Lib.InfectionSegmentationLogic, ScriptedLoadableModuleLogic):
    """The module logic: ``segment``, ``quantify``, ``start_segmentation``, ``save_correction`` from the Lib."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        Lib.InfectionSegmentationLogic.__init__(self)

    def getParameterNode(self):
        return COVIDInfectionSegParameterNode(super().getParameterNode())


class COVIDInfectionSegTest(ScriptedLoadableModuleTest):
    """Runs the blocking logic on the synthetic demo CT inside a real Slicer."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_segment_demo_ct()
        self.test_background_process_matches()

    def demoVolume(self):
        from relsegcore.demo import make_demo_ct

        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DemoCT")
        Lib.update_volume_from_sitk(volume, make_demo_ct(seed=0).image)
        return volume

    def test_background_process_matches(self):
        volume = self.demoVolume()
        logic = COVIDInfectionSegLogic()
        process = logic.start_segmentation(volume, device="cpu")
        self.assertEqual(process.wait(timeout_s=600), "succeeded", process.error)
        blocking = logic.measure(logic.segment(volume, device="cpu"), volume)
        background = logic.measure(process.output_segmentation, volume)
        self.assertAlmostEqual(background["lungs"]["total_ml"], blocking["lungs"]["total_ml"], delta=0.01)
        self.assertAlmostEqual(background["infection"]["total_ml"], blocking["infection"]["total_ml"], delta=0.01)

    def test_segment_demo_ct(self):
        volume = self.demoVolume()
        logic = COVIDInfectionSegLogic()
        segmentation = logic.segment(volume, device="cpu")
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names[:2], ["Left lung", "Right lung"])
        report = Lib.stored_report(segmentation)
        measured = logic.measure(segmentation, volume)
        self.assertAlmostEqual(measured["lungs"]["total_ml"], report["lungs"]["total_ml"], delta=0.5)
        table = logic.quantify(segmentation, volume)
        self.assertEqual(table.GetNumberOfRows(), 3)
        self.delayDisplay("COVIDInfectionSeg self-test passed")
