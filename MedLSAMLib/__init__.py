"""MedLSAMLib: localize and segment anatomical structures in 3D CT from a few templates.

The pure-Python core of MedLSAM, shared by the ``medlsam`` command line and the 3D Slicer
extension. It never imports ``slicer``, ``qt`` or ``ctk``.

Layers, bottom-up (each imports only those before it):

* shared: ``errors`` (every exception type), ``device`` (device and threads), ``weights``
  (untrusted checkpoints), ``results`` (typed results and their JSON files)
* data: ``io`` (volumes, atomic writes) -> ``geometry`` (LPS / IJK, boxes, views) ->
  ``preprocess`` -> ``markups`` / ``terminology`` / ``templates``
* localizers: ``medlam`` (network, checkpoint, search; ``training`` only for ``medlsam train``),
  ``registration``, ``localizers`` (hybrid, registration and MedLAM behind one ``LocalizerSpec``),
  ``localize`` (the MedLAM template localizer)
* segmentation: ``segment`` (backends, encoder runtimes, slice-wise segmentation)
* jobs: ``pipeline`` (one cohort, files, resume, lock) -> ``cluster`` (Dask) / ``demo`` /
  ``evaluate`` -> ``cli``
"""
__version__ = "0.1.0"
