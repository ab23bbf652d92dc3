"""Registration baseline: affine-register each template CT to the query, map its extreme points.

This is the classical atlas approach MedLAM is compared against (benchmarks/localization.py).
The localizer built on it (points of several templates fused by their per-coordinate median) is
:class:`MedLSAMLib.localizers.registration.RegistrationLocalizer`.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..io import Volume, to_sitk
from ..templates import Template


def register_affine(fixed: Volume, moving: Volume, seed: int = 2023) -> sitk.Transform:
    """Affine transform mapping ``fixed`` (query) LPS points to ``moving`` (template) LPS points."""
    f = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    m = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    # Clamp to a soft-tissue/bone range so that table, air and metal do not dominate the metric.
    f, m = (sitk.Clamp(x, sitk.sitkFloat32, -1000.0, 1500.0) for x in (f, m))
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(f, m)


def map_template_points(template: Template, template_image: Volume, query: Volume,
                        structures: list[str]) -> dict[str, np.ndarray]:
    """Template extreme points mapped into the query's LPS space, per structure (6, 3)."""
    tx = register_affine(query, template_image)
    inverse = tx.GetInverse()
    return {s: np.array([inverse.TransformPoint(tuple(float(v) for v in p)) for p in template.structures[s].points])
            for s in structures}
