"""Registration baseline: affine-register each template CT to the query, map its extreme points.

This is the classical atlas approach MedLAM is compared against (benchmarks/localization.py).
Points from several templates are fused by their per-coordinate median.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import box_from_extreme_points, box_lps_to_ijk
from .io import Volume, to_sitk
from .templates import Template


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


def localize_by_registration(templates: list[tuple[Template, Volume]], query: Volume, structures: list[str]) -> dict:
    """Same result layout as MedLAM's localizer (present is always true; no confidence model)."""
    mapped = [map_template_points(t, img, query, structures) for t, img in templates]
    out = {}
    for s in structures:
        pts = np.median(np.stack([m[s] for m in mapped]), axis=0)
        box = box_from_extreme_points(pts, strict=False)
        out[s] = {
            "label": templates[0][0].structures[s].label,
            "present": True,
            "box_lps": box.round(3).tolist(),
            "box_ijk": box_lps_to_ijk(box, query.geometry).tolist(),
            "extreme_points_lps": pts.round(3).tolist(),
            "per_template_points_lps": [m[s] for m in mapped],
        }
    return {"structures": out}
