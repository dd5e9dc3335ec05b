"""pyro_bc: Bayesian Compression for Deep Learning (Louizos, Ullrich, Welling 2017) in Pyro.

Example::

    import pyro_bc
    from pyro_bc import priors
    from pyro_bc.models import LeNet300100

    model = LeNet300100(prior=priors.GroupNormalJeffreys(), dataset_size=60_000)
    guide = pyro_bc.StructuredGuide(model)
    pyro_bc.fit(model, guide, train_loader, epochs=200)
    compressed = pyro_bc.compress(guide, calibration=train_loader)
    compressed.save("lenet300.bc")            # pyro_bc.load("lenet300.bc") gives it back
"""

from . import distributions, nn, poutine, priors
from .audit import kl_audit
from .compressed import CompressedNetwork, load, save
from .compression import compress, group_masks
from .guides import StructuredGuide
from .infer import evaluate, fit, load_checkpoint, predict_logits

__version__ = "0.1.0"

__all__ = [
    "CompressedNetwork",
    "StructuredGuide",
    "compress",
    "distributions",
    "evaluate",
    "fit",
    "group_masks",
    "kl_audit",
    "load",
    "load_checkpoint",
    "nn",
    "poutine",
    "predict_logits",
    "priors",
    "save",
]
