"""glow.model.tabular: the RealNVP on vectors (exact inverse, exact log-determinant, exact density)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch.autograd.functional import jacobian

from glow.model import GlowConfig
from glow.model.tabular import TabularFlow
from glow.model.tabular_config import TabularFlowConfig, continuous_bits_per_dim
from tests.helpers.models import randomize
from tests.helpers.repo import REPO


def random_flow(dim: int, seed: int = 0, **overrides) -> TabularFlow:
    """A float64 flow with every parameter moved off its (identity) initial value."""
    settings = {"dim": dim, "n_couplings": 4, "hidden_width": 16, "hidden_layers": 2, **overrides}
    torch.manual_seed(seed)
    model = TabularFlow(TabularFlowConfig(**settings)).double()
    if model.input_norm is not None:  # data-dependent init on a batch, then perturbed like the rest
        model.log_prob(torch.randn(64, dim, dtype=torch.float64) * 3 + 1)
    randomize(model, scale=0.3, seed=seed)
    return model.eval()


@pytest.mark.parametrize("dim", [2, 5, 6])
@pytest.mark.parametrize("extras", [{}, {"input_actnorm": True, "prior": "diagonal"}])
def test_round_trip(dim, extras):
    model = random_flow(dim, **extras)
    x = torch.randn(32, dim, dtype=torch.float64) * 2
    z = model.encode(x)
    assert (z[0] - x).abs().max() > 1e-2  # the flow is not the identity
    assert (model.decode(z) - x).abs().max() <= 1e-10
    back = model.encode(model.inverse(z[0]))[0]
    assert (back - z[0]).abs().max() <= 1e-10


@pytest.mark.parametrize("dim", [3, 6])
@pytest.mark.parametrize("extras", [{}, {"input_actnorm": True, "prior": "diagonal"}])
def test_logdet_matches_brute_force_jacobian(dim, extras):
    model = random_flow(dim, seed=1, **extras)
    x = torch.randn(4, dim, dtype=torch.float64)
    _, logdet, _ = model.forward_flow(x)
    for i in range(x.shape[0]):
        jac = jacobian(lambda v: model.encode(v[None])[0][0], x[i])
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0  # couplings scale by exp(s) > 0 and ActNorm by exp(log_scale) > 0
        assert logdet[i].item() == pytest.approx(expected.item(), abs=1e-9)


def test_fresh_flow_is_the_identity_with_the_prior_density():
    """Zero-initialised last layers: every coupling is the identity, so log p(x) is the prior's."""
    torch.manual_seed(0)
    model = TabularFlow(TabularFlowConfig(dim=7, n_couplings=3, hidden_width=8, hidden_layers=2)).double()
    x = torch.randn(16, 7, dtype=torch.float64) * 1.7
    assert torch.equal(model.encode(x)[0], x)
    expected = stats.multivariate_normal(np.zeros(7), np.eye(7)).logpdf(x.numpy())
    np.testing.assert_allclose(model.log_prob(x).detach().numpy(), expected, rtol=0, atol=1e-10)

    diagonal = TabularFlow(TabularFlowConfig(dim=7, n_couplings=3, hidden_width=8, hidden_layers=2,
                                             prior="diagonal")).double()
    mean, std = torch.linspace(-1, 1, 7, dtype=torch.float64), torch.linspace(0.2, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        diagonal.prior_loc.copy_(mean)
        diagonal.prior_log_scale.copy_(std.log())
    expected = stats.norm(mean.numpy(), std.numpy()).logpdf(x.numpy()).sum(1)
    np.testing.assert_allclose(diagonal.log_prob(x).detach().numpy(), expected, rtol=0, atol=1e-10)


def test_constant_couplings_give_a_gaussian_in_closed_form():
    """With every coupling net reduced to its bias (s_raw, t constant), each coupling maps
    x_c -> (x_c + t) exp(scale * tanh(s_raw)): the flow is affine per coordinate, z = a x + b,
    so x ~ N(-b / a, 1 / a^2) exactly."""
    dim = 5
    torch.manual_seed(0)
    model = TabularFlow(TabularFlowConfig(dim=dim, n_couplings=3, hidden_width=4, hidden_layers=1)).double()
    g = torch.Generator().manual_seed(3)
    a, b = np.ones(dim), np.zeros(dim)
    with torch.no_grad():
        for coupling in model.couplings:
            last = coupling.net[-1]
            last.weight.zero_()
            last.bias.copy_(torch.randn(last.bias.shape, generator=g, dtype=torch.float64))
            coupling.scale.copy_(1 + torch.rand(coupling.scale.shape, generator=g, dtype=torch.float64))
            n = coupling.n_change
            s = (coupling.scale * torch.tanh(last.bias[:n])).numpy()
            t = last.bias[n:].numpy()
            changed = np.arange(dim)[: coupling.split] if coupling.reverse_mask else np.arange(dim)[coupling.split :]
            # z_c = (a x + b + t) e^s: fold into a, b
            a[changed], b[changed] = a[changed] * np.exp(s), (b[changed] + t) * np.exp(s)
    x = torch.randn(10, dim, dtype=torch.float64)
    expected = stats.norm(-b / a, 1 / a).logpdf(x.numpy()).sum(1)
    np.testing.assert_allclose(model.log_prob(x).detach().numpy(), expected, rtol=0, atol=1e-10)


def test_fit_recovers_a_correlated_gaussian():
    """Trained by maximum likelihood on a correlated 2-d Gaussian (exactly representable: one
    coupling standardises x2 given x1, the next x1), the flow's log-density is the true one."""
    rng = np.random.default_rng(0)
    mean, cov = np.array([1.0, -2.0]), np.array([[2.0, 1.2], [1.2, 1.0]])
    truth = stats.multivariate_normal(mean, cov)
    train = torch.from_numpy(rng.multivariate_normal(mean, cov, 4096)).float()
    test = rng.multivariate_normal(mean, cov, 4096)
    torch.manual_seed(0)
    model = TabularFlow(TabularFlowConfig(dim=2, n_couplings=2, hidden_width=16, hidden_layers=2,
                                          input_actnorm=True))
    model.log_prob(train[:512])  # ActNorm data-dependent init
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: threads only contend (10x slower on a loaded 2-core machine)
    try:
        for _ in range(700):
            batch = train[torch.randint(0, train.shape[0], (256,), generator=g)]
            loss = -model.log_prob(batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ours = model.double().log_prob(torch.from_numpy(test)).numpy()
    kl = float(np.mean(truth.logpdf(test) - ours))  # KL(truth || model), Monte-Carlo
    assert abs(kl) < 0.01, kl
    assert float(np.mean(ours)) == pytest.approx(-truth.entropy(), abs=0.03)
    # per sample too, not only on average
    err = np.abs(ours - truth.logpdf(test))
    assert np.median(err) < 0.06 and np.corrcoef(ours, truth.logpdf(test))[0, 1] > 0.99


def test_sampling_at_a_temperature():
    model = TabularFlow(TabularFlowConfig(dim=3, n_couplings=2, hidden_width=4, hidden_layers=1,
                                          prior="diagonal")).double()
    with torch.no_grad():
        model.prior_loc.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.prior_log_scale.copy_(torch.tensor([0.5, 1.0, 2.0]).log())
    g = torch.Generator().manual_seed(0)
    x = model.sample(20000, temperature=0.5, generator=g)
    assert x.shape == (20000, 3)
    np.testing.assert_allclose(x.mean(0).numpy(), [1.0, 2.0, 3.0], atol=0.03)
    np.testing.assert_allclose(x.std(0).numpy(), [0.25, 0.5, 1.0], rtol=0.03)
    assert torch.equal(model.sample(4, temperature=0.0), model.prior_loc.expand(4, 3))
    # a random flow: sampling is decoding scaled noise
    flow = random_flow(4, seed=2, prior="diagonal")
    noise = torch.randn(8, 4, dtype=torch.float64)
    expected = flow.decode([flow.prior_loc + 0.7 * flow.prior_log_scale.exp() * noise])
    assert torch.allclose(flow.sample_from_noise([noise], 0.7), expected, atol=1e-12)


def test_bits_per_dim_of_continuous_features_can_be_negative():
    """The exact model of N(0, 0.1^2 I) features: bits/dim is the differential entropy rate
    0.5 log2(2 pi e 0.01) = -1.27, negative; scaling the features by 10 adds log2(10)."""
    model = TabularFlow(TabularFlowConfig(dim=4, n_couplings=2, hidden_width=4, hidden_layers=1,
                                          prior="diagonal")).double()
    with torch.no_grad():
        model.prior_log_scale.fill_(math.log(0.1))
    x = model.sample(50000, generator=torch.Generator().manual_seed(0))
    bpd = continuous_bits_per_dim(model.log_prob(x), 4)
    assert bpd.shape == (50000,)
    expected = 0.5 * math.log2(2 * math.pi * math.e * 0.01)
    assert expected < -1.2
    assert bpd.mean().item() == pytest.approx(expected, abs=0.01)
    with torch.no_grad():
        model.prior_log_scale.fill_(0.0)
    assert continuous_bits_per_dim(model.log_prob(x * 10), 4).mean().item() == pytest.approx(
        expected + math.log2(10), abs=0.01)
    assert continuous_bits_per_dim(-4 * math.log(2.0), 4) == pytest.approx(1.0)


def test_input_actnorm_standardises_each_feature_on_the_first_batch():
    model = TabularFlow(TabularFlowConfig(dim=6, n_couplings=2, hidden_width=4, hidden_layers=1,
                                          input_actnorm=True)).double()
    x = torch.randn(256, 6, dtype=torch.float64) * torch.arange(1, 7) + torch.arange(6) * 10
    model.log_prob(x)
    y, _ = model.input_norm(x)
    np.testing.assert_allclose(y.mean(0).detach().numpy(), 0, atol=1e-10)
    np.testing.assert_allclose(y.std(0, unbiased=False).detach().numpy(), 1, atol=1e-5)
    state = model.state_dict()
    fresh = TabularFlow(model.config).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_prob(x * 3), model.log_prob(x * 3))  # loading never re-initialises


def test_input_actnorm_standardises_features_of_any_scale():
    """Features of ~1e-8 (a randomly initialised extractor's) come out standardised too: the floor
    on the standard deviation is relative to the features' scale; a constant feature stays finite."""
    model = TabularFlow(TabularFlowConfig(dim=4, n_couplings=2, hidden_width=4, hidden_layers=1,
                                          input_actnorm=True))
    x = (torch.randn(512, 4) * 5e-10 + 1.7e-8) * torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert torch.isfinite(model.log_prob(x)).all()
    y, _ = model.input_norm(x)
    np.testing.assert_allclose(y[:, :3].std(0, unbiased=False).detach().numpy(), 1, rtol=1e-3)
    assert torch.equal(y[:, 3], torch.zeros(512))


def test_dropout_only_in_training():
    model = random_flow(6, seed=4, dropout=0.5)
    x = torch.randn(8, 6, dtype=torch.float64)
    assert torch.equal(model.log_prob(x), model.log_prob(x))  # eval mode: deterministic, invertible
    assert (model.decode(model.encode(x)) - x).abs().max() <= 1e-10
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.log_prob(x), model.log_prob(x))


