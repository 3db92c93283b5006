"""Coupling variants (glow.model.couplings): exact inverse and exact log-determinant for every mask and
the bottleneck, layer by layer and in the whole model; masks; the background-model perturbation."""

import pytest
import torch
from torch.autograd.functional import jacobian

from glow.model import Glow, GlowConfig
from glow.model.couplings import (
    MASKS,
    SPATIAL_MASKS,
    BottleneckCouplingNet,
    MaskedCoupling,
    make_coupling,
    spatial_masks,
)
from glow.model.likelihood import perturb_pixels
from tests.helpers.models import TINY, initialized_model, randomize

# every new mask, and the bottleneck (layer tests below cover every mask x bottleneck pair);
# the default (channel, 0) is tests/test_flows.py and tests/test_model.py
VARIANTS = [(mask, 0) for mask in SPATIAL_MASKS] + [("channel", 3), ("cycle", 3)]


def variant(mask: str, bottleneck: int, **changes) -> GlowConfig:
    return GlowConfig(**{**TINY.to_dict(), "mask": mask, "coupling_bottleneck": bottleneck, **changes})


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("kind", SPATIAL_MASKS)
def test_masks_are_disjoint_binary_and_cover_every_position_over_a_cycle(kind):
    h = w = 4
    covered = torch.zeros(1, 1, h, w)
    for index in range(4):
        m_in, m_out = spatial_masks(kind, index, h, w)
        assert set(m_in.unique().tolist()) <= {0.0, 1.0} and set(m_out.unique().tolist()) <= {0.0, 1.0}
        assert (m_in * m_out).sum() == 0  # the net never sees what it transforms
        assert m_out.sum() == (h * w // 2 if kind == "checkerboard" else h * w // 4)
        covered += m_out
    assert (covered > 0).all()


def test_mask_layouts():
    m_in, m_out = spatial_masks("checkerboard", 0, 2, 2)
    assert m_in.view(-1).tolist() == [1, 0, 0, 1] and m_out.view(-1).tolist() == [0, 1, 1, 0]
    assert torch.equal(spatial_masks("checkerboard", 1, 2, 2)[0], m_out)  # parity alternates
    # cycle: contiguous quadrants 0 TL -> 1 TR -> 2 BR -> 3 BL -> 0 TL
    m_in, m_out = spatial_masks("cycle", 0, 4, 4)
    assert m_in[0, 0, :2, :2].all() and m_in.sum() == 4
    assert m_out[0, 0, :2, 2:].all() and m_out.sum() == 4
    m_in, m_out = spatial_masks("cycle", 3, 4, 4)
    assert m_in[0, 0, 2:, :2].all() and m_out[0, 0, :2, :2].all()
    assert torch.equal(spatial_masks("cycle", 5, 4, 4)[0], spatial_masks("cycle", 1, 4, 4)[0])
    # cycle_patch: positions within every 2x2 patch, same clockwise order
    m_in, m_out = spatial_masks("cycle_patch", 1, 4, 4)
    assert m_in[0, 0, 0::2, 1::2].all() and m_in.sum() == 4
    assert m_out[0, 0, 1::2, 1::2].all() and m_out.sum() == 4


# --------------------------------------------------------------------------- single layers


def layer_cases():
    cases = {f"{kind}-{i}": (kind, i, 0) for kind in SPATIAL_MASKS for i in range(2)}
    cases.update({f"{kind}-bottleneck": (kind, 1, 3) for kind in MASKS})
    return cases


@pytest.mark.parametrize("name", list(layer_cases()))
@pytest.mark.parametrize("affine", [True, False])
def test_layer_round_trip_and_brute_force_logdet(name, affine):
    kind, index, bottleneck = layer_cases()[name]
    torch.manual_seed(0)
    layer = make_coupling(4, 8, mask=kind, index=index, affine=affine, bottleneck=bottleneck, size=(4, 4)).double()
    randomize(layer)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, logdet = layer(x)
    assert logdet.shape == (3,)
    assert (layer.reverse(y) - x).abs().max() <= 1e-10
    assert not torch.allclose(y, x)  # the randomized coupling does something
    for i in range(2):
        xi = x[i : i + 1]
        jac = jacobian(lambda v: layer(v)[0], xi, vectorize=True).reshape(xi.numel(), xi.numel())
        assert abs(layer(xi)[1].item() - torch.linalg.slogdet(jac)[1].item()) <= 1e-8


@pytest.mark.parametrize("kind", SPATIAL_MASKS)
def test_masked_coupling_sees_only_m_in_and_changes_only_m_out(kind):
    torch.manual_seed(0)
    layer = MaskedCoupling(4, 8, kind, index=1, size=(4, 4)).double()
    randomize(layer)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    m_in, m_out = spatial_masks(kind, 1, 4, 4)
    y, _ = layer(x)
    assert torch.equal(y * (1 - m_out), x * (1 - m_out))  # off m_out: untouched, bit for bit
    # changing positions outside m_in (here: inside m_out) changes y only on m_out, pointwise
    x2 = x + m_out * torch.randn_like(x)
    y2, _ = layer(x2)
    shift_scale = lambda v: layer._shift_scale(v, m_in.double())
    s1, s2 = shift_scale(x), shift_scale(x2)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])
    assert torch.equal(y2 * (1 - m_out), x * (1 - m_out))


def test_fresh_masked_coupling_is_a_constant_scale_on_m_out():
    layer = MaskedCoupling(6, 16, "checkerboard", index=0, size=(4, 4))
    x = torch.randn(3, 6, 4, 4)
    y, logdet = layer(x)
    _, m_out = spatial_masks("checkerboard", 0, 4, 4)
    scale = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(y, torch.where(m_out.bool(), x * scale, x))
    assert torch.allclose(logdet, torch.full((3,), 6 * 8 * torch.log(scale).item()))


