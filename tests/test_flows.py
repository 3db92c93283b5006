"""Invertibility and exact log-determinants of every layer (brute-force Jacobians)."""

import pytest
import torch
from torch.autograd.functional import jacobian

from glow.model.flows import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvConv2d,
    InvConv2dLU,
    squeeze,
    unsqueeze,
)
from tests.helpers.models import randomize


def make_layers(channels: int = 4):
    torch.manual_seed(0)
    return {
        "actnorm": ActNorm(channels),
        "invconv": InvConv2d(channels),
        "invconv_lu": InvConv2dLU(channels),
        "affine": AffineCoupling(channels, 8, affine=True),
        "additive": AffineCoupling(channels, 8, affine=False),
        "affine_actnorm_net": AffineCoupling(channels, 8, affine=True, actnorm=True),
        "step": FlowStep(channels, 8, affine=True, lu=True),
        "step_additive_dense": FlowStep(channels, 8, affine=False, lu=False),
    }


def prepared(name: str, dtype=torch.float64):
    layer = make_layers()[name].to(dtype)
    x = torch.randn(5, 4, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    layer(x)  # data-dependent init of any ActNorm
    randomize(layer)
    return layer, x


@pytest.mark.parametrize("name", list(make_layers()))
def test_round_trip_float64(name):
    layer, x = prepared(name)
    y, _ = layer(x)
    assert (layer.reverse(y) - x).abs().max() <= 1e-10


@pytest.mark.parametrize("name", list(make_layers()))
def test_round_trip_float32(name):
    layer, x = prepared(name, torch.float32)
    y, _ = layer(x)
    assert (layer.reverse(y) - x).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(make_layers()))
def test_logdet_matches_brute_force_jacobian(name):
    layer, x = prepared(name)
    layer.eval()
    for i in range(2):  # per sample: the Jacobian of one image
        xi = x[i : i + 1]
        jac = jacobian(lambda v: layer(v)[0], xi).reshape(xi.numel(), xi.numel())
        expected = torch.linalg.slogdet(jac)[1]
        _, logdet = layer(xi)
        assert logdet.shape == (1,)
        assert abs(logdet.item() - expected.item()) <= 1e-8


def test_logdet_is_per_sample():
    layer, x = prepared("affine")
    _, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    assert logdet.std() > 0  # different images get different log-determinants


def test_actnorm_init_normalizes_first_batch_and_is_not_redone():
    x = torch.randn(64, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 4.0
    layer = ActNorm(3)
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    assert int(layer.initialized) == 1
    # A second batch does not move the parameters.
    before = layer.loc.detach().clone()
    layer(torch.randn(64, 3, 8, 8))
    assert torch.equal(before, layer.loc)
    # Loading into a fresh layer carries the flag: no re-initialization on new data.
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    fresh(torch.randn(8, 3, 8, 8) * 100)
    assert torch.equal(fresh.loc, layer.loc) and torch.equal(fresh.log_scale, layer.log_scale)


def test_actnorm_uses_installed_reducer():
    from glow.model.flows import set_actnorm_reducer

    calls = []

    def reducer(mean, sq_mean):
        calls.append(mean.shape)
        return torch.zeros_like(mean), torch.full_like(sq_mean, 4.0)

    layer = torch.nn.Sequential(ActNorm(3))
    set_actnorm_reducer(layer, reducer)
    layer[0](torch.randn(4, 3, 2, 2))
    assert calls == [torch.Size([3])]
    assert torch.allclose(layer[0].log_scale, torch.full((1, 3, 1, 1), -torch.log(torch.tensor(2.0))), atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_fresh_coupling_is_identity(affine):
    layer = AffineCoupling(6, 16, affine=affine)
    x = torch.randn(3, 6, 4, 4)
    y, logdet = layer(x)
    # sigmoid(0 + 2) is not 1: a fresh affine coupling scales x_b by a constant.
    if affine:
        scale = torch.sigmoid(torch.tensor(2.0))
        assert torch.allclose(y[:, 3:], x[:, 3:] * scale)
        assert torch.allclose(logdet, torch.full((3,), 3 * 16 * torch.log(scale).item()))
    else:
        assert torch.equal(y, x)
        assert torch.equal(logdet, torch.zeros(3))
    assert torch.equal(y[:, :3], x[:, :3])


def test_squeeze_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 3)
    assert torch.equal(unsqueeze(s), x)
    # The four channels of an input channel hold its 2x2 patch.
    assert torch.equal(s[0, :4, 0, 0], torch.tensor([x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]))


def test_invconv_weight_and_logdet_stay_float32_under_autocast():
    layer = InvConv2dLU(4)
    x = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = layer(x)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    assert torch.allclose(layer.reverse(y), x, atol=1e-5)
