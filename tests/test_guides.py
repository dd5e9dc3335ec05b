import math
from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import constraints
from torch.distributions.transforms import AffineTransform, SigmoidTransform

import pyro_bc
from pyro_bc.distributions import LogitNormal
from pyro_bc.guides import GUIDE_FAMILIES, register_guide_family
from pyro_bc.models import LeNet5Caffe, LeNet300100
from pyro_bc.nn import BayesianLinear, BayesianNetwork
from pyro_bc.poutine import posterior_mean
from pyro_bc.priors import FunctionPrior, GroupHorseshoe, GroupNormalJeffreys, GroupPrior

K1, K2, K3 = 0.63576, 1.87320, 1.48695


def _closed_form_kl(guide):
    """PAPER.md's formulas, written out: Molchanov's KL for z, Normal || N(0, 1) for theta, b."""
    total = 0.0
    for layer in guide.layers:
        (scale,) = layer.scale_factors
        log_alpha = scale.log_var - torch.log(scale.loc**2)
        neg_kl = (
            K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * torch.log1p(torch.exp(-log_alpha)) - K1
        )
        total = total - neg_kl.sum()
        for factor in (layer.weight, layer.bias):
            var = factor.log_var.exp()
            total = total + 0.5 * (factor.loc**2 + var - 1 - factor.log_var).sum()
    return total


def test_elbo_kl_is_the_closed_form_sum():
    model = LeNet300100(dataset_size=1000)
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            for factor in (*layer.scale_factors, layer.weight, layer.bias):
                factor.log_var.uniform_(-6, 0)
    x = torch.randn(8, 1, 28, 28)
    # without the observed site the negative ELBO is the KL alone: deterministic if closed form
    prior_only = pyro.poutine.block(model, hide=["obs"])
    elbo = TraceMeanField_ELBO()
    with pyro_bc.poutine.local_reparameterization():
        first = elbo.differentiable_loss(prior_only, guide, x)
        second = elbo.differentiable_loss(prior_only, guide, x)
    expected = _closed_form_kl(guide)
    assert first.item() == second.item()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-2)
    records = pyro_bc.kl_audit(model, guide, x, torch.zeros(8, dtype=torch.long))
    assert records and all(r.closed_form for r in records)


def test_guide_sites_follow_the_model_order_without_warnings():
    model = LeNet5Caffe(dataset_size=100)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pyro.validation_enabled(True):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    assert list(guide.distributions()) == [
        f"{layer}.{what}"
        for layer in ("conv1", "conv2", "fc1", "fc2")
        for what in ("scale", "weight", "bias")
    ]


def test_authors_initialisation():
    torch.manual_seed(0)
    guide = pyro_bc.StructuredGuide(LeNet300100())
    fc1 = guide.layers[0]
    (scale,) = fc1.scale_factors
    assert scale.loc.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert scale.loc.std().item() == pytest.approx(0.01, rel=0.2)
    assert fc1.weight.log_var.mean().item() == pytest.approx(-9.0, abs=1e-3)
    assert fc1.weight.loc.std().item() == pytest.approx(1 / math.sqrt(784), rel=0.05)


def test_clip_var_caps_the_weight_variance():
    guide = pyro_bc.StructuredGuide(LeNet300100(), clip_var={"fc1": 0.04})
    with torch.no_grad():
        for layer in guide.layers:
            layer.weight.log_var.fill_(0.0)
    dists = guide.distributions()
    assert dists["fc1.weight"].base_dist.scale.pow(2).max().item() == pytest.approx(0.04)
    assert dists["fc2.weight"].base_dist.scale.pow(2).max().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fc9"):
        pyro_bc.StructuredGuide(LeNet300100(), clip_var={"fc9": 0.04})
    for wrong in [0, -0.04, float("nan"), float("inf"), True, "0.04"]:
        with pytest.raises(ValueError, match="clip_var for 'fc1' must be a positive variance"):
            pyro_bc.StructuredGuide(LeNet300100(), clip_var={"fc1": wrong})


@pytest.mark.parametrize("network", [LeNet300100, LeNet5Caffe])
def test_init_from_a_trained_network_reproduces_it(network):
    model = network()
    guide = pyro_bc.StructuredGuide(model)
    twin = network.deterministic()
    guide.init_from(twin)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        logits = pyro_bc.predict_logits(model, guide, x)
        torch.testing.assert_close(logits, twin(x), rtol=1e-4, atol=1e-5)


