"""Invertible layers of Glow (Kingma & Dhariwal 2018).

Every layer maps `x -> (y, logdet)` with one log-determinant per sample (shape (B,)) and
has an exact inverse `reverse(y) -> x`. Log-determinants, priors and the 1x1-conv weight
are computed in the parameters' precision (float32, or float64 in tests) even under
autocast; only the coupling networks may run in reduced precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CouplingNet",
    "FlowStep",
    "InvConv2d",
    "InvConv2dLU",
    "ZeroConv2d",
    "gaussian_log_density",
    "hidden_layers",
    "set_actnorm_reducer",
    "squeeze",
    "unsqueeze",
]

LOG_2PI = math.log(2 * math.pi)

# (mean, mean of squares) per channel -> the same, reduced over whatever the caller
# chooses. The default is local; distributed training installs an all-reduce so that
# every rank initializes ActNorm from the statistics of the global first batch.
StatsReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _local_stats(mean: torch.Tensor, sq_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mean, sq_mean


def set_actnorm_reducer(module: nn.Module, reducer: StatsReducer | None) -> None:
    """Install `reducer` (None: local statistics) on every ActNorm inside `module`."""
    for child in module.modules():
        if isinstance(child, ActNorm):
            child.reducer = reducer or _local_stats


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(x; mean, exp(log_std)^2), summed over all but the batch dim."""
    ll = -0.5 * (LOG_2PI + 2.0 * log_std + (x - mean) ** 2 * torch.exp(-2.0 * log_std))
    return ll.flatten(1).sum(1)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `squeeze`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel affine normalization with data-dependent initialization.

    The first forward pass on an uninitialized layer sets `loc` and `log_scale` so that
    the batch comes out with zero mean and unit variance per channel. The flag lives in
    the state dict, so loading a trained model never re-initializes it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.eps = eps
        self.reducer: StatsReducer = _local_stats

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.to(self.loc.dtype)
        mean = x.mean(dim=(0, 2, 3))
        sq_mean = (x * x).mean(dim=(0, 2, 3))
        mean, sq_mean = self.reducer(mean, sq_mean)
        std = torch.sqrt(torch.clamp(sq_mean - mean * mean, min=0.0))
        self.loc.copy_(-mean.view_as(self.loc))
        self.log_scale.copy_(-torch.log(std + self.eps).view_as(self.log_scale))
        self.initialized.fill_(1)

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        return (h * w * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Under torch.compile the check is skipped (a data-dependent branch breaks the graph):
        # initialize before compiling (glow.model.performance does).
        if not torch.compiler.is_compiling() and not self.initialized:
            self.initialize(x)
        y = (x + self.loc) * torch.exp(self.log_scale)
        return y, self._logdet(x)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.loc


class InvConv2d(nn.Module):
    """Invertible 1x1 convolution with a dense weight (log-determinant by slogdet)."""

    def __init__(self, num_channels: int):
        super().__init__()
        weight = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(x.device.type):
            x = x.to(self.weight.dtype)
            y = F.conv2d(x, self.weight[:, :, None, None])
            logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1]
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        with _no_autocast(y.device.type):
            inverse = torch.linalg.inv(self.weight)
            return F.conv2d(y.to(inverse.dtype), inverse[:, :, None, None])


class InvConv2dLU(nn.Module):
    """Invertible 1x1 convolution in LU form: W = P L (U + diag(sign(s) exp(log|s|))).

    P is a fixed permutation, L is lower triangular with unit diagonal, U strictly upper
    triangular. log|det W| = sum(log|s|), so the log-determinant costs O(C).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        weight = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        p, lower, upper = torch.linalg.lu(weight)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones_like(weight), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> torch.Tensor:
        cached = self._cached("weight")
        if cached is not None:
            return cached
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(x.device.type):
            weight = self.weight()
            x = x.to(weight.dtype)
            y = F.conv2d(x, weight[:, :, None, None])
            logdet = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        with _no_autocast(y.device.type):
            inverse = self._cached("inverse")
            if inverse is None:
                inverse = torch.linalg.inv(self.weight())
            return F.conv2d(y.to(inverse.dtype), inverse[:, :, None, None])

    # -- evaluation cache (glow.model.performance.cached_weights) ---------------------------------
    def _versions(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in (self.lower, self.upper, self.log_s))

    def cache_weights(self) -> None:
        """Precompute W and W^-1. Used only while autograd is off and the parameters are
        unchanged (checked by version counter), so training never sees a stale weight."""
        with torch.no_grad():
            self.clear_cache()
            weight = self.weight()
            self._cache = {"weight": weight, "inverse": torch.linalg.inv(weight), "versions": self._versions()}

    def clear_cache(self) -> None:
        self.__dict__.pop("_cache", None)

    def _cached(self, name: str) -> torch.Tensor | None:
        cache = self.__dict__.get("_cache")
        if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        if cache["versions"] != self._versions():
            return None
        return cache[name]


class ZeroConv2d(nn.Module):
    """Convolution whose weight, bias and per-channel log-scale start at zero.

    Its output is exactly zero at initialization, which makes a fresh coupling layer
    the identity and a fresh prior a standard normal.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, scale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.scale_factor)


