"""Multi-scale Glow with a learned prior and exact per-sample log-likelihood.

Structure for `n_levels` L and `steps_per_level` K:

    for each level: squeeze -> K x FlowStep -> split (all but the last level)

Each split keeps half of the channels and factors out the other half, whose prior is a
Gaussian conditioned on the kept half. The top latent has a learned prior. The model works
in "y space" (dequantized pixels in [-0.5, 0.5), see `glow.model.likelihood`); everything about
data and bits per dimension lives outside this module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glow.model.config import GlowConfig
from glow.model.couplings import make_coupling
from glow.model.flows import (
    FlowStep,
    ZeroConv2d,
    gaussian_log_density,
    squeeze,
    unsqueeze,
)

__all__ = ["Glow", "GlowConfig", "SplitPrior"]

class SplitPrior(nn.Module):
    """Gaussian prior of the factored-out half, conditioned on the kept half."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.n_keep = num_channels // 2
        self.conv = ZeroConv2d(self.n_keep, 2 * (num_channels - self.n_keep))

    def mean_log_std(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(kept.device.type, enabled=False):  # priors stay in full precision
            h = self.conv(kept.to(self.conv.conv.weight.dtype))
        return h[:, 0::2], h[:, 1::2]


class Glow(nn.Module):
    def __init__(self, config: GlowConfig):
        super().__init__()
        config.validate()
        self.config = config
        # Runtime option (not architecture): recompute each flow step in the backward pass
        # instead of storing its activations. Set by glow.model.performance.apply_fast_paths.
        self.checkpoint_steps = False
        affine = config.coupling == "affine"
        channels = config.in_channels
        size = config.image_size
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for level in range(config.n_levels):
            channels, size = channels * 4, size // 2
            self.levels.append(
                nn.ModuleList(
                    FlowStep(channels, config.hidden_channels, affine, config.lu, config.coupling_actnorm,
                             coupling=self._coupling(channels, size, index))
                    for index in range(config.steps_per_level)
                )
            )
            if level < config.n_levels - 1:
                self.priors.append(SplitPrior(channels))
                self.latent_shapes.append((channels - channels // 2, size, size))
                channels = channels // 2
        self.latent_shapes.append((channels, size, size))
        top = torch.zeros(1, 2 * channels, size, size)
        if config.learn_top:
            self.top_prior = nn.Parameter(top)
        else:
            self.register_buffer("top_prior", top)

    def _coupling(self, channels: int, size: int, index: int) -> nn.Module | None:
        """Step `index`'s coupling; None (FlowStep's default, Glow's channel split) unless a variant is set."""
        c = self.config
        if c.mask == "channel" and c.coupling_bottleneck == 0:
            return None
        return make_coupling(channels, c.hidden_channels, mask=c.mask, index=index, affine=c.coupling == "affine",
                             actnorm=c.coupling_actnorm, bottleneck=c.coupling_bottleneck, size=(size, size))

    # -- shapes and checks -------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def _check_input(self, y: torch.Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected input of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(y.shape)}"
            )
        if not y.is_floating_point():
            raise ValueError(f"expected a floating-point input (dequantized pixels), got {y.dtype}")

    def _top_mean_log_std(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.top_prior.expand(batch, -1, -1, -1)
        return h[:, 0::2], h[:, 1::2]

    # -- density -----------------------------------------------------------------------
    def forward_flow(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """y -> (latents, sum of log-determinants, log prior density of each latent).

        All per sample. Latents are ordered from the first split to the top.
        """
        self._check_input(y)
        dtype = self.top_prior.dtype
        x = y.to(dtype)
        logdet = x.new_zeros(x.shape[0])
        latents, log_priors = [], []
        for level, steps in enumerate(self.levels):
            x = squeeze(x)
            for step in steps:
                if self.checkpoint_steps and torch.is_grad_enabled():  # glow.model.performance
                    x, ld = checkpoint(step, x, use_reentrant=False, preserve_rng_state=False)
                else:
                    x, ld = step(x)
                logdet = logdet + ld
            if level < len(self.priors):
                prior = self.priors[level]
                kept, factored = x[:, : prior.n_keep], x[:, prior.n_keep :]
                mean, log_std = prior.mean_log_std(kept)
                log_priors.append(gaussian_log_density(factored, mean, log_std))
                latents.append(factored)
                x = kept
        mean, log_std = self._top_mean_log_std(x.shape[0])
        log_priors.append(gaussian_log_density(x, mean, log_std))
        latents.append(x)
        return latents, logdet, log_priors

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample log p_y(y) in nats: log N(z; prior) + sum of log-determinants."""
        _, logdet, log_priors = self.forward_flow(y)
        return logdet + torch.stack(log_priors).sum(0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.log_prob(y)

    def encode(self, y: torch.Tensor) -> list[torch.Tensor]:
        """y -> every latent (one per split plus the top); `decode` inverts it exactly."""
        return self.forward_flow(y)[0]

    # -- inverse -----------------------------------------------------------------------
    def _reverse(self, top: torch.Tensor, factored) -> torch.Tensor:
        """Run the flow backwards from the top latent.

        `factored(level, kept)` returns the factored-out latent of that level.
        """
        x = top
        for level in reversed(range(len(self.levels))):
            if level < len(self.priors):
                x = torch.cat([x, factored(level, x)], 1)
            for step in reversed(self.levels[level]):
                x = step.reverse(x)
            x = unsqueeze(x)
        return x

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `encode`."""
        if len(latents) != len(self.latent_shapes):
            raise ValueError(f"expected {len(self.latent_shapes)} latents, got {len(latents)}")
        for z, shape in zip(latents, self.latent_shapes):
            if tuple(z.shape[1:]) != shape:
                raise ValueError(f"latent of shape {tuple(z.shape)} does not match (B, {shape})")
        return self._reverse(latents[-1], lambda level, kept: latents[level])

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw n samples in y space, every prior standard deviation scaled by `temperature`."""
        noise_device = generator.device if generator is not None else self.top_prior.device
        noise = [
            torch.randn((n, *shape), generator=generator, dtype=self.top_prior.dtype, device=noise_device)
            for shape in self.latent_shapes
        ]
        return self.sample_from_noise(noise, temperature)

    @torch.no_grad()
    def sample_from_noise(self, noise: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """Samples from standard-normal noise, one tensor per latent (ordered as `encode`).

        z = mean + temperature * std * noise, level by level from the top. Per-sample noise
        makes a sample independent of the batch it is drawn in.
        """
        device, dtype = self.top_prior.device, self.top_prior.dtype
        noise = [eps.to(device=device, dtype=dtype) for eps in noise]

        def draw(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            return mean + temperature * torch.exp(log_std) * eps

        def factored(level: int, kept: torch.Tensor) -> torch.Tensor:
            return draw(*self.priors[level].mean_log_std(kept), noise[level])

        top = draw(*self._top_mean_log_std(noise[-1].shape[0]), noise[-1])
        return self._reverse(top, factored)
