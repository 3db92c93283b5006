"""Coupling variants of Kirichenko, Izmailov & Wilson (2020), section 7: masks and a bottleneck.

Glow's coupling splits the channels in two halves (`mask="channel"`, `glow.model.flows.AffineCoupling`).
The paper shows that couplings learn to copy local pixel correlations from the unchanged half
and asks what changes when the split and the coupling network change. This module adds:

Spatial masks (`MaskedCoupling`), shared by every channel:
    the coupling net sees exactly the unchanged positions, `x * m_in` (all other positions zeroed),
    and only the positions of `m_out` (disjoint from `m_in`) are transformed:
        y = x                          where m_out = 0
        y = (x + t(x * m_in)) * s(.)   where m_out = 1      (affine; additive: s = 1)
    logdet = sum of log s over the positions of m_out. Triangular Jacobian: exact and invertible.

  * ``checkerboard`` (RealNVP, Dinh et al. 2017): m_in = {(i + j) % 2 == p}, m_out = 1 - m_in;
    the parity p alternates between successive steps of a level.
  * ``cycle`` (the paper's cycle-mask, its figure 13 and `MaskQuadrant` in the authors' code,
    github.com/PolinaKirichenko/flows_ood): the (squeezed) feature map is split into four
    contiguous quadrants of size h/2 x w/2, numbered clockwise 0 = top-left, 1 = top-right,
    2 = bottom-right, 3 = bottom-left. Step k of a level transforms quadrant (k + 1) % 4 from
    quadrant k % 4; the two other quadrants pass unchanged. Information from a quadrant has to
    go through four couplings before it reaches the same quadrant again (no co-adaptation of
    successive couplings). The paper uses it in a RealNVP without squeeze; here it is applied
    within each level of Glow (no squeeze between the couplings of a level). With Glow's small
    coupling net (receptive field 5x5) only a band near the quadrant border gets
    input-dependent s, t; elsewhere they reduce to learned constants per channel.
  * ``cycle_patch``: an alternative reading of "quadrants": the four positions of every 2x2
    patch (0 = (0,0), 1 = (0,1), 2 = (1,1), 3 = (1,0)), cycled the same way. It keeps the local
    neighbourhood in the net's input; not what the authors' code does.

Bottleneck (`coupling_bottleneck = l > 0`, the paper's st-network with an l-dimensional latent,
`ResNetAE` in the authors' code): the hidden map of the coupling net (hidden x H x W) is flattened
and passed through Linear(hidden*H*W -> l) and Linear(l -> hidden*H*W) before the last (zero)
convolution, so s and t are functions of l numbers that summarize the whole unchanged part; the
coupling cannot copy local detail through more than l numbers. Cost: 2 * l * hidden * H * W
weights per coupling.
"""

from __future__ import annotations

import torch
from torch import nn

from glow.model.config import MASKS, SPATIAL_MASKS
from glow.model.flows import (
    AffineCoupling,
    CouplingNet,
    ZeroConv2d,
    _no_autocast,
    hidden_layers,
    split_shift_scale,
)

__all__ = ["MASKS", "SPATIAL_MASKS", "BottleneckCouplingNet", "MaskedCoupling", "make_coupling", "spatial_masks"]

_PATCH_POSITIONS = ((0, 0), (0, 1), (1, 1), (1, 0))  # clockwise, like the quadrants