def test_bottleneck_limits_the_net_to_l_numbers():
    net = BottleneckCouplingNet(4, 8, hidden_channels=8, bottleneck=3, size=(4, 4))
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(8 * 16, 3), (3, 8 * 16)]
    out = net(torch.randn(2, 4, 4, 4))
    assert out.shape == (2, 8, 4, 4) and torch.equal(out, torch.zeros_like(out))  # zero-initialized head


def test_coupling_under_autocast_keeps_logdet_in_float32():
    layer = make_coupling(4, 8, mask="cycle", index=0, size=(4, 4))
    randomize(layer)
    x = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = layer(x)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32


# --------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("mask, bottleneck", VARIANTS)
def test_model_round_trip_and_brute_force_logdet(mask, bottleneck):
    model = initialized_model(variant(mask, bottleneck))
    y = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    assert (model.decode(model.encode(y)) - y).abs().max() <= 1e-10
    y1 = y[:1]

    def flat_latents(v):
        return torch.cat([z.flatten(1) for z in model.encode(v)], 1)

    jac = jacobian(flat_latents, y1, vectorize=True).reshape(192, 192)
    _, logdet, _ = model.forward_flow(y1)
    assert abs(logdet.item() - torch.linalg.slogdet(jac)[1].item()) <= 1e-8


@pytest.mark.parametrize("mask", SPATIAL_MASKS)
def test_model_uses_the_variant_and_alternates_masks(mask):
    model = Glow(variant(mask, 0, steps_per_level=4))
    couplings = [step.coupling for step in model.levels[0]]
    assert all(isinstance(c, MaskedCoupling) and c.kind == mask for c in couplings)
    assert [c.index for c in couplings] == [0, 1, 2, 3]


def test_default_model_is_unchanged():
    """Default config: same parameter names and same initial weights as the plain Glow steps."""
    from glow.model.flows import AffineCoupling, CouplingNet

    model = Glow(TINY)
    assert all(type(s.coupling) is AffineCoupling and type(s.coupling.net) is CouplingNet
               for level in model.levels for s in level)
    # new fields at their defaults leave the hash of pre-existing configs alone
    legacy = {k: v for k, v in TINY.to_dict().items() if k not in ("mask", "coupling_bottleneck")}
    assert GlowConfig.from_dict(legacy).hash() == TINY.hash()
    assert variant("checkerboard", 0).hash() != TINY.hash() != variant("channel", 4).hash()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mask": "stripes"}, "mask must be one of"),
        ({"mask": "cycle", "image_size": 8, "n_levels": 3}, "even spatial size"),
        ({"mask": "checkerboard", "image_size": 12, "n_levels": 2}, "even spatial size"),  # 3x3 last level
        ({"coupling_bottleneck": -1}, "coupling_bottleneck"),
    ],
)
def test_variant_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        Glow(GlowConfig(**{**TINY.to_dict(), **changes}))


def test_variant_from_training_config():
    from glow.config import ConfigError, load_config

    cfg = load_config(None, ["run.name=x", "model.mask=cycle", "model.coupling_bottleneck=4"])
    assert cfg.model.mask == "cycle" and cfg.model.coupling_bottleneck == 4
    with pytest.raises(ConfigError, match="mask"):
        load_config(None, ["run.name=x", "model.mask=diagonal"])


# --------------------------------------------------------------------------- background model input


@pytest.mark.parametrize("prob", [0.1, 0.3])
def test_perturbation_happens_with_the_stated_probability(prob):
    """Each uint8 value is replaced with probability mu by a uniform value in 0..255."""
    x = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)  # n = 196608 values
    n = x.numel()
    out = perturb_pixels(x, prob, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    changed = (out != x).double().mean().item()
    expected = prob * 255 / 256  # a replacement draws the old value again with probability 1/256
    sd = (expected * (1 - expected) / n) ** 0.5
    assert abs(changed - expected) < 5 * sd
    counts = torch.bincount(out[out != x].long(), minlength=256).double()
    assert counts[7] == 0 and counts.sum() > 0
    # replacements are uniform over the 255 other values: chi-square well within its 5-sigma band
    others = torch.cat([counts[:7], counts[8:]])
    e = others.sum() / 255
    chi2 = (((others - e) ** 2) / e).sum().item()
    assert abs(chi2 - 254) < 5 * (2 * 254) ** 0.5


def test_perturbation_off_and_out_of_range():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert perturb_pixels(x, 0.0) is x
    with pytest.raises(ValueError, match="probability"):
        perturb_pixels(x, 1.0)


def test_trainer_perturbs_inputs_only_when_asked(monkeypatch):
    """`data.perturb_prob` reaches perturb_pixels in the training loss with that probability."""
    from glow.config import load_config
    from glow.training import batches as batches_module
    from glow.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(batches_module, "perturb_pixels", lambda x, p: calls.append(p) or x)

    class Stub:
        acc = type("A", (), {"device": torch.device("cpu")})()
        model = staticmethod(lambda y: torch.zeros(y.shape[0]))
        _log_p_y = trainer_module.Trainer._log_p_y

    batch = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for prob, expected in ((0.0, []), (0.2, [0.2])):
        calls.clear()
        stub = Stub()
        stub.cfg = load_config(None, ["run.name=x", f"data.perturb_prob={prob}", "model.image_size=8",
                                      "model.n_levels=2"])
        stub.data = batches_module.training_data(stub.cfg)
        trainer_module.Trainer._loss(stub, batch)
        assert calls == expected
