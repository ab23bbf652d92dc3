"""3D Slicer scripted module for MedLSAM.

This file only wires Slicer (MRML, Qt) to MedLSAMLib, the pure-Python core that the
``medlsam`` command line uses too. Nothing heavy is imported or installed at file scope or in
the widget constructor: Slicer's generic module tests build the widget on factory machines.
"""
import os

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


class MedLSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedLSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedLSAM developers"]
        self.parent.helpText = (
            "Localize and segment anatomical structures in CT from six extreme points marked on a few "
            "template scans. See the <a href='https://github.com/medlsam/SlicerMedLSAM#readme'>documentation</a>."
        )
        self.parent.acknowledgementText = (
            "Method: Lei et al., 'MedLSAM: Localize and Segment Anything Model for 3D CT Images', "
            "Medical Image Analysis. This is an independent Apache-2.0 implementation."
        )


class MedLSAMWidget(ScriptedLoadableModuleWidget):
    """Module panel. The full template / cohort panel is built on top of MedLSAMLogic."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        info = qt.QLabel(
            "MedLSAM core is installed. Use the 'medlsam' command line for templates and batch runs; "
            "the interactive template and cohort panel is under development."
        )
        info.wordWrap = True
        self.layout.addWidget(info)
        self.layout.addStretch(1)


class MedLSAMLogic(ScriptedLoadableModuleLogic):
    """Headless logic (no widget needed): delegates to MedLSAMMRML.logic, which runs MedLSAMLib,
    the same code as the ``medlsam`` command line. Heavy imports happen on first use."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    @property
    def core(self):
        if self._core is None:
            from MedLSAMMRML.logic import MedLSAMCore

            self._core = MedLSAMCore(slicer.mrmlScene)
        return self._core

    @staticmethod
    def libraryVersion():
        import MedLSAMLib

        return MedLSAMLib.__version__

    def localize(self, templates, volumeNode, mode="wpl", device="auto"):
        """Boxes for every template structure in ``volumeNode`` (the boxes.json content)."""
        return self.core.localize(templates, volumeNode, mode=mode, device=device)

    def segment(self, volumeNode, templates, segmentationNode=None, mode="spl", device="auto"):
        """Localize and segment ``volumeNode``; returns (segmentation node, case record)."""
        return self.core.segment(volumeNode, templates, segmentationNode, mode=mode, device=device)

    def processCohort(self, volumeNodes, templates, mode="spl", device="auto", progressCallback=None,
                      cancelEvent=None):
        """Segment every volume into '<volume> MedLSAM'; failures are recorded, cancel keeps finished cases."""
        return self.core.process_cohort(volumeNodes, templates, mode=mode, device=device,
                                        progress_callback=progressCallback, cancel_event=cancelEvent)


class MedLSAMTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_library_importable()

    def test_library_importable(self):
        version = MedLSAMLogic.libraryVersion()
        self.assertTrue(version and version[0].isdigit())
        self.assertTrue(os.path.isdir(os.path.dirname(__import__("MedLSAMLib").__file__)))
