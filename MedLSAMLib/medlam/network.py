"""The MedLAM network: a 3D U-Net with a linear "anatomical position" head.

Layer names mirror the authors' released ``medlam.pth`` (after stripping DataParallel's
``module.`` prefix), so the reference weights load strictly into the ``reference`` config:
``conv{0..8}_{1,2}.model.conv1_1.Conv.{weight,bias}``, ``classification.0.*``, ``fc{1,2,3}.*``.

Channel widths for base width ``b`` (reference b = 24):
encoder 2b, 2b, 4b, 8b, 16b (bottleneck at 1/16 resolution); position head
16b * (patch/16)^3 -> 8b -> 4b -> 3, purely linear (no activation, as in the reference);
decoder features of 4b channels at 1/4, 1/2 and (optionally) full resolution.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MedLAMConfig:
    base_channels: int = 24
    patch_size: int = 64
    full_resolution_decoder: bool = True  # feature2 at 64^3; the costliest part of the net
    classification_head: bool = True  # unused by any loss; kept so official weights load strictly
    dropout: float = 0.0

    @property
    def feature_scales(self) -> tuple[int, ...]:
        """Down-sampling factors of the decoder feature maps used for similarity (4, 2[, 1])."""
        return (4, 2, 1) if self.full_resolution_decoder else (4, 2)

    @property
    def feature_channels(self) -> int:
        return 4 * self.base_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedLAMConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


CONFIGS = {
    # The paper's network; loads the authors' medlam.pth.
    "reference": MedLAMConfig(),
    # CPU-trainable: ~1/9 of the convolution cost per level and no full-resolution decoder.
    "lite": MedLAMConfig(base_channels=8, full_resolution_decoder=False, classification_head=False),
}


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.Conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)

    def forward(self, x):
        return self.Conv(x)


class ConvBlock(nn.Module):
    """conv 3x3x3 -> InstanceNorm (no affine, no running stats) -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.model = nn.Sequential(OrderedDict(
            conv1_1=_Conv(cin, cout),
            norm=nn.InstanceNorm3d(cout, affine=False, track_running_stats=False),
            relu=nn.ReLU(inplace=True),
        ))

    def forward(self, x):
        return self.model(x)


class MedLAM(nn.Module):
    def __init__(self, config: MedLAMConfig = CONFIGS["reference"]):
        super().__init__()
        if config.patch_size % 16:
            raise ValueError("patch_size must be a multiple of 16")
        self.config = config
        b = config.base_channels
        self.conv0_1, self.conv0_2 = ConvBlock(1, 2 * b), ConvBlock(2 * b, 2 * b)
        self.conv1_1, self.conv1_2 = ConvBlock(2 * b, 2 * b), ConvBlock(2 * b, 2 * b)
        self.conv2_1, self.conv2_2 = ConvBlock(2 * b, 2 * b), ConvBlock(2 * b, 4 * b)
        self.conv3_1, self.conv3_2 = ConvBlock(4 * b, 4 * b), ConvBlock(4 * b, 8 * b)
        self.conv4_1, self.conv4_2 = ConvBlock(8 * b, 8 * b), ConvBlock(8 * b, 16 * b)
        self.dropout = nn.Dropout(config.dropout)
        self.pool = nn.MaxPool3d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv5_1, self.conv5_2 = ConvBlock(24 * b, 8 * b), ConvBlock(8 * b, 8 * b)
        self.conv6_1, self.conv6_2 = ConvBlock(12 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        self.conv7_1, self.conv7_2 = ConvBlock(6 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        if config.full_resolution_decoder:
            self.conv8_1, self.conv8_2 = ConvBlock(6 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        if config.classification_head:
            self.classification = nn.Sequential(nn.Conv3d(4 * b, 3, kernel_size=1), nn.Sigmoid())
        flat = 16 * b * (config.patch_size // 16) ** 3
        self.fc1 = nn.Linear(flat, 8 * b)
        self.fc2 = nn.Linear(8 * b, 4 * b)
        self.fc3 = nn.Linear(4 * b, 3)

    def encode(self, x):
        c0 = self.conv0_2(self.conv0_1(x))
        c1 = self.conv1_2(self.conv1_1(self.pool(c0)))
        c2 = self.conv2_2(self.conv2_1(self.pool(c1)))
        c3 = self.conv3_2(self.conv3_1(self.pool(c2)))
        c4 = self.dropout(self.conv4_2(self.conv4_1(self.pool(c3))))
        return c0, c1, c2, c3, c4

    def position(self, bottleneck):
        """Latent anatomical coordinate (a0, a1, a2 = S, A, L axes), shape [B, 3]."""
        return self.fc3(self.fc2(self.fc1(bottleneck.flatten(1))))

    def forward(self, x, *, features: bool = True, position: bool = True) -> dict:
        """``x``: [B, 1, P, P, P] in [0, 1]. Returns ``position`` [B, 3] and/or ``features``:
        a list of decoder maps [B, 4b, P/s, P/s, P/s] for s in ``config.feature_scales``."""
        c0, c1, c2, c3, c4 = self.encode(x)
        out = {}
        if position:
            out["position"] = self.position(c4)
        if features:
            d5 = self.conv5_2(self.conv5_1(torch.cat([self.up(c4), c3], 1)))
            f4 = self.conv6_2(self.conv6_1(torch.cat([self.up(d5), c2], 1)))
            f2 = self.conv7_2(self.conv7_1(torch.cat([self.up(f4), c1], 1)))
            maps = [f4, f2]
            if self.config.full_resolution_decoder:
                maps.append(self.conv8_2(self.conv8_1(torch.cat([self.up(f2), c0], 1))))
            out["features"] = maps
        return out


def strip_data_parallel(state_dict: dict) -> dict:
    """Remove DataParallel's ``module.`` prefix (the authors' checkpoint has it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)
