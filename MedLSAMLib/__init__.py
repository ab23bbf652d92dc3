"""MedLSAMLib: localize and segment anatomical structures in 3D CT from a few templates.

The pure-Python core of MedLSAM, shared by the ``medlsam`` command line and the 3D Slicer
extension. It never imports ``slicer``, ``qt`` or ``ctk``.

Layers, top-down: ``io`` -> ``geometry`` -> ``preprocess`` -> ``markups`` / ``templates``
-> ``medlam`` (network, training, search) -> ``cli``.
"""
__version__ = "0.1.0"