class CouplingNet(nn.Sequential):
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialized conv3x3.

    `actnorm=True` inserts ActNorm after each hidden convolution (as in the original Glow).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, actnorm: bool = False):
        super().__init__(*hidden_layers(in_channels, hidden_channels, actnorm), ZeroConv2d(hidden_channels, out_channels))


def hidden_layers(in_channels: int, hidden_channels: int, actnorm: bool = False) -> list[nn.Module]:
    """conv3x3 -> [ActNorm] -> ReLU -> conv1x1 -> [ActNorm] -> ReLU, weights N(0, 0.05^2).

    The hidden part of every coupling network (plain and bottleneck).
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=not actnorm)]
    if actnorm:
        layers.append(_ActNormNet(hidden_channels))
    layers += [nn.ReLU(inplace=True), nn.Conv2d(hidden_channels, hidden_channels, 1, bias=not actnorm)]
    if actnorm:
        layers.append(_ActNormNet(hidden_channels))
    layers.append(nn.ReLU(inplace=True))
    for module in layers:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.05)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return layers


class _ActNormNet(ActNorm):
    """ActNorm inside a coupling network: a plain layer, its log-determinant unused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def split_shift_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A coupling net's output -> (shift t, scale s = sigmoid(raw + 2)), interleaved channels.

    The +2 starts every scale near sigmoid(2) = 0.88 (Glow's choice); the one definition used
    by every coupling and by the latents figure.
    """
    return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)


class AffineCoupling(nn.Module):
    """Channel-split coupling: y_a = x_a, y_b = (x_b + t(x_a)) * s(x_a).

    affine:   s = sigmoid(h + 2), logdet = sum log s;
    additive: s = 1, logdet = 0.
    """

    def __init__(self, num_channels: int, hidden_channels: int, affine: bool = True, actnorm: bool = False,
                 net: nn.Module | None = None):
        super().__init__()
        self.n_a = num_channels // 2
        n_b = num_channels - self.n_a
        self.affine = affine
        # `net` (n_a -> 2 n_b channels, or n_b if additive) replaces the default CouplingNet
        if net is None:
            net = CouplingNet(self.n_a, 2 * n_b if affine else n_b, hidden_channels, actnorm)
        self.net = net

    def _shift_scale(self, x_a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.net(x_a).to(dtype)
        if not self.affine:
            return h, None
        return split_shift_scale(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.n_a], x[:, self.n_a :]
        shift, scale = self._shift_scale(x_a, x.dtype)
        with _no_autocast(x.device.type):
            if scale is None:
                return torch.cat([x_a, x_b + shift], 1), x.new_zeros(x.shape[0])
            y_b = (x_b + shift) * scale
            logdet = torch.log(scale).flatten(1).sum(1)
        return torch.cat([x_a, y_b], 1), logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.n_a], y[:, self.n_a :]
        shift, scale = self._shift_scale(y_a, y.dtype)
        with _no_autocast(y.device.type):
            x_b = y_b - shift if scale is None else y_b / scale - shift
        return torch.cat([y_a, x_b], 1)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> invertible 1x1 conv -> coupling.

    `coupling` (any layer `x -> (y, logdet)` with `reverse`, e.g. from `glow.model.couplings`)
    replaces the default channel-split `AffineCoupling`.
    """

    def __init__(
        self,
        num_channels: int,
        hidden_channels: int,
        affine: bool = True,
        lu: bool = True,
        coupling_actnorm: bool = False,
        coupling: nn.Module | None = None,
    ):
        super().__init__()
        self.actnorm = ActNorm(num_channels)
        self.invconv = InvConv2dLU(num_channels) if lu else InvConv2d(num_channels)
        self.coupling = coupling if coupling is not None else AffineCoupling(
            num_channels, hidden_channels, affine, coupling_actnorm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.invconv(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.reverse(y)
        y = self.invconv.reverse(y)
        return self.actnorm.reverse(y)
