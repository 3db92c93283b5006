"""The model: invertible layers, the multi-scale Glow with learned priors, the likelihood
contract (quantization, dequantization, bits/dim), sampling, and fast paths that change no result;
and the flow on feature vectors (`model.kind: tabular`, `glow.model.tabular`).

`GlowConfig`, `TabularFlowConfig` and `model_config` import without torch; `Glow`,
`TabularFlow` and `build_model` (and everything else here) need it.
"""

from __future__ import annotations

from glow.model.config import GlowConfig
from glow.model.tabular_config import TabularFlowConfig

__all__ = ["MODEL_CONFIGS", "Glow", "GlowConfig", "TabularFlow", "TabularFlowConfig", "build_model", "model_config"]

MODEL_CONFIGS = {"glow": GlowConfig, "tabular": TabularFlowConfig}  # model.kind -> its architecture config


def model_config(values: dict) -> GlowConfig | TabularFlowConfig:
    """The architecture config of ``values`` (a checkpoint's ``model_config``) by its ``kind``;
    without one (checkpoints that predate kinds) a Glow. ValueError for an unknown kind or field."""
    kind = values.get("kind", "glow")
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[kind].from_dict(values)


def build_model(config: GlowConfig | TabularFlowConfig):
    """A fresh model of ``config``'s kind: `Glow` or `TabularFlow`."""
    if isinstance(config, TabularFlowConfig):
        from glow.model.tabular import TabularFlow

        return TabularFlow(config)
    from glow.model.glow import Glow

    return Glow(config)


def __getattr__(name: str):
    if name == "Glow":
        from glow.model.glow import Glow

        return Glow
    if name == "TabularFlow":
        from glow.model.tabular import TabularFlow

        return TabularFlow
    raise AttributeError(f"module 'glow.model' has no attribute {name!r}")
