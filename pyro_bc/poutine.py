"""Effect handlers that compute the layers' outputs from the guide's distributions.

The same model code runs three ways:

- with no handler, each layer's output uses the sampled weights and scales;
- under :func:`local_reparameterization`, each layer samples its pre-activation from its mean and
  variance under the guide, with the group scale drawn once per data point (training);
- under :func:`posterior_mean`, each layer uses the posterior means ``E[z] * mu`` (evaluation).

Both handlers record the guide's distribution of every site while the guide runs, and answer the
layers' ``"preactivation"`` messages (see :data:`pyro_bc.nn.preactivation`) from those records.
Since the layers compute their outputs from these distributions, the guide's sites that nothing
else reads are not drawn: weights and biases take their means, and group-scale sites with a
closed-form KL (:data:`pyro_bc.nn.SCALE_ROLE`) a placeholder of ones. Sites whose KL is Monte
Carlo are drawn as usual.
Run the guide and the model inside the same handler, as ``SVI.step`` and :func:`pyro_bc.fit` do.

Example::

    with pyro_bc.poutine.local_reparameterization():
        loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger

from .distributions import normal_moments
from .nn import SCALE_ROLE, WEIGHT_ROLE


class _PosteriorRecorder(Messenger):
    """Records the guide's distribution of every site it sees sampled (not replayed)."""

    def __init__(self):
        super().__init__()
        self.posteriors = {}

    def _pyro_sample(self, msg):
        if msg["done"] or msg["is_observed"] or msg["value"] is not None:
            return
        self.posteriors[msg["name"]] = msg["fn"]
        role = msg["infer"].get("bc_role")
        # Layers compute their outputs from these distributions, so a draw would be wasted.
        if role == WEIGHT_ROLE:
            msg["value"] = msg["fn"].mean
            msg["done"] = True
        elif role == SCALE_ROLE:
            msg["value"] = msg["infer"]["bc_placeholder"]
            msg["done"] = True

    def _layer_posterior(self, layer):
        """Means and variances of the layer's weights and bias (None without a bias)."""
        weight = normal_moments(self._posterior(layer.site("weight")), layer.site("weight"))
        bias = (None, None)
        if layer.has_bias:
            bias = normal_moments(self._posterior(layer.site("bias")), layer.site("bias"))
        return (*weight, *bias)

    def _posterior(self, site):
        try:
            return self.posteriors[site]
        except KeyError:
            raise KeyError(
                f"no guide distribution recorded for site {site!r}: run the guide inside the "
                "same pyro_bc.poutine handler as the model"
            ) from None


class LocalReparameterizationMessenger(_PosteriorRecorder):
    """Samples each layer's pre-activation from its Gaussian moments under the guide.

    The group scale is drawn once per data point, so the noise of the scale is independent across
    the examples of a batch, as in the paper; see :func:`local_reparameterization`.
    """

    def _pyro_preactivation(self, msg):
        layer, x = msg["args"][:2]
        weight_loc, weight_var, bias_loc, bias_var = self._layer_posterior(layer)
        z = layer.prior.draw_scale(layer.site(), layer.num_groups, self.posteriors, x.shape[0])
        msg["value"] = layer.sample_output(x, z, weight_loc, weight_var, bias_loc, bias_var)
        msg["done"] = True


class PosteriorMeanMessenger(_PosteriorRecorder):
    """Computes each layer's output with the posterior-mean weights ``E[z] * mu``."""

    def _pyro_preactivation(self, msg):
        layer, x = msg["args"][:2]
        weight_loc, _, bias_loc, _ = self._layer_posterior(layer)
        mean_z, _ = layer.prior.scale_moments(layer.site(), layer.num_groups, self.posteriors)
        msg["value"] = layer.apply(x, mean_z, weight_loc, bias_loc)
        msg["done"] = True


def local_reparameterization(fn=None):
    """Local reparameterization as an effect handler.

    Inside it, the guide's weight sites (and scale sites with a closed-form KL) are not sampled;
    each Bayesian layer samples its output ``N(mean, var)`` from the guide's distributions
    instead, drawing the group scale per example (:meth:`pyro_bc.priors.GroupPrior.draw_scale`).

    Example::

        with local_reparameterization():
            loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    """
    messenger = LocalReparameterizationMessenger()
    return messenger(fn) if fn is not None else messenger


def posterior_mean(fn=None):
    """Evaluates layers with the posterior-mean weights ``E[z] * mu`` and bias means.

    Example::

        with torch.no_grad(), posterior_mean():
            guide_trace = pyro.poutine.trace(guide).get_trace(x)
            logits = pyro.poutine.replay(model, trace=guide_trace)(x)
    """
    messenger = PosteriorMeanMessenger()
    return messenger(fn) if fn is not None else messenger
