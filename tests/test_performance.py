"""Fast paths (glow.model.performance) give the plain path's per-sample log-likelihoods and gradients.

Tolerances: float64 paths (checkpointing, cached eval weights) must agree to 1e-10
relative: they run the same arithmetic. Float32 paths that change kernels (channels_last,
torch.compile) agree to 1e-5 relative on log p (values of ~1e2-1e3 nats) and 1e-3 relative
on gradient norms per parameter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glow.config import ConfigError, load_config
from glow.model import Glow
from glow.model.flows import InvConv2dLU
from glow.model.performance import (
    apply_fast_paths,
    cached_weights,
    eval_log_prob,
    fast_eval,
)
from tests.helpers.models import TINY, randomize
from tests.helpers.repo import REPO


def model_and_batch(dtype=torch.float64, seed=0, config=TINY):
    torch.manual_seed(seed)
    model = Glow(config).to(dtype)
    with torch.no_grad():  # ActNorm data-dependent init, before any fast path
        model.log_prob(torch.rand(16, 3, config.image_size, config.image_size, dtype=dtype) - 0.5)
    randomize(model, scale=0.05, seed=seed)
    y = torch.rand(6, 3, config.image_size, config.image_size, dtype=dtype, generator=torch.Generator().manual_seed(1)) - 0.5
    return model, y


def forward_backward(model, y):
    model.zero_grad(set_to_none=True)
    log_p = model(y)
    (-log_p.mean()).backward()
    return log_p.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(log_p, grads, ref_log_p, ref_grads, rtol_lp, rtol_grad):
    assert log_p.shape == ref_log_p.shape == (6,)
    assert ((log_p - ref_log_p).abs() / ref_log_p.abs()).max() <= rtol_lp
    for name, g in ref_grads.items():
        scale = g.norm() + 1e-12
        assert (grads[name] - g).norm() / scale <= rtol_grad, name


def test_checkpointing_matches_plain_log_p_and_gradients():
    ref_model, y = model_and_batch()
    ref = forward_backward(ref_model, y)
    model, _ = model_and_batch()
    apply_fast_paths(model, checkpointing=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = forward_backward(model, y)
    assert_close(*out, *ref, 1e-12, 1e-10)
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t.numel()) or t, lambda t: t):
        forward_backward(ref_model, y)
    assert sum(saved) < sum(plain)  # fewer activations kept for backward
    # no re-initialization of ActNorm when the steps are recomputed, and no grad-free slowdown:
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(y), ref_model.log_prob(y), rtol=1e-12, atol=0)


def test_channels_last_matches_plain_and_runs_nhwc():
    ref_model, y = model_and_batch(torch.float32)
    ref = forward_backward(ref_model, y)
    model, _ = model_and_batch(torch.float32)
    apply_fast_paths(model, channels_last=True)
    formats = []
    net = model.levels[0][0].coupling.net
    net[0].register_forward_hook(lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
    out = forward_backward(model, y)
    assert formats and all(formats)
    assert_close(*out, *ref, 1e-5, 1e-3)
    assert all(p.is_contiguous() for p in model.parameters())  # checkpoints unchanged


def test_fast_eval_matches_plain_and_uses_cached_weights():
    model, y = model_and_batch()
    with torch.no_grad():
        model.eval()
        ref = model.log_prob(y)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, InvConv2dLU)]
    fast = eval_log_prob(model, y)
    assert fast.is_inference() and model.training  # training mode restored
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=0)
    with fast_eval(model):
        assert all(layer._cached("weight") is not None for layer in layers)
        for layer in layers:  # a cached weight is returned as is, not recomputed
            assert layer.weight() is layer._cache["weight"]
        z = model.encode(y)
        torch.testing.assert_close(model.decode(z), y, rtol=0, atol=1e-10)  # cached inverse
    assert all("_cache" not in vars(layer) for layer in layers)  # dropped on exit


def test_cached_weights_are_never_used_by_training_or_after_an_update():
    model, y = model_and_batch()
    ref = forward_backward(model, y)
    layer = next(m for m in model.modules() if isinstance(m, InvConv2dLU))
    with cached_weights(model):
        assert layer._cached("weight") is None  # autograd on: the live weight is used
        out = forward_backward(model, y)
        assert_close(*out, *ref, 0, 0)
        with torch.no_grad():
            assert layer._cached("weight") is not None
            layer.log_s.add_(0.1)  # e.g. an optimizer step: the version counter moves
            assert layer._cached("weight") is None
            torch.testing.assert_close(layer.weight(), layer.weight().clone())


def test_train_config_options_and_validation():
    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [
        "train.compile=true", "train.channels_last=true", "train.checkpointing=true", "train.compile_mode=max-autotune",
    ])
    assert (cfg.train.compile, cfg.train.channels_last, cfg.train.checkpointing) == (True, True, True)
    plain = load_config(REPO / "train" / "configs" / "tiny.yaml")
    assert cfg.model.hash() == plain.model.hash()  # runtime options do not name the architecture
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(REPO / "train" / "configs" / "tiny.yaml", ["train.compile_mode=fastest"])


@pytest.mark.slow
def test_torch_compile_matches_eager_log_p_and_gradients():
    """One compile test (cold compile: see docs/PERFORMANCE.md; a few seconds with a warm inductor cache),
    on the smallest model with a split and the learned prior (one flow step a level: less to compile)."""
    config = dataclasses.replace(TINY, steps_per_level=1)
    ref_model, y = model_and_batch(torch.float32, config=config)
    ref = forward_backward(ref_model, y)
    model, _ = model_and_batch(torch.float32, config=config)
    apply_fast_paths(model, compile=True)
    out = forward_backward(model, y)
    assert_close(*out, *ref, 1e-5, 1e-3)
    assert set(model.state_dict()) == set(ref_model.state_dict())  # checkpoints keep their keys


def test_trainer_with_checkpointing_and_channels_last_matches_plain_run(tmp_path):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from glow.run import Run
    from glow.training.trainer import Trainer
    from tests.helpers.toy import build_toy_shards

    shards = build_toy_shards(tmp_path / "shards")
    weights = {}
    for name, extra in (("plain", []), ("fast", ["train.checkpointing=true", "train.channels_last=true"])):
        cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [
            f"run.root={tmp_path}", f"run.name={name}", f"data.root={shards}", "data.dataset=toy",
            "train.max_steps=4", "train.checkpoint_every=4", "train.sample_every=100", *extra,
        ])
        assert Trainer(cfg, Accelerator(cpu=True)).fit() == 0
        weights[name] = load_file(str(Run(tmp_path / name).checkpoint(4).path / "model.safetensors"))
    assert weights["plain"].keys() == weights["fast"].keys()
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["fast"][key], value, rtol=1e-4, atol=1e-5)
