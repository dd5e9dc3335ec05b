"""Predictive uncertainty: class probabilities, their entropy, and calibration on a data set.

Three predictors, one set of metrics:

- the **posterior predictive** of the dense Bayesian network, ``p(y | x) = E_q[softmax(f(x; w))]``,
  estimated by averaging the softmax over ``num_samples`` draws of every weight from the guide
  (:func:`predictive_probs`, :func:`predictive_metrics`);
- the **posterior-mean network**, one pass with the weights ``E[z] mu``
  (:func:`posterior_mean_probs`, :func:`posterior_mean_metrics`): a point estimate;
- any plain ``nn.Module`` returning logits, such as the network :func:`pyro_bc.compress` returns
  (:func:`network_probs`, :func:`network_metrics`): also a point estimate, whose softmax says
  nothing about the uncertainty of its weights.

The metrics (:class:`Calibration`) are the error of the most probable class, the negative
log-likelihood of the labels (mean nats per example), the expected calibration error over
equal-width confidence bins and the mean entropy of the predictive; see
:func:`expected_calibration_error` for the bins, and ``docs/method.md#predictive-uncertainty``.

Example::

    from pyro_bc import plots, predictive

    dense = predictive.predictive_metrics(model, guide, test_loader, num_samples=20)
    small = predictive.network_metrics(pyro_bc.compress(guide), test_loader)
    print(dense, small, sep="\\n")
    plots.reliability_diagram({"posterior predictive": dense, "compressed": small})
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .batches import batches
from .checks import require_count
from .infer import predict_logits

__all__ = [
    "DEFAULT_BINS",
    "Calibration",
    "calibration",
    "entropy",
    "expected_calibration_error",
    "negative_log_likelihood",
    "network_metrics",
    "network_probs",
    "posterior_mean_metrics",
    "posterior_mean_probs",
    "predictive_log_probs",
    "predictive_metrics",
    "predictive_probs",
]

#: the number of equal-width confidence bins of the expected calibration error (Guo et al. 2017)
DEFAULT_BINS = 15


# ---------------------------------------------------------------------------------------------
# Class probabilities


@torch.no_grad()
def predictive_log_probs(model, guide, x, *, num_samples: int = 100) -> torch.Tensor:
    """Log of :func:`predictive_probs`, computed without underflow (a log-sum-exp over draws).

    Example::

        log_p = predictive_log_probs(model, guide, x, num_samples=20)
    """
    require_count(num_samples, "num_samples", minimum=1)
    model.eval()
    total = None
    for _ in range(num_samples):
        log_p = predict_logits(model, guide, x, mode="sample").log_softmax(-1)
        total = log_p if total is None else torch.logaddexp(total, log_p)
    return total - math.log(num_samples)


def predictive_probs(model, guide, x, *, num_samples: int = 100) -> torch.Tensor:
    """The posterior predictive ``p(y | x)`` of the dense Bayesian network: shape ``(batch, K)``.

    Averages ``softmax(logits)`` over ``num_samples`` forward passes, each with every weight and
    group scale drawn from the guide (:func:`pyro_bc.predict_logits` with ``mode="sample"``), so
    the probabilities carry the posterior's uncertainty about the weights. The estimate is
    unbiased; its Monte Carlo error shrinks as ``1 / sqrt(num_samples)``. It is what Pyro's
    :class:`~pyro.infer.Predictive` gives, one guide draw per pass::

        draws = pyro.infer.Predictive(model, guide=guide, num_samples=100,
                                      return_sites=["_RETURN"])(x)["_RETURN"]
        probs = draws.softmax(-1).mean(0)   # the same estimator, same distribution

    Example::

        probs = predictive_probs(model, guide, x_test, num_samples=20)
        probs.sum(-1)  # ones
    """
    return predictive_log_probs(model, guide, x, num_samples=num_samples).exp()


@torch.no_grad()
def posterior_mean_probs(model, guide, x) -> torch.Tensor:
    """``softmax`` of the posterior-mean network (weights ``E[z] mu``): a point estimate.

    One forward pass with the posterior means (:func:`pyro_bc.predict_logits` with
    ``mode="mean"``). It ignores the posterior's uncertainty: it is the network the paper tests,
    not the posterior predictive (see :func:`predictive_probs`).

    Example::

        probs = posterior_mean_probs(model, guide, x_test)
    """
    model.eval()
    return predict_logits(model, guide, x, mode="mean").softmax(-1)


@torch.no_grad()
def network_probs(network, x) -> torch.Tensor:
    """``softmax`` of a plain network's logits (e.g. a compressed network): a point estimate.

    The network has fixed weights, so these probabilities carry no uncertainty about the
    weights, only what the single network says.

    Example::

        probs = network_probs(pyro_bc.compress(guide), x_test)
    """
    network.eval()
    device = next((p.device for p in network.parameters()), x.device)
    with torch.no_grad():
        return network(x.to(device)).softmax(-1)


# ---------------------------------------------------------------------------------------------
# Metrics of probabilities


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_k p_k log p_k`` (nats) of each row of ``probs``, with ``0 log 0 = 0``.

    It is ``log K`` for a uniform predictive over ``K`` classes and 0 for a certain one. Of the
    posterior predictive, it is the total uncertainty: the posterior's doubt about the weights
    plus the noise of the labels.

    Example::

        entropy(torch.full((1, 10), 0.1))  # tensor([2.3026]) = log 10
    """
    return torch.special.entr(probs).sum(-1)


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p(y | x)`` over the examples, in nats: the cross-entropy of the labels.

    For a network's softmax this equals ``torch.nn.functional.cross_entropy(logits, labels)``.
    A probability of exactly 0 for a label gives ``inf``.

    Example::

        negative_log_likelihood(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))  # log 2
    """
    _check_probs(probs, labels)
    return -probs.double().gather(-1, labels[:, None]).log().mean().item()


def _bins(confidence, num_bins):
    """The bin of each confidence: bin ``b`` holds ``(b/B, (b+1)/B]``, bin 0 also holds 0."""
    index = torch.ceil(confidence * num_bins).long() - 1
    return index.clamp(0, num_bins - 1)


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int = DEFAULT_BINS
) -> float:
    """Expected calibration error: how far confidence is from accuracy, weighted by examples.

    Each example's confidence is its largest probability and it is correct when that class is
    the label. The interval ``[0, 1]`` is cut into ``num_bins`` equal-width bins
    ``((b-1)/B, b/B]`` (15 by default, as Guo et al., 2017); then
    ``ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|``. It is 0 for a calibrated
    predictor (of all examples predicted with confidence ``c``, a fraction ``c`` is right) and
    at most 1.

    Example::

        probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
        expected_calibration_error(probs, torch.tensor([0, 1]))  # |0.5 - 0.9| = 0.4
    """
    return calibration(probs, labels, num_bins).ece


@dataclass
class Calibration:
    """Error, likelihood and calibration of a predictor on a data set.

    :ivar error: fraction of examples whose most probable class is not the label.
    :ivar nll: mean negative log-likelihood of the labels, nats per example.
    :ivar ece: expected calibration error over ``num_bins`` equal-width bins
        (:func:`expected_calibration_error`).
    :ivar entropy: mean entropy of the predictive distribution, nats (:func:`entropy`).
    :ivar n: the number of examples.
    :ivar num_bins: the number of confidence bins.
    :ivar bin_count: examples per bin, shape ``(num_bins,)``.
    :ivar bin_confidence: mean confidence per bin (NaN for an empty bin).
    :ivar bin_accuracy: accuracy per bin (NaN for an empty bin).
    :ivar predictor: what was measured, e.g. ``"posterior predictive (20 samples)"``.

    Example::

        result = calibration(probs, labels)
        result.ece, result.bin_accuracy
    """

    error: float
    nll: float
    ece: float
    entropy: float
    n: int
    num_bins: int
    bin_count: torch.Tensor
    bin_confidence: torch.Tensor
    bin_accuracy: torch.Tensor
    predictor: str = ""

    def to_dict(self) -> dict:
        """Plain data (lists for the bins), e.g. for ``json.dumps``.

        Example::

            json.dumps(result.to_dict())
        """
        return {
            "predictor": self.predictor,
            "error": self.error,
            "nll": self.nll,
            "ece": self.ece,
            "entropy": self.entropy,
            "n": self.n,
            "num_bins": self.num_bins,
            "bin_count": self.bin_count.tolist(),
            "bin_confidence": self.bin_confidence.tolist(),
            "bin_accuracy": self.bin_accuracy.tolist(),
        }

    def __str__(self) -> str:
        name = f"{self.predictor}: " if self.predictor else ""
        return (
            f"{name}error {self.error:.2%}, NLL {self.nll:.4f} nats, ECE {self.ece:.4f} "
            f"({self.num_bins} bins), entropy {self.entropy:.4f} nats, {self.n:,} examples"
        )


def _check_probs(probs, labels):
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be (examples, classes) and labels (examples,); got "
            f"{tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < probs.shape[1]:
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1} (the classes of probs)")
    rows = probs.detach().double().sum(-1)
    sums_to_one = torch.allclose(rows, torch.ones_like(rows), atol=1e-3)
    if probs.numel() and not (torch.isfinite(probs).all() and (probs >= 0).all() and sums_to_one):
        raise ValueError(
            "probs must be class probabilities (finite, non-negative, each row summing to 1); "
            "for logits, pass logits.softmax(-1)"
        )


def calibration(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int = DEFAULT_BINS, predictor: str = ""
) -> Calibration:
    """All of :class:`Calibration` from class probabilities ``(n, K)`` and labels ``(n,)``.

    Example::

        result = calibration(predictive_probs(model, guide, x, num_samples=20), y)
        print(result)  # error 1.70%, NLL 0.0550 nats, ECE 0.0031 (15 bins), ...
    """
    _check_probs(probs, labels)
    require_count(num_bins, "num_bins", minimum=1)
    if not len(labels):
        raise ValueError("calibration needs at least one example")
    probs = probs.detach().double().cpu()
    labels = labels.detach().cpu()
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    bins = _bins(confidence, num_bins)
    count = torch.bincount(bins, minlength=num_bins)
    conf_sum = torch.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    n = len(labels)
    ece = ((correct_sum - conf_sum).abs().sum() / n).item()
    with torch.no_grad():
        bin_confidence = conf_sum / count  # 0/0 = NaN marks an empty bin
        bin_accuracy = correct_sum / count
    return Calibration(
        error=1.0 - correct.mean().item(),
        nll=negative_log_likelihood(probs, labels),
        ece=ece,
        entropy=entropy(probs).mean().item(),
        n=n,
        num_bins=num_bins,
        bin_count=count,
        bin_confidence=bin_confidence,
        bin_accuracy=bin_accuracy,
        predictor=predictor,
    )


# ---------------------------------------------------------------------------------------------
# Metrics on a data set


def _metrics(probs_of, loader, num_bins, predictor):
    probs, labels = [], []
    for x, y in batches(loader, predictor):
        probs.append(probs_of(x).double().cpu())
        labels.append(y.cpu())
    return calibration(torch.cat(probs), torch.cat(labels), num_bins, predictor)


def predictive_metrics(
    model, guide, loader, *, num_samples: int = 100, num_bins: int = DEFAULT_BINS
) -> Calibration:
    """Error, NLL, ECE and entropy of the dense posterior predictive (:func:`predictive_probs`)
    on ``(x, y)`` batches.

    The probabilities are Monte Carlo averages over ``num_samples`` draws of the weights, so the
    metrics carry a little Monte Carlo noise (the NLL is biased up by it: fewer samples, higher
    NLL).

    Example::

        result = predictive_metrics(model, guide, test_loader, num_samples=20)
        result.error, result.nll, result.ece
    """
    require_count(num_samples, "num_samples", minimum=1)

    def probs_of(x):
        return predictive_log_probs(model, guide, x, num_samples=num_samples).exp()

    return _metrics(probs_of, loader, num_bins, f"posterior predictive ({num_samples} samples)")


def posterior_mean_metrics(model, guide, loader, *, num_bins: int = DEFAULT_BINS) -> Calibration:
    """Error, NLL, ECE and entropy of the posterior-mean network: a point estimate.

    Example::

        posterior_mean_metrics(model, guide, test_loader).ece
    """
    return _metrics(
        lambda x: posterior_mean_probs(model, guide, x), loader, num_bins, "posterior mean"
    )


def network_metrics(
    network, loader, *, num_bins: int = DEFAULT_BINS, predictor: str = "network"
) -> Calibration:
    """Error, NLL, ECE and entropy of a plain network, e.g. the compressed one: a point estimate.

    Its probabilities are one network's softmax, with nothing of the posterior's uncertainty
    about the weights; compare with :func:`predictive_metrics` to see what compression costs in
    calibration.

    Example::

        network_metrics(pyro_bc.compress(guide), test_loader, predictor="compressed")
    """
    return _metrics(lambda x: network_probs(network, x), loader, num_bins, predictor)
