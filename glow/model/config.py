"""`GlowConfig`: the architecture of a Glow (importable without torch, so config files, run
directories and reports can be read without it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from glow.digest import json_digest

__all__ = ["COUPLINGS", "KIND", "MASKS", "SPATIAL_MASKS", "GlowConfig", "config_from_dict", "config_hash"]

COUPLINGS = ("affine", "additive")
MASKS = ("channel", "checkerboard", "cycle", "cycle_patch")  # glow.model.couplings
SPATIAL_MASKS = MASKS[1:]
KIND = "glow"
# Fields added after checkpoints existed: left out of the hash while at these defaults, so the
# hash (and resuming) of every model that predates them is unchanged.
_HASH_DEFAULTS = {"mask": "channel", "coupling_bottleneck": 0, "kind": KIND}


def config_hash(config, hash_defaults: dict) -> str:
    """Stable short hash of an architecture config: its fields, less those of ``hash_defaults``
    that are at their default (fields added later leave older hashes unchanged)."""
    values = {k: v for k, v in config.to_dict().items() if not (k in hash_defaults and v == hash_defaults[k])}
    return json_digest(values, canonical=False)


def config_from_dict(cls, values: dict):
    """``cls(**values)``, refusing fields ``cls`` does not have (ValueError naming them)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**values)


@dataclass
class GlowConfig:
    """Architecture of a Glow model. Everything here changes the function it computes."""

    image_size: int = 32
    in_channels: int = 3
    n_levels: int = 3
    steps_per_level: int = 8
    hidden_channels: int = 64
    coupling: str = "affine"
    lu: bool = True
    learn_top: bool = True
    n_bits: int = 8
    coupling_actnorm: bool = False
    mask: str = "channel"  # channel | checkerboard | cycle | cycle_patch (glow.model.couplings)
    coupling_bottleneck: int = 0  # l > 0: coupling net through an l-dim global bottleneck
    kind: str = KIND  # model.kind: glow (this), or tabular (glow.model.tabular_config)

    def validate(self) -> None:
        """Raise ValueError naming the offending field and value."""
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND!r} for a Glow, got {self.kind!r}")
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")
        if self.steps_per_level < 1:
            raise ValueError(f"steps_per_level must be >= 1, got {self.steps_per_level}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.hidden_channels < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {self.hidden_channels}")
        if self.image_size < 2 or self.image_size % (2**self.n_levels):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**n_levels = {2**self.n_levels}"
            )
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {self.n_bits}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        smallest = self.image_size // 2**self.n_levels  # spatial size of the last level
        if self.mask in SPATIAL_MASKS and (smallest < 2 or smallest % 2):
            raise ValueError(
                f"mask {self.mask!r} needs an even spatial size >= 2 at every level, but image_size "
                f"{self.image_size} with n_levels {self.n_levels} gives {smallest}x{smallest} at the last "
                "level: use fewer levels or a larger image"
            )
        if self.coupling_bottleneck < 0:
            raise ValueError(f"coupling_bottleneck must be >= 0 (0 = off), got {self.coupling_bottleneck}")

    @property
    def n_dims(self) -> int:
        return self.in_channels * self.image_size**2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable short hash of the architecture (stored in checkpoints and dumps)."""
        return config_hash(self, _HASH_DEFAULTS)

    @classmethod
    def from_dict(cls, values: dict) -> GlowConfig:
        return config_from_dict(cls, values)