class LogNormalScales(GroupPrior):
    """The example of GroupPrior.set_guide_scale's docstring."""

    def __call__(self, name, num_groups):
        prior = dist.LogNormal(torch.zeros(num_groups), 1.0).to_event(1)
        return pyro.sample(f"{name}.scale", prior)

    def set_guide_scale(self, name, locs, scale):
        locs[f"{name}.scale"].copy_(scale.log())


@pytest.mark.parametrize("prior", [GroupNormalJeffreys, GroupHorseshoe, LogNormalScales])
@pytest.mark.parametrize("network", [LeNet300100, LeNet5Caffe])
def test_init_from_with_rescale_moves_the_magnitude_into_the_scales(network, prior):
    model = network(prior=prior())
    guide = pyro_bc.StructuredGuide(model)
    twin = network.deterministic()
    guide.init_from(twin, rescale=True)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            pyro_bc.predict_logits(model, guide, x), twin(x), rtol=1e-4, atol=1e-5
        )
    for posterior in guide.layers:
        layer = model.get_submodule(posterior.name)
        theta = posterior.weight.loc.detach()
        other_dims = [d for d in range(theta.dim()) if d != layer.group_dim]
        # the scale's variance is tiny at the start, so E[z] is the group's RMS to ~1e-4
        rms = theta.pow(2).mean(other_dims).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)


def test_init_from_with_rescale_needs_a_prior_that_can_set_its_scale():
    def half_cauchy_groups(name, num_groups):
        return pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))

    model = LeNet300100(prior=half_cauchy_groups)
    guide = pyro_bc.StructuredGuide(model)
    with pytest.raises(NotImplementedError, match="fc1.*set_guide_scale"):
        guide.init_from(LeNet300100.deterministic(), rescale=True)
    guide.init_from(LeNet300100.deterministic())  # without rescale it works


def test_init_from_names_the_missing_layer():
    model = LeNet300100()
    guide = pyro_bc.StructuredGuide(model)
    with pytest.raises(ValueError, match="fc1"):
        guide.init_from(torch.nn.Sequential())


def test_guide_needs_bayesian_layers():
    with pytest.raises(ValueError, match="no pyro_bc Bayesian layers"):
        pyro_bc.StructuredGuide(torch.nn.Linear(2, 2))


def test_custom_prior_gets_lognormal_factors():
    import pyro.distributions as dist

    def half_cauchy_groups(name, num_groups):
        tau = pyro.sample(f"{name}.tau", dist.HalfCauchy(1.0))
        lam = pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))
        return tau * lam

    layer = BayesianLinear(6, 2, prior=half_cauchy_groups)
    guide = pyro_bc.StructuredGuide(layer)
    dists = guide.distributions()
    assert list(dists) == [
        "BayesianLinear.tau",
        "BayesianLinear.lam",
        "BayesianLinear.weight",
        "BayesianLinear.bias",
    ]
    assert isinstance(dists["BayesianLinear.lam"].base_dist, dist.LogNormal)
    x = torch.randn(3, 6)
    with posterior_mean():
        trace = pyro.poutine.trace(guide).get_trace(x)
        out = pyro.poutine.replay(layer, trace=trace)(x)
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_pyro_svi_trains_the_guide():
    model = BayesianLinear(4, 2)
    guide = pyro_bc.StructuredGuide(model)
    before = guide.layers[0].weight.loc.detach().clone()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    x = torch.randn(8, 4)
    losses = [svi.step(x) for _ in range(20)]
    assert not torch.equal(guide.layers[0].weight.loc.detach(), before)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# Guide families: priors choose the family of each site


def spike_and_slab(name, num_groups):
    """A relaxed spike-and-slab: a global log-normal slab times a Beta gate per group."""
    tau = pyro.sample(f"{name}.tau", dist.LogNormal(0.0, 1.0))
    ones = torch.ones(num_groups)
    gate = pyro.sample(f"{name}.gate", dist.Beta(0.5 * ones, ones).to_event(1))
    return tau * gate


