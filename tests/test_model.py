"""The whole Glow: exact round trip, exact log-determinant, prior, sampling, batching."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from glow.model import Glow, GlowConfig
from tests.helpers.models import TINY, initialized_model


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


# --------------------------------------------------------------------------- densities pinned
def test_gaussian_log_density_equals_torch_normal():
    from glow.model.flows import gaussian_log_density

    g = torch.Generator().manual_seed(0)
    x, mean, log_std = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_log_density(x, mean, log_std), expected, rtol=0, atol=1e-12)


def identity_flow_model(config=TINY) -> Glow:
    """Every flow step exactly the identity (additive couplings, ActNorm at loc 0 / scale 1, 1x1 convs
    at I): the latents are plain squeezes and splits of y, so the density is the prior's alone."""
    model = Glow(GlowConfig(**{**config.to_dict(), "coupling": "additive", "lu": False})).double()
    for module in model.modules():
        if hasattr(module, "initialized"):
            module.initialized.fill_(1)
        if hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter) and module.weight.dim() == 2:
            module.weight.data = torch.eye(module.weight.shape[0], dtype=torch.float64)
    return model


def randomize_priors(model: Glow, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A random top prior and split priors that are affine in the kept half at each pixel:
    h = A kept + b (the 3x3 kernels' centre tap only); returns each split's (A, b)."""
    g = torch.Generator().manual_seed(seed)
    affine = []
    with torch.no_grad():
        model.top_prior.copy_(0.3 * torch.randn(model.top_prior.shape, generator=g, dtype=torch.float64))
        for prior in model.priors:
            conv = prior.conv
            out_c, in_c = conv.conv.weight.shape[:2]
            a = 0.3 * torch.randn(out_c, in_c, generator=g, dtype=torch.float64)
            b = 0.3 * torch.randn(out_c, generator=g, dtype=torch.float64)
            conv.conv.weight.zero_()
            conv.conv.weight[:, :, 1, 1] = a
            conv.conv.bias.copy_(b)
            conv.log_scale.zero_()
            affine.append((a, b))
    return affine


def closed_form_prior(model: Glow, affine, y: torch.Tensor):
    """Per level: (kept, factored, mean, std) computed by hand; the last entry is the top latent."""
    from glow.model.flows import squeeze

    out, x = [], y
    for level, (a, b) in enumerate(affine):
        x = squeeze(x)
        n_keep = x.shape[1] // 2
        kept, factored = x[:, :n_keep], x[:, n_keep:]
        h = torch.einsum("oi,bihw->bohw", a, kept) + b.view(1, -1, 1, 1)
        out.append((kept, factored, h[:, 0::2], h[:, 1::2].exp()))  # channels interleave mean, log-std
        x = kept
    x = squeeze(x)
    top = model.top_prior
    out.append((None, x, top[:, 0::2], top[:, 1::2].exp()))
    return out


def test_identity_flow_with_random_learned_prior_is_the_closed_form_gaussian():
    """log p_y is the chain of conditional Gaussians: each split's factored half under a mean and
    std that depend on the KEPT half, and the top under the learned top prior."""
    model = identity_flow_model()
    affine = randomize_priors(model)
    y = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = sum(torch.distributions.Normal(m, s).log_prob(z).flatten(1).sum(1)
                   for _, z, m, s in closed_form_prior(model, affine, y))
    assert torch.allclose(model.log_prob(y), expected, rtol=0, atol=1e-10)
    # Changing only the factored half moves its density but not the prior's mean / std ...
    _, logdet, priors = model.forward_flow(y)
    assert torch.equal(logdet, torch.zeros(3, dtype=torch.float64))
    kept = closed_form_prior(model, affine, y)[0][0]
    mean, log_std = model.priors[0].mean_log_std(kept)
    other = kept + 0.5
    mean2, log_std2 = model.priors[0].mean_log_std(other)
    # ... while changing the kept half changes both (the prior is conditional).
    assert (mean - mean2).abs().min() > 0 and (log_std - log_std2).abs().min() > 0


def test_split_prior_conditions_on_the_kept_half_in_a_trained_like_model():
    """A random (not identity) model: the level-0 factored half's log-density equals the Gaussian
    under the prior evaluated at the kept half the flow produced."""
    model = initialized_model()
    seen = {}
    hook = model.priors[0].conv.register_forward_hook(lambda mod, inp, out: seen.update(kept=inp[0]))
    y = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    latents, _, priors = model.forward_flow(y)
    hook.remove()
    mean, log_std = model.priors[0].mean_log_std(seen["kept"])
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(latents[0]).flatten(1).sum(1)
    assert torch.allclose(priors[0], expected, rtol=0, atol=1e-10)
    assert seen["kept"].shape == latents[0].shape  # the kept half, not the factored one
    assert not torch.equal(seen["kept"], latents[0])
    # The kept half decodes back: it is what the next level transforms.
    assert (model.decode(latents) - y).abs().max() <= 1e-10


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_draws_mean_plus_temperature_std_noise_at_every_level(temperature):
    """z = mu + T sigma eps at every level, with mu, sigma the (conditional) prior: exactly on the
    given noise, and empirically (std of the standardized latent = T)."""
    model = identity_flow_model()
    affine = randomize_priors(model, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn((2000, *s), generator=g, dtype=torch.float64) for s in model.latent_shapes]
    y = model.sample_from_noise(noise, temperature)
    levels = closed_form_prior(model, affine, y)
    for eps, (_, z, mean, std) in zip(noise, levels):
        assert torch.allclose(z, mean + temperature * std * eps, rtol=0, atol=1e-10)
        standardized = (z - mean) / std
        assert standardized.std().item() == pytest.approx(temperature, rel=0.03)
        assert abs(standardized.mean().item()) < 0.05 * temperature
        assert std.std() > 0.05  # the std is not trivially 1: the check above can fail
