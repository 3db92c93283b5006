"""RealNVP on vectors: the flow Kirichenko, Izmailov & Wilson (2020, section 8) train on image
embeddings (`RealNVPTabular` in the authors' code, github.com/PolinaKirichenko/flows_ood).

A stack of ``n_couplings`` affine couplings with fully connected networks. Coupling ``i`` splits
the vector at ``dim // 2``; even couplings keep the first half and transform the second, odd
couplings the reverse (the authors' ``MaskTabular(reverse_mask=bool(i % 2))``):

    y_keep   = x_keep
    y_change = (x_change + t(x_keep)) * exp(s(x_keep)),   s = scale * tanh(s_raw)
    logdet   = sum(s)

The net is Linear(keep -> width) -> ReLU [-> Dropout], then ``hidden_layers - 1`` times
Linear(width -> width) -> ReLU, then a zero-initialised Linear(width -> 2 * change) giving
(s_raw, t): a fresh flow is the identity, as in Glow. ``scale`` is one learned factor per
transformed coordinate, initialised to 1 (the authors' weight-normed ``RescaleTabular``: for a
vector weight norm reduces to exactly this). The prior is N(0, I) (the authors') or a learned
diagonal Gaussian.

Differences from the authors' module, none of which changes the family of functions:
their net takes the whole vector with the transformed half zeroed and outputs 2 * dim numbers
of which the masked ones are discarded; here it takes and outputs only the halves that matter.
Their zero initialisation of the last layer is an option (``--init_zeros``, off by default);
here it is always on. ``input_actnorm`` (an ActNorm with data-dependent initialisation on the
input, standardising each feature) is not in their model and is off by default.

Interface as `glow.model.Glow` where the trainer, checkpoints and evaluation use it:
``config`` (`glow.model.tabular_config.TabularFlowConfig`, importable without torch) with
``hash()``, ``to_dict()``, ``from_dict()``, ``n_dims``; ``log_prob`` (per sample,
nats; also ``forward``, which DDP calls); ``forward_flow`` -> (latents, logdet, log priors);
``encode``/``decode``; ``sample``/``sample_from_noise`` at a temperature; ``latent_shapes``.
"""

from __future__ import annotations

import torch
from torch import nn

from glow.model.flows import ActNorm, gaussian_log_density
from glow.model.tabular_config import TabularFlowConfig

__all__ = ["TabularCoupling", "TabularFlow"]


_RELATIVE_EPS = 1e-6  # the floor of a feature's standard deviation, relative to the features' scale


class _VectorActNorm(ActNorm):
    """`glow.model.flows.ActNorm` on (B, D) vectors: the same parameters, initialisation flag
    and statistics reducer (so distributed training initialises it as it does Glow's).

    Features come in any units (a randomly initialised extractor gives features of ~1e-8), so
    every trained number is kept in standardised units: ``y = x * exp(log_scale) + loc``, with
    ``loc`` the shift *after* scaling (initialised to ``-mean * scale``). An optimizer such as
    Adam moves a parameter by about its learning rate per step whatever the parameter's scale,
    which would wipe out a shift held in the features' own units (1e-8) in one step.

    The floor added to each feature's standard deviation is ActNorm's 1e-6, or `_RELATIVE_EPS`
    times the features' typical spread (the root of their mean variance, over all ranks) when
    that is smaller, for the same reason. A constant feature still gets a finite scale."""

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.to(self.loc.dtype)
        mean, sq_mean = self.reducer(x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3)))
        spread = float(torch.clamp(sq_mean - mean * mean, min=0.0).mean().sqrt())
        if spread > 0:
            self.eps = min(self.eps, _RELATIVE_EPS * spread)
        super().initialize(x)
        self.loc.mul_(torch.exp(self.log_scale))  # -mean * scale: the shift in standardised units

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not torch.compiler.is_compiling() and not self.initialized:
            self.initialize(x[:, :, None, None])
        loc, log_scale = self.loc[:, :, 0, 0], self.log_scale[:, :, 0, 0]
        return x * torch.exp(log_scale) + loc, log_scale.sum().expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.loc[:, :, 0, 0]) * torch.exp(-self.log_scale[:, :, 0, 0])


