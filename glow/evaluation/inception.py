"""The FID Inception network: torchvision's InceptionV3 trunk with the four FID blocks.

FID is defined by the TensorFlow Inception graph of 2015-12-05, whose average pools skip the
padded zeros and whose last block max-pools. pytorch-fid ported it to PyTorch as
torchvision's ``Inception3`` with four blocks patched (``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1``, ``FIDInceptionE_2``); the weights file
``pt_inception-2015-12-05-6726825d.pth`` holds that network's state dict. The trunk and the
unpatched blocks come from torchvision (kept, public API); the four patched forwards are
written here after pytorch-fid 0.3.0's (Maximilian Seitzer, Apache License 2.0), so the
network no longer depends on pytorch-fid's private ``_inception_v3``. Same modules, same
order, same operations: the features are bitwise equal to pytorch-fid's
(``tests/test_fid.py`` checks it, with pytorch-fid installed by the test extra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

__all__ = ["FID_WEIGHTS_URL", "Pool3", "fid_inception_v3"]

# Where the weights file is published (printed in the error that says how to fetch it; never downloaded here).
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool: the padded zeros do not count in the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """InceptionE with TensorFlow's pooling: ``max_pool`` False for Mixed_7b (average pool
    without the padded zeros), True for Mixed_7c (the FID graph max-pools there)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


def fid_inception_v3() -> Inception3:
    """The FID Inception network with untrained weights; its state dict has exactly the keys of
    the weights file (1008 classes, no auxiliary head)."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


class Pool3(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> [pool3 features (B, 2048, 1, 1)], as pytorch-fid's
    ``InceptionV3([3], resize_input=True, normalize_input=True)``: bilinear resize to 299x299,
    scale to [-1, 1], the trunk up to Mixed_7c, global average pool."""

    def __init__(self, net: Inception3):
        super().__init__()
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool(),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool(),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return [self.blocks(2 * x - 1)]