def test_a_unit_interval_site_gets_the_logit_normal_family():
    guide = pyro_bc.StructuredGuide(BayesianLinear(6, 3, prior=spike_and_slab))
    dists = guide.distributions()
    gate = dists["BayesianLinear.gate"]
    assert isinstance(gate.base_dist, LogitNormal)
    assert isinstance(dists["BayesianLinear.tau"], dist.LogNormal)
    draws = gate.rsample((1000,))
    assert draws.shape == (1000, 6) and bool(((draws > 0) & (draws < 1)).all())
    # the default loc of the family: median sigmoid(0) = 1/2, tiny initial variance
    torch.testing.assert_close(draws.median(0).values, torch.full((6,), 0.5), atol=1e-2, rtol=0)


def test_the_audit_names_the_beta_site_as_monte_carlo():
    layer = BayesianLinear(6, 3, prior=spike_and_slab)
    audit = pyro_bc.kl_audit(layer, pyro_bc.StructuredGuide(layer), torch.randn(4, 6))
    assert audit.monte_carlo_sites == ["BayesianLinear.gate"]
    (gate,) = [r for r in audit if r.name == "BayesianLinear.gate"]
    assert gate.guide_dist == "Independent(LogitNormal, 1)"
    assert gate.model_dist == "Independent(Beta, 1)"


def test_a_logit_normal_prior_keeps_a_closed_form_kl():
    def logit_normal_gates(name, num_groups):
        base = dist.Normal(torch.full((num_groups,), 2.0), torch.ones(num_groups))
        prior = dist.TransformedDistribution(base, SigmoidTransform()).to_event(1)
        return pyro.sample(f"{name}.gate", prior)

    layer = BayesianLinear(5, 2, prior=logit_normal_gates)
    guide = pyro_bc.StructuredGuide(layer)
    with torch.no_grad():
        factor = guide.layers[0].scale_factors[0]
        factor.loc.copy_(torch.linspace(-1, 1, 5))
        factor.log_var.fill_(math.log(0.25))
    audit = pyro_bc.kl_audit(layer, guide, torch.randn(4, 5))
    (record,) = [r for r in audit if r.name == "BayesianLinear.gate"]
    assert record.closed_form
    # KL(N(m, 1/4) || N(2, 1)) summed over the groups: the sigmoid cancels
    m = torch.linspace(-1, 1, 5)
    expected = (0.5 * (0.25 + (m - 2) ** 2 - 1 - math.log(0.25))).sum().item()
    assert record.kl == pytest.approx(expected, rel=1e-5)


