"""pyro_bc: Bayesian Compression for Deep Learning (Louizos, Ullrich, Welling 2017) in Pyro.

Example::

    import pyro_bc
    from pyro_bc import priors
    from pyro_bc.models import LeNet300100

    model = LeNet300100(prior=priors.GroupNormalJeffreys(), dataset_size=60_000)
    guide = pyro_bc.StructuredGuide(model)
    pyro_bc.fit(model, guide, train_loader, epochs=200)
"""

from . import checkpoint, distributed, distributions, nn, poutine, priors
from .audit import kl_audit
from .checkpoint import CheckpointError, load_checkpoint
from .codec import load
from .compress import CompressedNetwork, compress
from .guides import StructuredGuide
from .infer import TrainingDivergedError, evaluate, fit, predict_logits

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompressedNetwork",
    "StructuredGuide",
    "TrainingDivergedError",
    "checkpoint",
    "compress",
    "distributed",
    "distributions",
    "evaluate",
    "fit",
    "kl_audit",
    "load",
    "load_checkpoint",
    "nn",
    "poutine",
    "predict_logits",
    "priors",
]
