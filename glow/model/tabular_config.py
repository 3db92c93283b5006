"""`TabularFlowConfig`: the architecture of the RealNVP on vectors (`glow.model.tabular`), and
bits per dimension of continuous vectors; importable without torch, as `glow.model.config` is
(config files, run directories and reports read it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from glow.model.config import config_from_dict, config_hash

__all__ = ["KIND", "PRIORS", "TabularFlowConfig", "continuous_bits_per_dim"]

KIND = "tabular"
PRIORS = ("standard", "diagonal")  # N(0, I) | learned mean and log-std per coordinate
# Fields added after checkpoints existed go here with their default: left out of the hash while
# at that default, so older hashes stay valid (as GlowConfig does).
_HASH_DEFAULTS: dict = {}


@dataclass
class TabularFlowConfig:
    """Architecture of a RealNVP on vectors. Everything here changes the function it computes.

    ``hidden_layers`` counts the hidden layers of each coupling net (each ``hidden_width`` wide,
    each followed by a ReLU): the authors' ``num_layers`` (``--num_blocks`` in their
    train_unsup_ood.py) plus one, since their net has an input layer before ``num_layers``
    width x width layers. The defaults are that script's defaults for its EfficientNet-feature
    data sets (8 couplings, width 64, num_layers 8) on the paper's 1,792-d features; the command
    the paper's runs used is not published.
    """

    kind: str = KIND  # tells a tabular model config from a Glow one (meta.json, model.kind)
    dim: int = 1792
    n_couplings: int = 8
    hidden_width: int = 64
    hidden_layers: int = 9
    prior: str = "standard"
    input_actnorm: bool = False
    dropout: float = 0.0  # after the first hidden layer, training only (the authors' --dropout: 0.5)

    def validate(self) -> None:
        """Raise ValueError naming the offending field and value."""
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND!r} for a tabular flow, got {self.kind!r}")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 (a coupling needs two halves), got {self.dim}")
        for name in ("n_couplings", "hidden_width", "hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_dims(self) -> int:
        return self.dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of the architecture (stored in checkpoints and dumps). ``kind`` is
        part of it, so no tabular config shares a hash with a Glow config."""
        return config_hash(self, _HASH_DEFAULTS)

    @classmethod
    def from_dict(cls, values: dict) -> TabularFlowConfig:
        config = config_from_dict(cls, values)
        config.validate()
        return config


def continuous_bits_per_dim(log_p, n_dims: int):
    """Bits per dimension of continuous vectors: ``-log p(x) / (D ln 2)``, per sample.

    Image bits/dim (`glow.model.likelihood.bits_per_dim`) measure a discrete image: the density
    of dequantized pixels minus ``D log 2**n_bits``, a code length that is never negative.
    Feature vectors are real numbers with no quantization and no dequantization, so this is a
    *differential* entropy rate: it depends on the units of the features (scaling every feature
    by ``a`` shifts it by ``-log2 a``), may be negative (a density above 1), and compares only
    between models of the same features. The authors' training script subtracts ``log 256``
    per dimension even here: their printed bits/dim are these plus 8.

    Works on floats, NumPy arrays and tensors alike; never averages over the batch.
    """
    return -log_p / (n_dims * math.log(2.0))
