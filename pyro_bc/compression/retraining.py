"""Retraining after pruning: prune past the budget, train the thinned posterior, compress again.

Pruning to a network that is smaller than the error budget allows costs accuracy that the
remaining groups can win back: :func:`compress_retrained` prunes with a looser validation budget,
continues SVI on the thinned posterior (:func:`~pyro_bc.compression.thin_posterior`, the guide
restricted to the kept groups) for a few epochs, and compresses that posterior again within the
real budget, counted from the validation error of the *original* dense network. It may repeat
this, each round pruning the posterior the last one retrained. Every choice is made on the
validation data. See ``docs/method.md#retraining``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..infer import evaluate, fit, linear_decay
from .pipeline import compress
from .thinned_posterior import thin_posterior


def compress_retrained(
    guide,
    train_loader,
    *,
    validation,
    max_error_increase: float,
    prune_error_increase: float | Sequence[float],
    epochs: int,
    lr: float,
    rounds: int = 1,
    seed: int | None = None,
    progress: bool = False,
    **options,
):
    """Compresses ``guide`` with retraining after pruning, in one round or more.

    :param train_loader: the training batches: SVI runs on them and they calibrate the pruned
        inputs (``compress(..., calibration=)``).
    :param validation: held-out training batches, never the test set.
    :param max_error_increase: the budget of the returned network, over the validation error of
        ``guide``'s dense posterior-mean network.
    :param prune_error_increase: the looser budget of the first pruning (at least
        ``max_error_increase``), or several: each is tried in turn (its own rounds, from
        ``guide``), and the smallest network within the budget over all of them is returned,
        so the looser budget is chosen on the validation data too.
    :param epochs: epochs of SVI on the thinned posterior, Adam at ``lr`` decaying linearly to 0.
    :param rounds: how many times to prune (within ``prune_error_increase`` of the original
        dense network's validation error) and retrain, each round starting from the posterior
        the last one retrained. Every round's posterior is compressed within
        ``max_error_increase``; the smallest of those networks that keeps to the budget on the
        validation data is returned (the first round's if none does). Round ``r`` trains with
        ``seed + r - 1``, whatever its looser budget.
    :param options: more arguments of :func:`~pyro_bc.compress` for the final compression
        (``bits``, ``test_loader``, ``predictive_samples``).

    :returns: ``(compressed, thinned)``: the :class:`~pyro_bc.CompressedNetwork` and the retrained
        thinned guide it was compressed from (``thinned.model`` is its Bayesian network). The
        report's ``retraining`` records the epochs, the learning rate, the looser budget chosen
        and the thinned architecture, and every round's looser budget, size and validation
        error; its rates count against ``guide``'s full network. The network may miss the
        budget if retraining does not win the error back: :func:`retraining_pays` compares it
        with ``compress`` without retraining.

    Example::

        small, thinned = compress_retrained(
            guide, train_loader, validation=val_loader, max_error_increase=0.001,
            prune_error_increase=(0.003, 0.005), epochs=10, lr=1e-3,
        )
        small.report.pruning_rate, small.report.retraining["prune_error_increase"]
    """
    looser = (
        list(prune_error_increase)
        if isinstance(prune_error_increase, Sequence)
        else [prune_error_increase]
    )
    if not looser or not all(0 <= max_error_increase <= value < 1 for value in looser):
        raise ValueError(
            "compress_retrained: need 0 <= max_error_increase <= prune_error_increase < 1 (for "
            f"each, if several), got {max_error_increase!r} and {prune_error_increase!r}"
        )
    if epochs < 1:
        raise ValueError(f"compress_retrained: epochs must be at least 1, got {epochs}")
    if rounds < 1:
        raise ValueError(f"compress_retrained: rounds must be at least 1, got {rounds}")
    reference = evaluate(guide.model, guide, validation)["error"]
    allowed = reference + max_error_increase
    candidates = []  # (network, posterior, round's record) per round
    for prune in looser:
        posterior = guide
        for round_ in range(1, rounds + 1):
            pruned = compress(
                posterior,
                calibration=train_loader,
                validation=validation,
                max_error_increase=prune,
                reference_error=reference,
                predictive_samples=0,
            )
            thresholds = {layer.name: layer.threshold for layer in pruned.report.layers}
            posterior = thin_posterior(posterior, thresholds, calibration=train_loader)
            fit(
                posterior.model,
                posterior,
                train_loader,
                epochs=epochs,
                lr=lr,
                lr_schedule=linear_decay(0, epochs),
                seed=None if seed is None else seed + round_ - 1,
                progress=progress,
            )
            compressed = compress(
                posterior,
                calibration=train_loader,
                validation=validation,
                max_error_increase=max_error_increase,
                reference_error=reference,
                **options,
            )
            record = {
                "round": round_,
                "prune_error_increase": prune,
                "thinned_architecture": pruned.report.architecture.split(" -> ")[-1],
                "thinned_validation_error": pruned.report.validation_error,
                "weights_kept": compressed.report.weights_kept,
                "validation_error": compressed.report.validation_error,
            }
            candidates.append((compressed, posterior, record))
    within = [c for c in candidates if c[0].report.validation_error <= allowed]
    compressed, posterior, chosen = (
        min(within, key=lambda c: c[0].report.weights_kept) if within else candidates[0]
    )
    compressed.report.retraining = {
        "epochs": epochs,
        "lr": lr,
        "prune_error_increase": chosen["prune_error_increase"],
        "rounds": rounds,
        "round": chosen["round"],
        "thinned_architecture": chosen["thinned_architecture"],
        "thinned_validation_error": chosen["thinned_validation_error"],
        "history": [record for *_, record in candidates],
    }
    return compressed, posterior


def retraining_pays(without, retrained, max_error_increase: float) -> bool:
    """Whether the retrained network is the one to keep: fewer weights than ``without`` (the
    report of ``compress`` within the same budget) and within that budget on validation data.

    Example::

        plain = pyro_bc.compress(guide, validation=val, max_error_increase=0.001)
        retrained, _ = compress_retrained(guide, train, validation=val, max_error_increase=0.001,
                                          prune_error_increase=0.005, epochs=10, lr=1e-3)
        best = retrained if retraining_pays(plain.report, retrained.report, 0.001) else plain
    """
    allowed = without.dense_validation_error + max_error_increase
    return retrained.weights_kept < without.weights_kept and retrained.validation_error <= allowed
