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
from COVIDInfectionSegLib import learning, models, panel, selftest
from COVIDInfectionSegLib.process import FAILED, RUNNING, SUCCEEDED


class COVIDInfectionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "COVID Infection Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["COVIDInfectionSeg contributors"]
        self.parent.helpText = (
            "Segments the left and right lung and COVID-19 infection, as ground-glass opacity and consolidation, "
            "on a chest CT with a dual-encoder network, and measures lung and infection volumes, the percentage of "
            "opacity (PO) and the percentage of high opacity (PHO: infection at or above -200 HU) per lung. "
            "Research use only; not for diagnosis."
        )
        self.parent.acknowledgementText = "Method: Zhang et al., IEEE JBHI 2021 (relation-driven dual encoder)."


@parameterNodeWrapper
class COVIDInfectionSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode


class COVIDInfectionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: wires the .ui to the logic; a timer polls the background process (segmentation or fine-tuning)."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/COVIDInfectionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic, self.process, self.settings = COVIDInfectionSegLogic(), None, qt.QSettings()
        self._parameterNode, self._parameterNodeGuiTag, self.choices = None, None, {}
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.timeout.connect(self.onTimer)
        self.ui.modelsIndexUrlEdit.text = self.setting("ModelsIndexURL", "")
        self.ui.correctionsDirEdit.currentPath = self.setting("CorrectionsDir",
                                                              str(models.slicer_settings_home() / "Corrections"))
        for label, device in panel.DEVICE_CHOICES:
            self.ui.deviceSelector.addItem(label, device)
        self.qualityTooltip = self.ui.qualitySelector.toolTip
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        for button, handler in ((self.ui.segmentButton, self.onSegment), (self.ui.cancelButton, self.onCancel),
                                (self.ui.updateResultsButton, self.showResults),
                                (self.ui.downloadModelsButton, self.onDownloadModels),
                                (self.ui.saveCorrectionButton, self.onSaveCorrection),
                                (self.ui.fineTuneButton, self.onFineTune),
                                (self.ui.useVersionButton, self.onUseVersion),
                                (self.ui.rollBackButton, self.onRollBack)):
            button.clicked.connect(handler)
        self.enter()

    def setting(self, key, default, value=None):
        if value is not None:
            self.settings.setValue(panel.SETTINGS_PREFIX + key, value)
        return self.settings.value(panel.SETTINGS_PREFIX + key, default)

    def enter(self):
        self.exit()
        self._parameterNode = self.logic.getParameterNode()
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if self.ui.modelSelector.count == 0 and not Lib.missing_packages():
            self.refreshModels()

    def exit(self):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def cleanup(self):
        self.onCancel()
        self.exit()
        self.removeObservers()

    def refreshModels(self):
        """Fill the model and version selectors (installed models, default first) and name the GPU."""
        self.choices = {choice.name: choice for choice in models.model_choices()}
        for selector in (self.ui.modelSelector, self.ui.modelVersionSelector):
            selected = selector.currentData
            selector.clear()
            for choice in self.choices.values():
                selector.addItem(choice.label, choice.name)
                selector.setItemData(selector.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            selector.currentIndex = max(selector.findData(selected), 0)  # keep the user's choice
        self.ui.deviceSelector.setItemText(1, panel.gpu_label())
        self.onModelChanged()

    def onModelChanged(self):
        """A model whose card always averages with the mirror runs Accurate: Fast is not offered for it."""
        fixed, self.ui.qualitySelector.toolTip = panel.quality_for(self.choices.get(self.ui.modelSelector.currentData),
                                                                   self.qualityTooltip)
        if fixed:
            self.ui.qualitySelector.currentIndex = 1
        self.ui.qualitySelector.enabled = not fixed

    def onSegment(self):
        volume, output = self._parameterNode.inputVolume, self._parameterNode.outputSegmentation
        if volume is None:
            return slicer.util.errorDisplay("Select a chest CT first.")
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if Lib.ensure_dependencies(slicer.util.confirmOkCancelDisplay):
                self.refreshModels()  # first use: the selectors can be filled only now
            device, tta = self.ui.deviceSelector.currentData, self.ui.qualitySelector.currentIndex == 1
            warning = Lib.long_run_warning(volume.GetImageData().GetDimensions()[2],
                                           self.logic.resolveDevice(device), tta)
            if warning and not slicer.util.confirmOkCancelDisplay(warning):
                return
            overwrite = output is not None and self.logic.isEdited(output)
            if overwrite and not slicer.util.confirmYesNoDisplay(f"{output.GetName()} was edited. Overwrite?"):
                return
            self.startProcess(self.logic.start_segmentation(volume, output, self.ui.modelSelector.currentData,
                                                            device, tta, overwrite))

    def startProcess(self, process):
        self.process = process
        self.setRunning(True)

    def onTimer(self):
        state = self.process.poll()
        self.ui.progressBar.value = int(100 * self.process.fraction)
        self.ui.stageLabel.text = panel.status_text(self.process)
        if state == RUNNING:
            return
        self.setRunning(False)
        if state == SUCCEEDED and isinstance(self.process, Lib.SegmentationProcess):
            self._parameterNode.outputSegmentation = self.process.output_segmentation
            self.showResults()
        elif state == SUCCEEDED:
            self.refreshModels()
            self.ui.correctionsLabel.text = self.ui.stageLabel.text
        elif state == FAILED:
            slicer.util.errorDisplay(self.ui.stageLabel.text)

    def onCancel(self):
        if self.process is not None and self.process.state == RUNNING:
            self.process.cancel()
            self.setRunning(False)
            self.ui.stageLabel.text = panel.status_text(self.process)

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
            rows = panel.result_rows(self.logic.measure(segmentation, volume))
            self.ui.resultsTable.setRowCount(len(rows))
            self.ui.resultsTable.setVerticalHeaderLabels([name for name, _ in rows])
            for row, (_, cells) in enumerate(rows):
                for column, text in enumerate(cells):
                    self.ui.resultsTable.setItem(row, column, qt.QTableWidgetItem(text))
            self.logic.quantify(segmentation, volume)
            self.ui.modelInfoLabel.text = panel.model_info_text(Lib.stored_report(segmentation))

    def onDownloadModels(self):
        url = self.setting("ModelsIndexURL", "", self.ui.modelsIndexUrlEdit.text.strip())
        with slicer.util.tryWithErrorDisplay("Model download failed.", waitCursor=True):
            Lib.ensure_dependencies(slicer.util.confirmOkCancelDisplay)
            for entry in models.models_in_index(url):
                models.download_model_entry(entry, progress=self.showProgress)
            self.refreshModels()
            self.ui.stageLabel.text = "Models are up to date."

    def showProgress(self, fraction, stage):
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.stageLabel.text = stage
        slicer.app.processEvents()

    def onSaveCorrection(self):
        store = self.setting("CorrectionsDir", "", self.ui.correctionsDirEdit.currentPath)
        with slicer.util.tryWithErrorDisplay("Could not save the correction.", waitCursor=True):
            record = self.logic.save_correction(self._parameterNode.inputVolume,
                                                self._parameterNode.outputSegmentation, store)
            if not record.edited:
                slicer.util.warningDisplay("Nothing was edited: the correction equals the model's result.")
            self.ui.correctionsLabel.text = f"Saved {record.case_id} in {store}."

    def onFineTune(self):
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            self.startProcess(learning.start_fine_tuning(self.ui.modelSelector.currentData,
                                                         self.ui.correctionsDirEdit.currentPath,
                                                         self.ui.deviceSelector.currentData))

    def onUseVersion(self):
        with slicer.util.tryWithErrorDisplay("Could not change the default model.", waitCursor=True):
            models.use_model(self.ui.modelVersionSelector.currentData)
            self.refreshModels()

    def onRollBack(self):
        with slicer.util.tryWithErrorDisplay("Could not roll back.", waitCursor=True):
            self.ui.correctionsLabel.text = f"Default model is {models.roll_back()} again."
            self.refreshModels()


class COVIDInfectionSegLogic(Lib.InfectionSegmentationLogic, ScriptedLoadableModuleLogic):
    """The module logic: ``segment``, ``quantify``, ``start_segmentation``, ``save_correction`` from the Lib."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        Lib.InfectionSegmentationLogic.__init__(self)

    def getParameterNode(self):
        return COVIDInfectionSegParameterNode(super().getParameterNode())


class COVIDInfectionSegTest(ScriptedLoadableModuleTest):
    """Inside a real Slicer: the same Qt-free steps (``COVIDInfectionSegLib.selftest``) that pytest runs
    against slicer-core, with the installed default model on the synthetic demo CT."""

    def runTest(self):
        for step in selftest.STEPS:
            slicer.mrmlScene.Clear()
            step(COVIDInfectionSegLogic())
        self.delayDisplay("COVIDInfectionSeg self-test passed")