def test_config_dict_round_trip_hash_and_refusals():
    config = TabularFlowConfig(dim=2048, n_couplings=6, hidden_width=256, hidden_layers=2)
    assert TabularFlowConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["kind"] == "tabular"
    assert config.n_dims == 2048
    assert config.hash() == TabularFlowConfig.from_dict(config.to_dict()).hash()
    hashes = {config.hash()}
    for field, value in [("dim", 1792), ("n_couplings", 8), ("hidden_width", 64), ("hidden_layers", 3),
                         ("prior", "diagonal"), ("input_actnorm", True), ("dropout", 0.5)]:
        hashes.add(TabularFlowConfig(**{**config.to_dict(), field: value}).hash())
    assert len(hashes) == 8  # every field changes the hash
    assert config.hash() != GlowConfig().hash()
    assert len(config.hash()) == 16
    with pytest.raises(ValueError, match="unknown TabularFlowConfig fields"):
        TabularFlowConfig.from_dict({**config.to_dict(), "image_size": 32})
    for bad, match in [({"dim": 1}, "dim"), ({"n_couplings": 0}, "n_couplings"), ({"prior": "laplace"}, "prior"),
                       ({"dropout": 1.0}, "dropout"), ({"kind": "glow"}, "kind"), ({"hidden_layers": 0}, "hidden")]:
        with pytest.raises(ValueError, match=match):
            TabularFlowConfig.from_dict({**config.to_dict(), **bad})
    with pytest.raises(ValueError, match=r"\(B, 2048\)"):
        TabularFlow(config).log_prob(torch.zeros(2, 2047))