class TabularCoupling(nn.Module):
    """One affine coupling on vectors (see the module docstring); ``reverse_mask`` keeps the
    second half and transforms the first."""

    def __init__(self, dim: int, hidden_width: int, hidden_layers: int, reverse_mask: bool, dropout: float = 0.0):
        super().__init__()
        self.split = dim // 2
        self.reverse_mask = reverse_mask
        n_keep = dim - self.split if reverse_mask else self.split
        self.n_change = dim - n_keep
        layers: list[nn.Module] = [nn.Linear(n_keep, hidden_width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden_width, hidden_width), nn.ReLU()]
        last = nn.Linear(hidden_width, 2 * self.n_change)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(torch.ones(self.n_change))

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, changed) parts of x."""
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.reverse_mask else (first, second)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([changed, kept] if self.reverse_mask else [kept, changed], 1)

    def _log_scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(kept)
        return self.scale * torch.tanh(h[:, : self.n_change]), h[:, self.n_change :]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = self._halves(x)
        log_s, t = self._log_scale_shift(kept)
        return self._join(kept, (changed + t) * torch.exp(log_s)), log_s.sum(1)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, changed = self._halves(y)
        log_s, t = self._log_scale_shift(kept)
        return self._join(kept, changed * torch.exp(-log_s) - t)


class TabularFlow(nn.Module):
    """RealNVP on (B, dim) vectors with an exact per-sample log-density (see the module docstring)."""

    def __init__(self, config: TabularFlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.input_norm = _VectorActNorm(config.dim) if config.input_actnorm else None
        self.couplings = nn.ModuleList(
            TabularCoupling(config.dim, config.hidden_width, config.hidden_layers, bool(i % 2), config.dropout)
            for i in range(config.n_couplings)
        )
        loc, log_scale = torch.zeros(1, config.dim), torch.zeros(1, config.dim)
        if config.prior == "diagonal":
            self.prior_loc, self.prior_log_scale = nn.Parameter(loc), nn.Parameter(log_scale)
        else:
            self.register_buffer("prior_loc", loc)
            self.register_buffer("prior_log_scale", log_scale)
        self.latent_shapes: list[tuple[int, ...]] = [(config.dim,)]

    @property
    def input_shape(self) -> tuple[int]:
        return (self.config.dim,)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected input of shape (B, {self.config.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point vectors, got {x.dtype}")

    # -- density -----------------------------------------------------------------------
    def forward_flow(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """x -> ([z], sum of log-determinants, [log prior density of z]), all per sample."""
        self._check_input(x)
        z = x.to(self.prior_loc.dtype)
        logdet = z.new_zeros(z.shape[0])
        if self.input_norm is not None:
            z, logdet = self.input_norm(z)
            logdet = logdet.to(z.dtype)
        for coupling in self.couplings:
            z, ld = coupling(z)
            logdet = logdet + ld
        log_prior = gaussian_log_density(z, self.prior_loc, self.prior_log_scale)
        return [z], logdet, [log_prior]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample log p(x) in nats (a density of real vectors: no dequantization term)."""
        _, logdet, log_priors = self.forward_flow(x)
        return logdet + log_priors[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x -> [z]; `decode` inverts it exactly."""
        return self.forward_flow(x)[0]

    # -- inverse -----------------------------------------------------------------------
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z -> x, the inverse of the flow (prior excluded)."""
        if z.dim() != 2 or z.shape[1] != self.config.dim:
            raise ValueError(f"expected latents of shape (B, {self.config.dim}), got {tuple(z.shape)}")
        x = z.to(self.prior_loc.dtype)
        for coupling in reversed(self.couplings):
            x = coupling.reverse(x)
        if self.input_norm is not None:
            x = self.input_norm.reverse(x)
        return x

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `encode`."""
        if len(latents) != 1:
            raise ValueError(f"expected 1 latent, got {len(latents)}")
        return self.inverse(latents[0])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n vectors drawn with the prior's standard deviation scaled by ``temperature``."""
        device = generator.device if generator is not None else self.prior_loc.device
        noise = torch.randn((n, self.config.dim), generator=generator, dtype=self.prior_loc.dtype, device=device)
        return self.sample_from_noise([noise], temperature)

    @torch.no_grad()
    def sample_from_noise(self, noise: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """x = inverse(mean + temperature * std * noise), noise standard normal (B, dim) in a list
        of one, as `Glow.sample_from_noise` takes one tensor per latent."""
        eps = noise[0].to(device=self.prior_loc.device, dtype=self.prior_loc.dtype)
        return self.inverse(self.prior_loc + temperature * torch.exp(self.prior_log_scale) * eps)
