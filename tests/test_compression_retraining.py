"""compress_retrained: prune past the budget, retrain the thinned posterior, compress again."""

import pytest
import torch
from test_compression_budget import USELESS, _model_and_data

from pyro_bc.compression import compress_retrained


def _retrained(prune_error_increase, epochs=1, lr=1e-4, seed=0, rounds=1, budget=0.0):
    """The report of ``compress_retrained`` (retraining seed 0) on the small network of data
    seed ``seed``, its pruning quantities spread so that no two groups tie."""
    model, guide, loader = _model_and_data(seed=seed)
    model.dataset_size = len(loader.dataset)
    with torch.no_grad():  # no ties between pruning quantities, so thresholds rank the groups
        for layer in guide.layers:
            layer.scale_factors[0].log_var.add_(
                torch.linspace(0, 0.1, layer.scale_factors[0].log_var.numel())
            )
    compressed, _ = compress_retrained(
        guide,
        loader,
        validation=loader,
        max_error_increase=budget,
        prune_error_increase=prune_error_increase,
        epochs=epochs,
        lr=lr,
        rounds=rounds,
        seed=0,
    )
    return compressed.report


def test_rates_count_against_the_original_network_and_the_report_says_so():
    report = _retrained(0.0)
    assert report.weights == 8 * 6 + 6 * 3
    assert report.architecture.startswith("8-6 -> ")
    assert report.layers[0].groups_kept <= 8 - len(USELESS)
    assert report.reference_validation_error == 0.0
    assert report.retraining["epochs"] == 1
    assert report.retraining["thinned_architecture"] == "4-6"
    assert "retraining" in str(report) and "over the reference 0.00%" in str(report)


def test_retraining_wins_back_error_that_pruning_cost():
    report = _retrained(0.3, epochs=30, lr=3e-2, seed=1)
    thinned = report.retraining["thinned_validation_error"]
    assert thinned > 0.05
    assert report.dense_validation_error < thinned


def test_rounds_prune_from_the_last_retrained_posterior_and_keep_the_smallest_within_budget():
    report = _retrained(0.15, epochs=10, lr=3e-2, rounds=3, budget=0.05)
    history = report.retraining["history"]
    assert [h["round"] for h in history] == [1, 2, 3]
    kept = [sum(int(u) for u in h["thinned_architecture"].split("-")) for h in history]
    assert kept == sorted(kept, reverse=True)  # each round starts from the last one's network
    allowed = report.reference_validation_error + 0.05
    within = [h for h in history if h["validation_error"] <= allowed]
    assert within and len(within) < len(history)  # a smaller round over the budget is not kept
    best = min(within, key=lambda h: h["weights_kept"])
    assert report.retraining["round"] == best["round"]
    assert report.weights_kept == best["weights_kept"]
    assert f"round {best['round']} of 3" in str(report)


def test_several_looser_budgets_run_as_separately_and_the_smallest_within_budget_is_kept():
    kwargs = dict(epochs=10, lr=3e-2, rounds=2, budget=0.05)
    alone = [_retrained(prune, **kwargs).retraining["history"] for prune in (0.05, 0.3)]
    report = _retrained((0.05, 0.3), **kwargs)
    history = report.retraining["history"]
    assert history == alone[0] + alone[1]  # each budget's rounds start from the trained guide
    assert [h["prune_error_increase"] for h in history] == [0.05, 0.05, 0.3, 0.3]
    allowed = report.reference_validation_error + 0.05
    within = [h for h in history if h["validation_error"] <= allowed]
    best = min(within, key=lambda h: h["weights_kept"])
    assert report.weights_kept == best["weights_kept"]
    assert report.retraining["prune_error_increase"] == best["prune_error_increase"]
    assert report.retraining["round"] == best["round"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_error_increase": 0.01, "prune_error_increase": 0.0}, "prune_error_increase"),
        ({"max_error_increase": 0.01, "prune_error_increase": (0.02, 0.0)}, "each"),
        ({"prune_error_increase": ()}, "prune_error_increase"),
        ({"epochs": 0}, "epochs"),
        ({"rounds": 0}, "rounds"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, guide, loader = _model_and_data()
    arguments = dict(
        validation=loader, max_error_increase=0.0, prune_error_increase=0.0, epochs=1, lr=1e-3
    )
    with pytest.raises(ValueError, match=match):
        compress_retrained(guide, loader, **{**arguments, **kwargs})