def test_log_prob_is_per_sample_and_batch_independent():
    model = random_flow(10, seed=5, input_actnorm=True).float()
    x = torch.randn(32, 10)
    batch = model.log_prob(x)
    assert batch.shape == (32,)
    assert model.log_prob(x[7:8]).item() == pytest.approx(batch[7].item(), rel=1e-5)


def test_config_imports_without_torch():
    """Config files, run directories and reports read the config where torch is not installed."""
    code = ("import sys; import glow.model.tabular_config as c; c.TabularFlowConfig().hash(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_model_kinds_dispatch_and_leave_glow_hashes_unchanged():
    from glow.model import Glow, GlowConfig, TabularFlow, build_model, model_config

    # the hashes of main before model.kind existed: every Glow checkpoint still resumes and loads
    assert GlowConfig().hash() == "a597c21d9b7be95f"
    assert GlowConfig(mask="cycle").hash() == "713f385f5cff04c0"
    assert model_config(GlowConfig().to_dict()) == GlowConfig()
    legacy = {k: v for k, v in GlowConfig(n_levels=2).to_dict().items() if k != "kind"}  # an older meta.json
    assert model_config(legacy) == GlowConfig(n_levels=2)
    tab = TabularFlowConfig(dim=6, n_couplings=2, hidden_width=4, hidden_layers=1)
    assert model_config(tab.to_dict()) == tab and tab.hash() != GlowConfig().hash()
    assert isinstance(build_model(tab), TabularFlow)
    assert isinstance(build_model(GlowConfig(image_size=8, n_levels=1, steps_per_level=1, hidden_channels=4)), Glow)
    with pytest.raises(ValueError, match="unknown model kind 'resnet'"):
        model_config({"kind": "resnet"})
    with pytest.raises(ValueError, match=r"unknown TabularFlowConfig fields \['image_size'\]"):
        model_config({**tab.to_dict(), "image_size": 32})  # a Glow key under a tabular model
    with pytest.raises(ValueError, match="kind must be 'glow'"):
        GlowConfig(kind="tabular").validate()


def test_training_does_not_depend_on_the_features_units():
    """With the input ActNorm, every trained number is in standardised units: Adam (which moves a
    parameter by ~lr a step whatever its scale) trains the same flow on features x and on 1e-8 x
    (a random extractor's scale), and its continuous bits/dim are lower by exactly log2(1e8)."""
    x = torch.from_numpy(np.random.default_rng(0).multivariate_normal([1.0, -2.0, 0.5], np.eye(3) + 0.5, 512)).float()

    def trained(scale: float) -> tuple[TabularFlow, torch.Tensor]:
        torch.manual_seed(0)
        model = TabularFlow(TabularFlowConfig(dim=3, n_couplings=2, hidden_width=8, hidden_layers=1,
                                              input_actnorm=True))
        model.log_prob(x[:256] * scale)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for i in range(30):
            loss = -model.log_prob(x[(i % 4) * 128:(i % 4 + 1) * 128] * scale).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return model, continuous_bits_per_dim(model.log_prob(x * scale), 3)

    _, unit = trained(1.0)
    model, tiny = trained(1e-8)
    assert torch.isfinite(tiny).all()
    np.testing.assert_allclose((unit - tiny).numpy(), np.log2(1e8), atol=2e-3)
    y, _ = model.input_norm(x * 1e-8)
    assert 0.5 < float(y.detach().std()) < 2.0  # still standardised after training
