"""The whole Glow: exact round trip, exact log-determinant, prior, sampling, batching."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from glow.model import Glow, GlowConfig
from tests.test_flows import randomize

TINY = GlowConfig(image_size=8, in_channels=3, n_levels=2, steps_per_level=2, hidden_channels=8)


def initialized_model(config=TINY, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = Glow(config).to(dtype)
    x = torch.rand(16, 3, config.image_size, config.image_size, dtype=dtype) - 0.5
    model.log_prob(x)  # ActNorm data-dependent init
    randomize(model, scale=0.05, seed=seed)
    return model.eval()


def test_round_trip_float64():
    model = initialized_model()
    y = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    assert (model.decode(model.encode(y)) - y).abs().max() <= 1e-10


def test_round_trip_float32():
    model = initialized_model(dtype=torch.float32)
    y = torch.rand(4, 3, 8, 8) - 0.5
    assert (model.decode(model.encode(y)) - y).abs().max() <= 1e-4


def test_every_latent_is_needed_for_decoding():
    model = initialized_model()
    y = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    zs = model.encode(y)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes
    assert sum(z[0].numel() for z in zs) == 3 * 8 * 8
    zs[0] = torch.zeros_like(zs[0])
    assert (model.decode(zs) - y).abs().max() > 1e-3


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_model_logdet_matches_brute_force_jacobian(coupling):
    config = GlowConfig(**{**TINY.to_dict(), "coupling": coupling})
    model = initialized_model(config)
    y = torch.rand(1, 3, 8, 8, dtype=torch.float64) - 0.5

    def flat_latents(v):
        return torch.cat([z.flatten(1) for z in model.encode(v)], 1)

    jac = jacobian(flat_latents, y).reshape(192, 192)
    expected = torch.linalg.slogdet(jac)[1]
    _, logdet, _ = model.forward_flow(y)
    assert abs(logdet.item() - expected.item()) <= 1e-8


def test_identity_flow_gives_analytic_gaussian_log_density():
    """With every flow at identity and a standard-normal prior, log p_y is log N(y; 0, I)."""
    model = Glow(GlowConfig(**{**TINY.to_dict(), "coupling": "additive", "lu": False})).double()
    for module in model.modules():
        if hasattr(module, "initialized"):
            module.initialized.fill_(1)  # loc = 0, log_scale = 0: identity
        if hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter) and module.weight.dim() == 2:
            module.weight.data = torch.eye(module.weight.shape[0], dtype=torch.float64)
    y = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    expected = (-0.5 * (y**2 + math.log(2 * math.pi))).flatten(1).sum(1)
    assert torch.allclose(model.log_prob(y), expected, atol=1e-10)


def test_log_prob_is_per_sample_and_batch_independent():
    model = initialized_model(dtype=torch.float32)
    y = torch.rand(16, 3, 8, 8) - 0.5
    batch = model.log_prob(y)
    assert batch.shape == (16,)
    alone = model.log_prob(y[5:6])
    assert abs(alone.item() - batch[5].item()) <= 1e-5 * max(1.0, abs(alone.item()))


def test_sampling_temperature():
    model = initialized_model(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    # T = 0 returns the prior means: decoding the mean of every latent.
    s0 = model.sample(4, temperature=0.0, generator=g)
    assert s0.shape == (4, 3, 8, 8)
    assert torch.allclose(s0, s0[:1].expand_as(s0), atol=1e-6)

    def top_std(t):
        zs = model.encode(model.sample(512, temperature=t, generator=torch.Generator().manual_seed(1)))
        mean, log_std = model._top_mean_log_std(1)
        return ((zs[-1] - mean) / torch.exp(log_std)).std().item()

    assert top_std(1.0) == pytest.approx(1.0, rel=0.1)
    assert top_std(0.5) == pytest.approx(0.5, rel=0.1)


def test_sampling_is_reproducible_with_generator():
    model = initialized_model(dtype=torch.float32)
    a = model.sample(3, 0.7, generator=torch.Generator().manual_seed(3))
    b = model.sample(3, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_state_dict_round_trip_does_not_reinitialize():
    model = initialized_model(dtype=torch.float32)
    fresh = Glow(TINY)
    fresh.load_state_dict(model.state_dict())
    y = torch.rand(4, 3, 8, 8) * 10  # would give very different ActNorm statistics
    assert torch.allclose(fresh.eval().log_prob(y), model.log_prob(y))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_size": 12, "n_levels": 3}, "divisible"),
        ({"n_levels": 0}, "n_levels"),
        ({"coupling": "spline"}, "coupling"),
        ({"n_bits": 9}, "n_bits"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        Glow(GlowConfig(**{**TINY.to_dict(), **changes}))


def test_wrong_input_is_a_clear_error():
    model = Glow(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\).*\(2, 3, 16, 16\)"):
        model.log_prob(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        model.log_prob(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_config_hash_changes_with_architecture():
    assert TINY.hash() == GlowConfig(**TINY.to_dict()).hash()
    assert TINY.hash() != GlowConfig(**{**TINY.to_dict(), "hidden_channels": 9}).hash()
    with pytest.raises(ValueError, match="unknown"):
        GlowConfig.from_dict({**TINY.to_dict(), "bogus": 1})