def _quadrant(q: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    top, left = (slice(0, h // 2), slice(h // 2, h)), (slice(0, w // 2), slice(w // 2, w))
    rows = top[0] if q in (0, 1) else top[1]
    cols = left[0] if q in (0, 3) else left[1]
    m[rows, cols] = 1.0
    return m


def _patch_position(q: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    r, c = _PATCH_POSITIONS[q]
    m[r::2, c::2] = 1.0
    return m


def spatial_masks(kind: str, index: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_in, m_out), each (1, 1, h, w) in {0, 1}, for step `index` of a level."""
    if kind == "checkerboard":
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        m_in = ((ii + jj) % 2 == index % 2).float()
        m_out = 1.0 - m_in
    elif kind in ("cycle", "cycle_patch"):
        build = _quadrant if kind == "cycle" else _patch_position
        m_in, m_out = build(index % 4, h, w), build((index + 1) % 4, h, w)
    else:
        raise ValueError(f"unknown spatial mask {kind!r}; choose one of {SPATIAL_MASKS}")
    return m_in.view(1, 1, h, w), m_out.view(1, 1, h, w)


class BottleneckCouplingNet(nn.Module):
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> Linear(hidden*H*W, l) -> Linear(l, hidden*H*W)
    -> ReLU -> zero-initialized conv3x3 (the whole map passes through l numbers)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, bottleneck: int,
                 size: tuple[int, int], actnorm: bool = False):
        super().__init__()
        h, w = size
        self.encoder = nn.Sequential(*hidden_layers(in_channels, hidden_channels, actnorm))
        self.bottleneck = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(hidden_channels * h * w, bottleneck),
            nn.Linear(bottleneck, hidden_channels * h * w),
            nn.Unflatten(1, (hidden_channels, h, w)),
            nn.ReLU(inplace=True),
        )
        self.out = ZeroConv2d(hidden_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bottleneck(self.encoder(x)))


class MaskedCoupling(nn.Module):
    """Coupling with a spatial mask (see the module docstring): y = x off m_out, affine on m_out."""

    def __init__(self, num_channels: int, hidden_channels: int, kind: str, index: int, affine: bool = True,
                 actnorm: bool = False, bottleneck: int = 0, size: tuple[int, int] | None = None):
        super().__init__()
        if kind not in SPATIAL_MASKS:
            raise ValueError(f"unknown spatial mask {kind!r}; choose one of {SPATIAL_MASKS}")
        self.kind, self.index, self.affine = kind, index, affine
        out = 2 * num_channels if affine else num_channels
        self.net = _net(num_channels, out, hidden_channels, actnorm, bottleneck, size)
        self._masks: dict = {}

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.shape[2], x.shape[3], x.device, x.dtype)
        if key not in self._masks:
            m_in, m_out = spatial_masks(self.kind, self.index, x.shape[2], x.shape[3])
            self._masks[key] = (m_in.to(x.device, x.dtype), m_out.to(x.device, x.dtype).bool())
        return self._masks[key]

    def _shift_scale(self, x: torch.Tensor, m_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.net(x * m_in).to(x.dtype)
        if not self.affine:
            return h, None
        return split_shift_scale(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m_in, m_out = self.masks(x)
        shift, scale = self._shift_scale(x, m_in)
        with _no_autocast(x.device.type):
            if scale is None:
                return torch.where(m_out, x + shift, x), x.new_zeros(x.shape[0])
            y = torch.where(m_out, (x + shift) * scale, x)
            log_scale = torch.where(m_out, torch.log(scale), torch.zeros_like(scale))
        return y, log_scale.flatten(1).sum(1)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        m_in, m_out = self.masks(y)
        shift, scale = self._shift_scale(y, m_in)  # y * m_in == x * m_in: those positions are unchanged
        with _no_autocast(y.device.type):
            if scale is None:
                return torch.where(m_out, y - shift, y)
            return torch.where(m_out, y / scale - shift, y)


def _net(in_channels: int, out_channels: int, hidden: int, actnorm: bool, bottleneck: int,
         size: tuple[int, int] | None) -> nn.Module:
    """The coupling network: Glow's `CouplingNet`, or `BottleneckCouplingNet` when bottleneck > 0."""
    if bottleneck <= 0:
        return CouplingNet(in_channels, out_channels, hidden, actnorm)
    if size is None:
        raise ValueError("a coupling bottleneck needs the spatial size (H, W) of the level")
    return BottleneckCouplingNet(in_channels, out_channels, hidden, bottleneck, size, actnorm)


def make_coupling(num_channels: int, hidden_channels: int, *, mask: str = "channel", index: int = 0,
                  affine: bool = True, actnorm: bool = False, bottleneck: int = 0,
                  size: tuple[int, int] | None = None) -> nn.Module:
    """The coupling of step `index` of a level with `num_channels` channels of spatial `size`."""
    if mask == "channel":
        net = None
        if bottleneck > 0:
            n_a = num_channels // 2
            n_b = num_channels - n_a
            net = _net(n_a, 2 * n_b if affine else n_b, hidden_channels, actnorm, bottleneck, size)
        return AffineCoupling(num_channels, hidden_channels, affine, actnorm, net=net)
    if mask not in SPATIAL_MASKS:
        raise ValueError(f"unknown coupling mask {mask!r}; choose one of {MASKS}")
    return MaskedCoupling(num_channels, hidden_channels, mask, index, affine, actnorm, bottleneck, size)
