"""glow-ood: Glow normalizing flows for out-of-distribution studies (Kirichenko, Izmailov & Wilson 2020).

The public API, imported on first use (PEP 562), so that ``import glow`` and the torch-free
parts (``glow.report``, ``glow.config``) stay light:

    Glow, GlowConfig     the model and its architecture config (glow.model)
    Config, load_config  the training config: defaults <- YAML file or shipped name <- overrides
    load_model           a checkpoint's model and meta.json (glow.checkpoint)
    ood_metrics          AUROC, AUPR and FPR at 95% TPR of OOD scores (glow.report.metrics)
    __version__          the installed distribution's version (glow-ood)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Config", "Glow", "GlowConfig", "__version__", "load_config", "load_model", "ood_metrics"]

_EXPORTS = {
    "Glow": "glow.model",
    "GlowConfig": "glow.model",
    "Config": "glow.config",
    "load_config": "glow.config",
    "load_model": "glow.checkpoint",
    "ood_metrics": "glow.report.metrics",
}

if TYPE_CHECKING:
    from glow.checkpoint import load_model
    from glow.config import Config, load_config
    from glow.model import Glow, GlowConfig
    from glow.report.metrics import ood_metrics

    __version__: str


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("glow-ood")
        except PackageNotFoundError:  # a checkout on sys.path, never installed
            return "0+unknown"
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'glow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
