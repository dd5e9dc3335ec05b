"""Compression of a trained guide, in stages, one module each:

- :mod:`~pyro_bc.compression.chain`: the chain of modules, proved from a traced forward pass;
- :mod:`~pyro_bc.compression.summaries`: posterior summaries (pruning quantity, ``E[w]``,
  ``Var[w]``);
- :mod:`~pyro_bc.compression.thresholds`: per-layer thresholds (given, or the histogram valley);
- :mod:`~pyro_bc.compression.budget`: thresholds and bits for an error budget on validation data;
- :mod:`~pyro_bc.compression.masks`: group masks propagated along the chain;
- :mod:`~pyro_bc.compression.calibration`: pruned inputs replaced by their means;
- :mod:`~pyro_bc.compression.bits`: bit widths from posterior variances;
- :mod:`~pyro_bc.compression.thinning`: the thinned, quantized network;
- :mod:`~pyro_bc.compression.report`: the report and the paper's accounting;
- :mod:`~pyro_bc.compression.pipeline`: :func:`compress` and :func:`group_masks`;
- :mod:`~pyro_bc.compression.thinned_posterior`: the smaller Bayesian network and guide that
  keep only the kept groups, to retrain after pruning;
- :mod:`~pyro_bc.compression.retraining`: :func:`compress_retrained`, pruning past the budget,
  retraining the thinned posterior and compressing it again;
- :mod:`~pyro_bc.compression.refit`: :func:`refit`, the chosen network trained further on all
  the training data, validation split included, with the same groups and bit widths.

Example::

    compressed = pyro_bc.compress(guide, calibration=train_loader, test_loader=test_loader)
    print(compressed.report)
    compressed.save("lenet300.bc")
"""

from .bits import exponent_bits, significand_bits, weight_bits
from .chain import trace_chain
from .masks import LayerMasks
from .pipeline import analyse, compress, group_masks
from .refit import refit
from .report import CompressionReport, LayerReport
from .retraining import compress_retrained, retraining_pays
from .thinned_posterior import thin_posterior
from .thresholds import DEFAULT_THRESHOLD, histogram_valley

__all__ = [
    "CompressionReport",
    "DEFAULT_THRESHOLD",
    "LayerMasks",
    "LayerReport",
    "analyse",
    "compress",
    "compress_retrained",
    "exponent_bits",
    "group_masks",
    "histogram_valley",
    "refit",
    "retraining_pays",
    "significand_bits",
    "thin_posterior",
    "trace_chain",
    "weight_bits",
]
