"""Refitting the chosen network on all the training data, the validation split included.

The validation split makes the choices of a compression: which groups go, how many bits each
layer keeps, whether retraining paid. Once they are made it has nothing left to decide, so its
examples can train the network as well, as after any model selection on a held-out split.
:func:`refit` continues SVI on the posterior a network was compressed from, thinned to exactly
the groups that network kept, over every training example, and quantizes it again to the same
bit widths: the architecture and the rates stay those chosen on validation data; only the
weights learn from more examples. Nothing is chosen after the refit, and no held-out training
data is left to check it on: the test set reports it. See ``docs/method.md#refitting``.
"""

from __future__ import annotations

import dataclasses
import math

from ..checks import is_integer
from ..infer import fit, linear_decay
from .pipeline import compress
from .thinned_posterior import thin_posterior

#: the arguments of :func:`~pyro_bc.compress` that :func:`refit` passes on
REFIT_OPTIONS = {"test_loader", "predictive_samples", "input_shape"}


def refit(
    compressed,
    posterior,
    train_loader,
    *,
    epochs: int,
    lr: float,
    seed: int | None = None,
    progress: bool = False,
    **options,
):
    """Trains the posterior of ``compressed`` further on ``train_loader`` and compresses it again
    with the same groups and bit widths.

    :param compressed: a :class:`~pyro_bc.CompressedNetwork` from :func:`~pyro_bc.compress` or
        :func:`~pyro_bc.compression.compress_retrained` (with or without a validation budget).
    :param posterior: the guide ``compressed`` was compressed from (for ``compress_retrained``,
        the thinned guide it returns).
    :param train_loader: mini-batches of every training example, validation split included
        (never the test set); the thinned model's likelihood is scaled to
        ``len(train_loader.dataset)`` examples. It also calibrates the pruned inputs.
    :param epochs: epochs of SVI, Adam at ``lr`` decaying linearly to 0.
    :param seed: seeds the SVI epochs (:func:`~pyro_bc.fit`).
    :param options: more arguments of :func:`~pyro_bc.compress`: ``test_loader``,
        ``predictive_samples``, ``input_shape`` (:data:`REFIT_OPTIONS`; the others are the
        chosen network's).
    :returns: ``(refitted, thinned)``: the new :class:`~pyro_bc.CompressedNetwork`, with the
        architecture and bit widths of ``compressed`` and its rates, and the refitted thinned
        guide. Its report gives each layer's threshold and the rules that chose it and the bits,
        as the report of ``compressed`` does, and no validation error (those examples were
        trained on); its ``refit`` records the epochs, the learning rate, the examples and the
        validation error and budget the network was chosen at; ``retraining`` is carried over.
    :raises ValueError: if ``posterior`` does not keep the groups ``compressed`` kept (it is not
        the guide ``compressed`` came from), or for bad arguments.

    Example::

        chosen = pyro_bc.compress(guide, calibration=train, validation=val,
                                  max_error_increase=0.001)
        final, thinned = refit(chosen, guide, train_and_val, epochs=20, lr=1e-3, seed=0)
        final.report.pruning_rate == chosen.report.pruning_rate  # True
    """
    if not (is_integer(epochs) and epochs >= 1):
        raise ValueError(f"refit: epochs must be a positive integer, got {epochs!r}")
    fixed = sorted(set(options) - REFIT_OPTIONS)
    if fixed:
        raise TypeError(
            f"refit: {', '.join(fixed)} cannot be passed: the groups, bits and calibration are "
            f"the chosen network's; of compress's arguments only {', '.join(sorted(REFIT_OPTIONS))}"
        )
    chosen = getattr(compressed, "report", None)
    if chosen is None:
        raise ValueError(
            "refit: compressed has no report (a network read from a file has none); pass the "
            "network compress or compress_retrained returned, with the guide it came from"
        )
    if not hasattr(train_loader, "dataset"):
        raise TypeError(
            f"refit: train_loader must be a DataLoader (the length of its dataset scales the "
            f"likelihood), got {type(train_loader).__name__}"
        )
    if len(train_loader.dataset) == 0:
        raise ValueError("refit: train_loader's dataset is empty")
    thresholds = {layer.name: layer.threshold for layer in chosen.layers}
    try:
        thinned = thin_posterior(posterior, thresholds, calibration=train_loader)
    except ValueError as e:
        raise ValueError(f"refit: {e}; pass the guide compressed was compressed from") from e
    layers = [layer.site() for layer in thinned.model.bayesian_layers()]
    kept = [layer.groups_kept for layer in chosen.layers]
    groups = [layer.num_groups for layer in thinned.model.bayesian_layers()]
    if len(layers) != len(chosen.layers) or groups != kept:
        raise ValueError(
            f"refit: the posterior keeps {groups} groups of layers {layers} at the network's "
            f"thresholds, but the network kept {kept}: pass the guide compressed was compressed "
            "from (for compress_retrained, the thinned guide it returns)"
        )
    thinned.model.dataset_size = len(train_loader.dataset)
    fit(
        thinned.model,
        thinned,
        train_loader,
        epochs=epochs,
        lr=lr,
        lr_schedule=linear_decay(0, epochs),
        seed=seed,
        progress=progress,
    )
    refitted = compress(
        thinned,
        {name: math.inf for name in layers},
        bits={name: layer.frac_bits for name, layer in zip(layers, chosen.layers, strict=True)},
        calibration=train_loader,
        **options,
    )
    report = refitted.report
    # the groups and bits are the chosen network's: so are the rules that chose them
    report.layers = [
        dataclasses.replace(
            layer,
            threshold=before.threshold,
            threshold_rule=before.threshold_rule,
            groups_below_threshold=before.groups_below_threshold,
            bits_rule=before.bits_rule,
        )
        for layer, before in zip(report.layers, chosen.layers, strict=True)
    ]
    report.retraining = chosen.retraining
    report.refit = {
        "epochs": epochs,
        "lr": lr,
        "examples": len(train_loader.dataset),
        "chosen_validation_error": chosen.validation_error,
        "chosen_dense_validation_error": chosen.dense_validation_error,
        "max_error_increase": chosen.max_error_increase,
    }
    return refitted, thinned
