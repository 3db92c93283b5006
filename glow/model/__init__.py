"""The model: invertible layers, the multi-scale Glow with learned priors, the likelihood
contract (quantization, dequantization, bits/dim), sampling, and fast paths that change no result."""

from glow.model.glow import Glow, GlowConfig

__all__ = ["Glow", "GlowConfig"]
