"""Test stand-ins for SAM shared by the test modules (real segmenters are tested in test_segmentation)."""
from __future__ import annotations

import time

import numpy as np
import torch


class ThresholdSegmenter:
    """A fast, exact stand-in for SAM: foreground = bright pixels inside the box (for geometry tests)."""

    name = "threshold"

    def embed(self, slices):
        return [torch.as_tensor(np.asarray(sl), dtype=torch.float32) for sl in slices]

    def decode(self, embedding, boxes, shape):
        out = torch.zeros((len(boxes), *shape))
        for n, (x0, y0, x1, y1) in enumerate(boxes):
            out[n, y0:y1 + 1, x0:x1 + 1] = (embedding[y0:y1 + 1, x0:x1 + 1] > 128).float()
        return out

    def describe(self):
        return {"name": self.name}


class SlowThresholdSegmenter(ThresholdSegmenter):
    """Same masks, but each slice takes a while, so that a case is still running when a test
    cancels it or kills its worker."""

    def __init__(self, seconds_per_slice: float = 0.1):
        self.seconds_per_slice = seconds_per_slice

    def embed(self, slices):
        time.sleep(self.seconds_per_slice * len(slices))
        return super().embed(slices)
