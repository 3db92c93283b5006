"""Typed training configuration: dataclass defaults <- YAML file <- dotted overrides.

OmegaConf structured configs do the merging and validation: an unknown key or a value of
the wrong type is an error that names the key. Interpolation between config keys
(``run.name: ${data.dataset}_L${model.n_levels}``) works; resolvers (``${oc.env:...}`` and
any other ``${name:...}``) are refused, so no secret from the environment reaches a file.
The resolved config is written to `<run>/config.yaml`; its hash goes into every checkpoint.

The shipped configs (``glow/configs/*.yaml``, also at ``train/configs/`` in a checkout) and
accelerate launch files (``glow/launch/*.yaml``, also ``train/accelerate/``) are package
data: `config_path` and `launch_config_path` take a path or a shipped name.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from glow.digest import json_digest
from glow.errors import UserError
from glow.model import MODEL_CONFIGS, GlowConfig, TabularFlowConfig
from glow.names import check_name

__all__ = ["LOGGERS", "TRACKER_PACKAGES", "Config", "ConfigError", "TabularConfig", "config_hash", "config_path", "launch_config_path",
           "launch_configs", "load_config", "shipped_configs", "to_dict", "to_yaml"]


class ConfigError(UserError, ValueError):
    """A configuration the user has to fix; the message says where and how (exit code 2)."""


@dataclass
class RunConfig:
    name: str = MISSING  # the run directory is <root>/<name>: a requeued job finds itself
    root: str = "runs"
    logger: str = "none"  # none | wandb | tensorboard | mlflow (metrics.jsonl is written in every case)
    wandb_mode: str = "offline"  # offline | online (after `wandb login`); WANDB_MODE in the environment wins
    wandb_project: str = "glow-ood"  # also the MLflow experiment name
    init_from: str = ""  # warm start: a checkpoint step dir whose model weights are loaded


@dataclass
class DataConfig:
    root: str = "data/shards"
    dataset: str = "demo"
    split: str = "train"
    num_workers: int = 0
    shuffle_buffer: int = 1000
    hflip: bool = False
    batches_per_epoch: int = 1000  # per process; the stream is reseeded every epoch
    perturb_prob: float = 0.0  # Ren et al. 2019 background model: replace pixels with noise


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | adamax
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 200
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 50.0  # max global grad norm; 0 disables
    ema_decay: float = 0.0  # 0 disables; the EMA weights are sampled from and exported


@dataclass
class TrainConfig:
    seed: int = 0
    # Images per optimizer step over all processes and accumulated micro-batches: the recipe.
    # Each process's micro-batch and the accumulation follow from the world size
    # (glow.training.shape); a process count that does not divide it is refused.
    global_batch_size: int = 64
    micro_batch_size: int = 0  # memory cap: most images per process per forward (0: none)
    max_steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 (coupling networks only)
    log_every: int = 10
    sample_every: int = 500
    sample_temperatures: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    samples_per_temperature: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    progress: bool = True  # a bar on a terminal; elsewhere (Slurm logs) one line every progress_every_s
    progress_every_s: float = 60.0
    # Fast paths that do not change results (glow.model.performance, docs/PERFORMANCE.md); runtime
    # options, so they live here and not in GlowConfig (whose hash names the architecture).
    compile: bool = False  # torch.compile of the training forward (cold compile: see docs/PERFORMANCE.md)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # coupling networks run in channels-last (NHWC) memory format
    checkpointing: bool = False  # recompute each flow step in backward: less memory, more time


@dataclass
class DistConfig:
    # Bound on any collective: a hung or dead rank ends the whole job after this many seconds
    # instead of holding every node for gloo's 30-minute (NCCL: 10-minute) default. Longer
    # than the slowest step plus what rank 0 does alone (checkpoint, sample grid).
    timeout_s: int = 600


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: GlowConfig = field(default_factory=GlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


@dataclass
class TabularConfig(Config):
    """The schema of a run whose ``model.kind`` is ``tabular``: a flow on feature vectors
    (`glow.model.tabular_config`); a Glow key under its ``model`` is an unknown key."""

    model: TabularFlowConfig = field(default_factory=TabularFlowConfig)


_SCHEMAS = {"glow": Config, "tabular": TabularConfig}  # model.kind -> the config schema
assert set(_SCHEMAS) == set(MODEL_CONFIGS)


# run.logger -> (the module accelerate drives, the extra that installs it).
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
                    "mlflow": ("mlflow", "mlflow")}

LOGGERS = ("none", *TRACKER_PACKAGES)  # run.logger's choices

_CHOICES = {
    ("run", "logger"): LOGGERS,
    ("run", "wandb_mode"): ("offline", "online"),
    ("optim", "optimizer"): ("adam", "adamax"),
    ("optim", "schedule"): ("constant", "cosine"),
    ("train", "precision"): ("fp32", "bf16"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


# A resolver call is `${name:...}` (the colon is mandatory in OmegaConf's grammar); a plain
# interpolation `${a.b}` names a config key and has none (our keys never hold a colon).
_RESOLVER = re.compile(r"\$\{\s*[^${}:\s]*\s*:")


def _refuse_resolvers(value, where: str = "") -> None:
    """Resolver interpolations (`${oc.env:...}`, any `${name:...}`) are refused: a resolved
    `${oc.env:SECRET}` would be written into config.yaml, meta.json, the dumps and the
    tracker. Plain interpolation between config keys is allowed. ``value``: the unresolved
    container; the message shows the expression, never what it would resolve to."""
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_resolvers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_resolvers(item, f"{where}[{i}]")
    elif isinstance(value, str) and _RESOLVER.search(value):
        raise ConfigError(f"{where}: resolver interpolations (${{name:...}}, e.g. ${{oc.env:...}}) are not allowed in "
                          f"a config, got {value!r}; write the value itself (secrets such as a wandb key belong in "
                          "the environment, never in a config). ${other.key} between config keys is fine")


# Keys of earlier versions that would change the recipe if read the old way: refused with what to write.
_RETIRED = {
    "train.batch_size": (
        "train.batch_size (images per process) is no longer read: write train.global_batch_size, the images per "
        "optimizer step over all processes (the old batch_size x processes x optim.grad_accum, e.g. 64 for 64 on "
        "one process), and train.micro_batch_size=<old batch_size> to keep a process from taking more at once "
        "(docs/configuration.md)"),
    "optim.grad_accum": (
        "optim.grad_accum is no longer read: accumulation follows from train.global_batch_size, the number of "
        "processes and train.micro_batch_size; write train.global_batch_size=<batch_size x processes x grad_accum> "
        "and train.micro_batch_size=<batch_size> instead (docs/configuration.md)"),
}


def _refuse_retired(layer: dict, where: str) -> None:
    """A retired key in one layer (a file's mapping) is a ConfigError that says what to write instead."""
    if not isinstance(layer, dict):
        return  # not a mapping: the merge says so
    for dotted, message in _RETIRED.items():
        section, key = dotted.split(".")
        if isinstance(layer.get(section), dict) and key in layer[section]:
            raise ConfigError(f"{where}: {message}")


def _validate(cfg: Config) -> None:
    try:
        check_name(cfg.run.name, "run.name")
        check_name(cfg.data.dataset, "data.dataset")
        check_name(cfg.data.split, "data.split")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {allowed}, got {value!r}")
    positive = {
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.max_steps": cfg.train.max_steps,
        "train.log_every": cfg.train.log_every,
        "train.sample_every": cfg.train.sample_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "data.batches_per_epoch": cfg.data.batches_per_epoch,
        "dist.timeout_s": cfg.dist.timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.train.micro_batch_size < 0:
        raise ConfigError(f"train.micro_batch_size must be >= 0 (0: no cap), got {cfg.train.micro_batch_size}")
    if cfg.train.progress_every_s <= 0:
        raise ConfigError("train.progress_every_s must be > 0 (seconds between progress lines), "
                          f"got {cfg.train.progress_every_s}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if not 0.0 <= cfg.data.perturb_prob < 1.0:
        raise ConfigError(f"data.perturb_prob must be in [0, 1), got {cfg.data.perturb_prob}")
    try:
        cfg.model.validate()
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    if isinstance(cfg.model, TabularFlowConfig):
        _refuse_image_options(cfg)
    check_tracker_installed(cfg.run.logger)


def _refuse_image_options(cfg: Config) -> None:
    """Options that act on images only, refused for a flow on feature vectors (model.kind: tabular)."""
    image_only = {"data.hflip": cfg.data.hflip, "data.perturb_prob": cfg.data.perturb_prob > 0,
                  "train.channels_last": cfg.train.channels_last, "train.checkpointing": cfg.train.checkpointing}
    for key, on in image_only.items():
        if on:
            raise ConfigError(f"{key} acts on images, but model.kind is tabular (a flow on feature vectors): "
                              f"remove {key} (flip or perturb the images before extracting features instead)")


def check_tracker_installed(logger: str, key: str = "run.logger=", instead: str = "run.logger=none") -> None:
    """Refuse a tracker whose package is missing, before anything starts (exit 2, naming the extra).
    ``key``: how the user asked for it (``run.logger=``, ``--logger ``); ``instead``: how not to."""
    if logger not in TRACKER_PACKAGES:
        return
    module, extra = TRACKER_PACKAGES[logger]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}{logger} needs the {module} package, which is not installed: "
                          f"pip install 'glow-ood[{extra}]', or {instead} (metrics.jsonl is written either way)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file at `path` <- `key=value` overrides; returns a validated Config
    (a `TabularConfig` when ``model.kind`` is ``tabular``, in the file or an override).

    Layers are merged one at a time, so an error names its source: the file (and key) for a
    bad file entry, the override itself for a bad override.
    """
    layer = None
    if path is not None:
        path = config_path(path)
        try:
            layer = OmegaConf.load(path)
            _refuse_retired(OmegaConf.to_container(layer, resolve=False), f"config file {path}")
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"config file {path}: {_describe(err)}") from None
    merged = OmegaConf.structured(_SCHEMAS[_model_kind(layer, overrides)])
    if layer is not None:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config file {path}: {_describe(err)}") from None
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        if key in _RETIRED:
            raise ConfigError(f"override {item!r}: {_RETIRED[key]}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({str(err).splitlines()[0]})") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_describe(err)}") from None
    if OmegaConf.is_missing(merged.run, "name"):
        raise ConfigError("run.name is not set: give it in the config file or as run.name=<name>")
    try:
        _refuse_resolvers(OmegaConf.to_container(merged, resolve=False))
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {_describe(err)}") from None
    _validate(cfg)
    return cfg


def _model_kind(layer, overrides) -> str:
    """``model.kind`` as the file and then the overrides set it (the last one wins; default glow):
    it picks the schema the layers are merged onto."""
    kind = "glow"
    if layer is not None and OmegaConf.is_dict(layer) and OmegaConf.is_dict(layer.get("model")):
        kind = layer.model.get("kind", kind)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if sep and key.strip() == "model.kind":
            try:
                kind = OmegaConf.from_dotlist([item]).model.kind
            except (yaml.YAMLError, OmegaConfBaseException):
                raise ConfigError(f"override {item!r}: its value is not valid YAML") from None
    if not isinstance(kind, str) or kind not in _SCHEMAS:
        raise ConfigError(f"model.kind must be one of {tuple(_SCHEMAS)}, got {kind!r}")
    return kind


def _describe(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without its object dump: the key, what is wrong, and the fix."""
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if key and "not in" in first:
        return f"unknown key {key} ({first}); the keys and their meaning are in docs/configuration.md"
    return f"{key}: {first}" if key else first


def _shipped(folder: str) -> dict[str, Path]:
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in files("glow").joinpath(folder).iterdir()
            if p.name.endswith(".yaml")}


def shipped_configs() -> dict[str, Path]:
    """name -> file of every training config that ships with the package (glow/configs/)."""
    return dict(sorted(_shipped("configs").items()))


def launch_configs() -> dict[str, Path]:
    """name -> file of every accelerate launch config that ships with the package (glow/launch/)."""
    return dict(sorted(_shipped("launch").items()))


def _by_path_or_name(value: str | Path, shipped: dict[str, Path], what: str) -> Path:
    """A file path if that file exists, else the name of a shipped file (``celeba32`` or ``celeba32.yaml``)."""
    path = Path(value)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if str(value) in (name, path.name) and name in shipped:
        return shipped[name]
    raise ConfigError(f"{what} {value} is neither a file nor a shipped name; shipped: {', '.join(shipped)}")


def config_path(value: str | Path) -> Path:
    """The training config file named by ``value``: a path, or a shipped name such as ``celeba32``."""
    return _by_path_or_name(value, shipped_configs(), "config file")


def launch_config_path(value: str | Path) -> Path:
    """The accelerate launch config named by ``value``: a path, or a shipped name such as ``cpu_2proc``."""
    return _by_path_or_name(value, launch_configs(), "accelerate config")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the resolved config (for hashing and the tracker)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Hash of the resolved config (stored in every checkpoint)."""
    return json_digest(to_dict(cfg), canonical=False)


def parse_saved_config(text: str, where: str | Path = "config.yaml") -> dict:
    """A run's saved ``config.yaml`` (as `to_yaml` wrote it) as a plain dict, interpolations left
    unresolved (a planted ``${oc.env:...}`` is never evaluated). Not validated against the schema,
    so configs of older versions still read; ConfigError names the file when it is not YAML."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{where} is not a valid config ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} holds {type(loaded).__name__}, not a config mapping")
    return loaded