def test_scale_moments_of_a_logit_normal_gate_match_quadrature():
    def gates(name, num_groups):
        ones = torch.ones(num_groups)
        return pyro.sample(f"{name}.gate", dist.Beta(ones, ones).to_event(1))

    prior = FunctionPrior(gates)
    loc, sd = torch.tensor([-2.0, 0.0, 1.5]), torch.tensor([0.3, 1.0, 2.0])
    q = LogitNormal(loc, sd).to_event(1)
    mean, var = prior.scale_moments("fc", 3, {"fc.gate": q})
    # E[sigmoid(x)] and Var by the trapezoid rule over x ~ N(loc, sd^2)
    x = loc + sd * torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    density = torch.exp(-0.5 * ((x - loc) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    s = torch.sigmoid(x)
    exact_mean = torch.trapezoid(s * density, x, dim=0)
    exact_var = torch.trapezoid(s**2 * density, x, dim=0) - exact_mean**2
    # Monte Carlo with 4,096 draws: a few standard errors
    stderr = (exact_var / 4096).sqrt()
    assert bool(((mean.double() - exact_mean).abs() < 4 * stderr).all()), (mean, exact_mean)
    torch.testing.assert_close(var.double(), exact_var, rtol=0.1, atol=0)


class GatedScales(GroupPrior):
    """Chooses its families: a log-normal for a real-line site, the logit-normal for the gate."""

    def __call__(self, name, num_groups):
        ones = torch.ones(num_groups)
        scale = pyro.sample(f"{name}.scale", dist.Normal(ones, ones).to_event(1))
        gate = pyro.sample(f"{name}.gate", dist.Beta(ones, ones).to_event(1))
        return scale * gate

    def guide_family(self, site, support):
        return {"scale": "lognormal", "gate": "logitnormal"}[site.rsplit(".", 1)[-1]]


def test_a_prior_chooses_the_family_of_each_site():
    dists = pyro_bc.StructuredGuide(BayesianLinear(4, 2, prior=GatedScales())).distributions()
    assert isinstance(dists["BayesianLinear.scale"].base_dist, dist.LogNormal)
    assert isinstance(dists["BayesianLinear.gate"].base_dist, LogitNormal)


@pytest.mark.parametrize(
    "family, message",
    [("cauchy", r"BayesianLinear\.gate.*'cauchy'.*known families"), ("normal", "outside")],
)
def test_a_bad_family_choice_names_the_site(family, message):
    class Chooser(GatedScales):
        def guide_family(self, site, support):
            return family if site.endswith(".gate") else "lognormal"

    with pytest.raises(ValueError, match=message):
        pyro_bc.StructuredGuide(BayesianLinear(4, 2, prior=Chooser()))


def test_a_support_without_a_family_says_how_to_add_one():
    def uniform_scales(name, num_groups):
        prior = dist.Uniform(torch.zeros(num_groups), 2.0).to_event(1)
        return pyro.sample(f"{name}.scale", prior)

    with pytest.raises(ValueError, match=r"BayesianLinear\.scale.*register_guide_family"):
        pyro_bc.StructuredGuide(BayesianLinear(4, 2, prior=uniform_scales))
    try:
        register_guide_family(
            "logitnormal02",
            [SigmoidTransform(), AffineTransform(0.0, 2.0)],
            constraints.interval(0.0, 2.0),
        )
        guide = pyro_bc.StructuredGuide(BayesianLinear(4, 2, prior=uniform_scales))
        draws = guide.distributions()["BayesianLinear.scale"].rsample((500,))
        assert bool(((draws > 0) & (draws < 2)).all()) and draws.max() > 1
    finally:
        GUIDE_FAMILIES.pop("logitnormal02", None)
    with pytest.raises(ValueError, match="'normal' is a built-in"):
        register_guide_family("normal", SigmoidTransform(), constraints.unit_interval)


def test_a_beta_gated_network_trains_with_svi_and_compresses():
    # two informative inputs of eight: the label is the sign of x0 - x1
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, 0] > x[:, 1]).long()
    model = BayesianNetwork(
        OrderedDict(
            fc1=BayesianLinear(8, 16, prior=spike_and_slab),
            relu=torch.nn.ReLU(),
            fc2=BayesianLinear(16, 2, prior=spike_and_slab),
        ),
        dataset_size=len(x),
        input_shape=(8,),
    )
    guide = pyro_bc.StructuredGuide(model)
    gate = guide.layers[0].scale_factors[1]
    assert gate.family == "logitnormal"
    before = gate.loc.detach().clone()
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    history = pyro_bc.fit(model, guide, loader, epochs=30, lr=0.02, seed=0, progress=False)
    losses = [record["loss"] for record in history.epochs]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert not torch.equal(gate.loc.detach(), before)
    assert pyro_bc.evaluate(model, guide, loader)["error"] < 0.1
    compressed = pyro_bc.compress(guide, -1.0, bits=None)
    # compression reads the scale's moments by Monte Carlo (GroupPrior.scale_moments)
    with torch.no_grad():
        dense = pyro_bc.predict_logits(model, guide, x)
        torch.testing.assert_close(compressed(x), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prior", [GroupNormalJeffreys, GroupHorseshoe])
def test_init_from_with_rescale_keeps_the_pruning_quantity(prior):
    # small trained weights (RMS 0.03) must not start the groups past the pruning threshold
    torch.manual_seed(0)
    model = LeNet300100(prior=prior())
    guide = pyro_bc.StructuredGuide(model)
    twin = LeNet300100.deterministic()
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.03)
    before = {name: m.log_alpha.clone() for name, m in pyro_bc.group_masks(guide, -3).items()}
    guide.init_from(twin, rescale=True)
    after = pyro_bc.group_masks(guide, -3)
    for name, m in after.items():
        torch.testing.assert_close(m.log_alpha, before[name], atol=0.05, rtol=0)
        assert bool(m.groups_kept.all()), name
