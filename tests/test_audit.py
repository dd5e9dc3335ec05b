import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_bc.audit import KLSiteRecord, assert_closed_form, kl_audit
from pyro_bc.distributions import ImproperLogUniform


@pytest.fixture(autouse=True)
def _seed():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def model(x=None):
    with pyro.plate("groups", 3):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
    z = pyro.sample("z", ImproperLogUniform().expand([3]).to_event(1))
    s = pyro.sample("s", dist.HalfCauchy(1.0))
    with pyro.plate("data", 2):
        pyro.sample("obs", dist.Normal((w * z).sum() * s, 1.0), obs=x)


def guide(x=None):
    with pyro.plate("groups", 3):
        pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.zeros(3)), 0.5))
    pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.ones(3)), 0.1).to_event(1))
    pyro.sample("s", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 0.3))


def test_kl_audit_reports_dispatch():
    audit = kl_audit(model, guide, torch.zeros(2))
    assert [r.name for r in audit] == ["w", "z", "s"]  # model order, observed "obs" skipped
    w, z, s = audit
    assert w == KLSiteRecord("w", "Normal", "Normal", True, w.kl)
    assert w.kl == pytest.approx(3 * (0.5 * (0.25 - 1 - torch.tensor(0.25).log().item())))
    assert (z.guide_dist, z.model_dist) == (
        "Independent(Normal, 1)",
        "Independent(ImproperLogUniform, 1)",
    )
    # Molchanov et al.'s approximation, written out: alpha = 0.1^2 / 1^2 for each of 3 scales
    alpha = torch.tensor(0.01, dtype=torch.float64)
    per_scale = -(
        0.63576 * torch.sigmoid(1.87320 + 1.48695 * alpha.log())
        - 0.5 * torch.log1p(1 / alpha)
        - 0.63576
    )
    assert z.closed_form and z.kl == pytest.approx(3 * per_scale.item(), rel=1e-5)
    assert (s.guide_dist, s.model_dist, s.closed_form, s.kl) == (
        "LogNormal",
        "HalfCauchy",
        False,
        None,
    )
    assert audit.monte_carlo_sites == ["s"]
    table = str(audit)
    assert "closed form" in table and "Monte Carlo" in table and "HalfCauchy" in table
    print(table)


def test_kl_audit_agrees_with_trace_mean_field_elbo():
    def closed_model():
        with pyro.plate("groups", 3):
            pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("z", ImproperLogUniform().expand([3]).to_event(1))

    def closed_guide():
        with pyro.plate("groups", 3):
            pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.zeros(3)), 0.5))
        pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.ones(3)), 0.1).to_event(1))

    # poutine.scale reaches the KL exactly as in the ELBO (e.g. mini-batch scaling).
    scaled_model = poutine.scale(closed_model, scale=2.0)
    scaled_guide = poutine.scale(closed_guide, scale=2.0)
    audit = kl_audit(scaled_model, scaled_guide)
    loss = TraceMeanField_ELBO().loss(scaled_model, scaled_guide)
    assert sum(r.kl for r in audit) == pytest.approx(loss, rel=1e-6)
    assert sum(r.kl for r in kl_audit(closed_model, closed_guide)) == pytest.approx(loss / 2)


def test_assert_closed_form():
    with pytest.raises(ValueError, match=r"'s' \(LogNormal \|\| HalfCauchy\).*register_kl"):
        assert_closed_form(model, guide, torch.zeros(2))
    with pytest.warns(UserWarning, match="'s'"):
        audit = assert_closed_form(model, guide, torch.zeros(2), warn=True)
    assert audit.monte_carlo_sites == ["s"]

    def gamma_model(x=None):
        pyro.sample("s", dist.Gamma(0.5, 1.0))

    audit = assert_closed_form(gamma_model, guide)  # LogNormal || Gamma is registered
    assert audit.monte_carlo_sites == []


def test_delta_guide_is_closed_form_in_pyro():
    # Pyro registers kl(Delta, any) = -log p(v), so a MAP guide never falls back.
    def map_guide(x=None):
        pyro.sample("s", dist.Delta(pyro.param("s_map", torch.tensor(1.0))))

    def half_cauchy_model(x=None):
        pyro.sample("s", dist.HalfCauchy(1.0))

    (record,) = kl_audit(half_cauchy_model, map_guide)
    assert record.closed_form
    assert record.kl == pytest.approx(-dist.HalfCauchy(1.0).log_prob(torch.tensor(1.0)).item())


def test_kl_audit_missing_guide_site():
    def guide_without_w(x=None):
        pyro.sample("z", dist.Normal(torch.ones(3), 0.1).to_event(1))

    def model_with_normal_w(x=None):
        pyro.sample("z", ImproperLogUniform().expand([3]).to_event(1))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'w'.*missing from the guide"):
        kl_audit(model_with_normal_w, guide_without_w)
