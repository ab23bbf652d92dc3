"""Segment Editor effect "MedLSAM": template box -> SAM on each slice -> preview -> Apply (undoable).

Qt wiring only; the work is in ``MedLSAMMRML.effect`` (tested on Slicer's real MRML libraries).
Localization and segmentation run in a worker process (``MedLSAMMRML.process.ProcessJob``: Slicer
holds Python's lock in its event loop, so a thread would crawl) polled by a QTimer; MRML is read
before (the volume written to a file) and written after, on the main thread.
The preview lives in a separate segmentation node until Apply, which first calls
``saveStateForUndo()`` so Ctrl+Z restores the segment; Cancel stops a running job, then discards
preview and box.
"""
import os

import ctk
import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

PREVIEW_NODE_NAME = "MedLSAM preview"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedLSAM"
        scriptedEffect.perSegment = False  # the selected segment names the template structure
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._roi = None
        self._preview = None  # vtkOrientedImageData of the last Segment slice / range
        self._previewNode = None
        self._job = None  # the ProcessJob running now, and what to do with its result
        self._onJobDone = None
        self._what = ""

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment the selected segment with MedLSAM.<br>"
                "<b>Localize</b>: the templates propose a 3D box for the structure named like the selected "
                "segment (drag the box to adjust).<br><b>Segment slice</b> / <b>Segment range</b>: SAM on "
                "each slice inside the box, shown as a preview.<br>The localizer, segmenter and device are "
                "those chosen in the MedLSAM module's panel.<br><b>Apply</b> writes the preview into the "
                "segment (undo with Ctrl+Z); <b>Cancel</b> discards it.</html>")

    # -- options panel ----------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.templateFolderEdit = ctk.ctkPathLineEdit()
        self.templateFolderEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.templateFolderEdit.toolTip = "template folder (template.json) with a structure named like the segment"
        self.scriptedEffect.addLabeledOptionsWidget("Template:", self.templateFolderEdit)

        self.localizeButton = qt.QPushButton("Localize")
        self.localizeButton.toolTip = "Propose a box for the selected segment's structure from the template"
        self.scriptedEffect.addOptionsWidget(self.localizeButton)

        self.firstSliceSpinBox = qt.QSpinBox()
        self.lastSliceSpinBox = qt.QSpinBox()
        for spin in (self.firstSliceSpinBox, self.lastSliceSpinBox):
            spin.minimum = 0
            spin.maximum = 10000
        rangeLayout = qt.QHBoxLayout()
        rangeLayout.addWidget(self.firstSliceSpinBox)
        rangeLayout.addWidget(self.lastSliceSpinBox)
        self.scriptedEffect.addLabeledOptionsWidget("Slices:", rangeLayout)

        self.segmentSliceButton = qt.QPushButton("Segment slice")
        self.segmentSliceButton.toolTip = "Segment the slice shown in the Red view inside the box"
        self.segmentRangeButton = qt.QPushButton("Segment range")
        self.segmentRangeButton.toolTip = "Segment every slice of the range inside the box"
        segmentLayout = qt.QHBoxLayout()
        segmentLayout.addWidget(self.segmentSliceButton)
        segmentLayout.addWidget(self.segmentRangeButton)
        self.scriptedEffect.addOptionsWidget(segmentLayout)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.enabled = False
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        finishLayout = qt.QHBoxLayout()
        finishLayout.addWidget(self.cancelButton)
        finishLayout.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(finishLayout)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.pollTimer = qt.QTimer()  # localization and segmentation run on a worker thread
        self.pollTimer.setInterval(100)

        for sender, signal, slot in self._connections():
            sender.connect(signal, slot)

    def _connections(self):
        """(widget, signal, slot) of every Qt connection, so cleanup() undoes exactly these."""
        return [(self.templateFolderEdit, "currentPathChanged(QString)", self.updateMRMLFromGUI),
                (self.localizeButton, "clicked()", self.onLocalize),
                (self.segmentSliceButton, "clicked()", self.onSegmentSlice),
                (self.segmentRangeButton, "clicked()", self.onSegmentRange),
                (self.applyButton, "clicked()", self.onApply),
                (self.cancelButton, "clicked()", self.onCancel),
                (self.pollTimer, "timeout()", self.pollJob)]

    def cleanup(self):
        # Qt signals hold references to this object (Slicer issue #7392): disconnect them
        for sender, signal, slot in self._connections():
            sender.disconnect(signal, slot)
        self.pollTimer.stop()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("TemplateFolder", "")

    def updateGUIFromMRML(self):
        wasBlocked = self.templateFolderEdit.blockSignals(True)
        self.templateFolderEdit.currentPath = self.scriptedEffect.parameter("TemplateFolder")
        self.templateFolderEdit.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self, *args):
        self.scriptedEffect.setParameter("TemplateFolder", self.templateFolderEdit.currentPath)

    def panelSettings(self, templates):
        """The MedLSAM panel's run configuration (localizer, segmenter, device) for ``templates``:
        one configuration for the panel and the effect."""
        from MedLSAM import MedLSAMLogic

        return MedLSAMLogic().settingsFromParameters(templates)

    def _panelSegmenter(self):
        """The panel's segmenter (a SegmenterSpec) and the device it runs on (a box can be segmented
        without templates)."""
        from MedLSAM import MedLSAMLogic
        from MedLSAMLib.device import resolve_device

        logic = MedLSAMLogic()
        return logic.segmenterFromParameters(), str(resolve_device(logic.getParameterNode().device))

    def deactivate(self):
        if self._job is not None:  # its result is discarded when it arrives (BackgroundJob.outcome)
            self._job.cancel()
        self.discardPreview()

    # -- actions ------------------------------------------------------------------------------
    def _nodes(self):
        editorNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = editorNode.GetSegmentationNode()
        volumeNode = editorNode.GetSourceVolumeNode()
        segmentId = editorNode.GetSelectedSegmentID()
        if segmentationNode is None or volumeNode is None or not segmentId:
            raise ValueError("Select a segmentation, its source volume and a segment first.")
        return segmentationNode, volumeNode, segmentId

    def startJob(self, job, onDone, what):
        """``job``: a ProcessJob (or BackgroundJob) already started; ``onDone(result)`` runs on the main thread."""
        if self._job is not None:
            job.cancel()
            self._removeWorkDir(job)
            raise ValueError("MedLSAM is still working; wait or press Cancel.")
        self._job, self._onJobDone = job, onDone
        self._what = what
        self.cancelButton.enabled = True
        for button in (self.localizeButton, self.segmentSliceButton, self.segmentRangeButton):
            button.enabled = False
        self.pollTimer.start()

    def pollJob(self):
        job = self._job
        state, value = job.outcome() if job is not None else ("cancelled", None)
        if state == "running":
            done, total = job.progress
            self.statusLabel.text = f"{self._what}..." + (f" slice {done}/{total}" if total else "")
            return
        self.pollTimer.stop()
        self._job = None
        for button in (self.localizeButton, self.segmentSliceButton, self.segmentRangeButton):
            button.enabled = True
        self.cancelButton.enabled = self._preview is not None
        try:
            if state == "cancelled":  # also a job that finished after Cancel or after the effect was left
                self.statusLabel.text = "Cancelled."
            elif state == "failed":
                self.statusLabel.text = f"{self._what} failed: {value}"
                slicer.util.errorDisplay(f"MedLSAM could not finish {self._what}: {value}")
            else:  # onDone reads the job's output file: the folder goes only after it
                with slicer.util.tryWithErrorDisplay(f"MedLSAM could not finish {self._what}.", waitCursor=True):
                    self._onJobDone(value)
        except Exception as exc:  # tryWithErrorDisplay showed it and re-raised: not out of a timer slot
            self.statusLabel.text = f"{self._what} failed: {exc}"
        finally:
            self._removeWorkDir(job)

    @staticmethod
    def _removeWorkDir(job):
        import shutil

        folder = getattr(job, "work_dir", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def onLocalize(self):
        import json

        from MedLSAMLib.errors import InputError
        from MedLSAMLib.results import Localization
        from MedLSAMMRML import effect, process

        with slicer.util.tryWithErrorDisplay("MedLSAM could not localize the structure.", waitCursor=True):
            segmentationNode, volumeNode, segmentId = self._nodes()
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            folder = self.scriptedEffect.parameter("TemplateFolder")
            if not folder:
                raise InputError("Choose the template folder.")
            settings = self.panelSettings((folder,))
            work = self._workDir()
            image = process.volume_file(volumeNode, work, "volume")  # MRML read on the main thread
            job = process.ProcessJob({"kind": "localize", "settings": settings.to_json(), "image": str(image),
                                      "out": str(work / "boxes.json")}, work)

            def done(path):
                result = Localization.from_json(json.loads(path.read_text(encoding="utf-8")))
                entry = effect.structure_entry(result, name)
                if self._roi is not None:
                    slicer.mrmlScene.RemoveNode(self._roi)
                self._roi = effect.roi_from_ijk_box(slicer.mrmlScene, volumeNode, entry.box_ijk, f"{name} box")
                first, last = self._roiSliceRange(volumeNode)
                self.firstSliceSpinBox.value, self.lastSliceSpinBox.value = first, last
                note = "" if entry.present else " (the templates think it is absent: check the box)"
                self.statusLabel.text = f"{name}: box proposed, confidence {entry.confidence:.2f}{note}."

            self.startJob(job, done, f"localizing {name}")

    @staticmethod
    def _workDir():
        import tempfile
        from pathlib import Path

        return Path(tempfile.mkdtemp(prefix="MedLSAM-effect-"))

    def _roiSliceRange(self, volumeNode):
        from MedLSAMMRML import effect

        lo, hi = effect.ijk_box_from_roi(self._roi, volumeNode)
        axis = effect.axial_axis(volumeNode)
        return lo[axis], hi[axis]

    def onSegmentSlice(self):
        from MedLSAMMRML import effect

        with slicer.util.tryWithErrorDisplay("MedLSAM could not segment the slice.", waitCursor=True):
            _, volumeNode, _ = self._nodes()
            sliceToRas = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            centre = [sliceToRas.GetElement(r, 3) for r in range(3)]
            index = effect.axial_slice_at(volumeNode, centre)
            self._segment(index, index)

    def onSegmentRange(self):
        with slicer.util.tryWithErrorDisplay("MedLSAM could not segment the range.", waitCursor=True):
            self._segment(self.firstSliceSpinBox.value, self.lastSliceSpinBox.value)

    def _segment(self, first, last):
        import dataclasses

        import numpy as np

        from MedLSAMLib.io import write_volume
        from MedLSAMMRML import effect, process

        segmentationNode, volumeNode, segmentId = self._nodes()
        if self._roi is None:
            raise ValueError("Press Localize first (or place a box).")
        box = effect.ijk_box_from_roi(self._roi, volumeNode)
        volume, request, lo, hi = effect.prepare_box(volumeNode, box, slices=(first, last))  # main thread
        spec, device = self._panelSegmenter()  # the panel's segmenter and device
        work = self._workDir()
        image = work / "volume.nrrd"
        write_volume(volume, image, compress=False)
        job = process.ProcessJob({"kind": "box", "segmenter": dataclasses.asdict(spec), "device": device,
                                  "image": str(image), "request": effect.request_json(request),
                                  "out": str(work / "labels.npy")}, work)

        def done(path):
            labels = np.load(path, allow_pickle=False)
            self._preview = effect.preview_image(labels, volume, lo, hi)
            self._showPreview(volumeNode)
            voxels = effect.labelmap_voxel_count(self._preview)
            self.statusLabel.text = f"Preview: {voxels} voxels on slices {first}-{last}. Apply or Cancel."
            self.applyButton.enabled = self.cancelButton.enabled = True

        self.startJob(job, done, f"segmenting slices {first}-{last}")

    def _showPreview(self, volumeNode):
        from MedLSAMMRML import effect

        if self._previewNode is None:
            self._previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
            self._previewNode.CreateDefaultDisplayNodes()
            self._previewNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            self._previewNode.GetSegmentation().AddEmptySegment("preview", "preview", [1.0, 1.0, 0.0])
            self._previewNode.GetDisplayNode().SetOpacity2DFill(0.4)
        effect.write_into_segment(self._preview, self._previewNode, "preview")

    def onApply(self):
        from MedLSAMMRML import effect

        with slicer.util.tryWithErrorDisplay("MedLSAM could not apply the preview.", waitCursor=True):
            segmentationNode, volumeNode, segmentId = self._nodes()
            merged = effect.merged_with_segment(self._preview, segmentationNode, segmentId, volumeNode)
            self.scriptedEffect.saveStateForUndo()
            self.scriptedEffect.modifySelectedSegmentByLabelmap(
                merged, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
            self.discardPreview(keepBox=True)
            self.statusLabel.text = "Applied (Ctrl+Z undoes it)."

    def onCancel(self):
        if self._job is not None:  # first Cancel stops the running job; the next one discards
            self._job.cancel()
            return
        self.discardPreview()
        self.statusLabel.text = "Discarded."

    def discardPreview(self, keepBox=False):
        self._preview = None
        if self._previewNode is not None:
            slicer.mrmlScene.RemoveNode(self._previewNode)
            self._previewNode = None
        if self._roi is not None and not keepBox:
            slicer.mrmlScene.RemoveNode(self._roi)
            self._roi = None
        if hasattr(self, "applyButton"):
            self.applyButton.enabled = self.cancelButton.enabled = False
