"""The MRML layer of the MedLSAM Slicer module: MRML nodes <-> MedLSAMLib, and the headless logic.

Imports slicer and vtk but never Qt, so it runs unchanged under Slicer's MRML libraries
(``slicer-core``) in tests.
"""
