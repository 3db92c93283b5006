"""The model: invertible layers, the multi-scale Glow with learned priors, the likelihood
contract (quantization, dequantization, bits/dim), sampling, and fast paths that change no result.

`GlowConfig` imports without torch; `Glow` (and everything else here) needs it.
"""

from glow.model.config import GlowConfig

__all__ = ["Glow", "GlowConfig"]


def __getattr__(name: str):
    if name == "Glow":
        from glow.model.glow import Glow

        return Glow
    raise AttributeError(f"module 'glow.model' has no attribute {name!r}")
