"""The ``pyro-bc`` command: train, compress and inspect Bayesian-compressed networks.

Example::

    pyro-bc run --model lenet300 --prior gnj            # shipped MNIST subset, a few minutes
    pyro-bc run --model lenet5 --data ~/mnist --epochs 200 --out runs/lenet5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyro

from . import data as bc_data
from . import priors
from .guides import StructuredGuide
from .infer import evaluate, fit, pretrain

MODELS = {"lenet300": "LeNet300100", "lenet5": "LeNet5Caffe"}
PRIORS = {"gnj": priors.GroupNormalJeffreys}
#: the authors' clipping of the weight variances (LeNet-300-100's first layer)
CLIP_VAR = {"lenet300": {"fc1": 0.04}, "lenet5": None}


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def build(model_name, prior_name, dataset_size):
    """Model and guide for ``--model`` and ``--prior``."""
    from . import models

    if model_name not in MODELS:
        raise CommandError(f"unknown --model {model_name!r}; choose from {sorted(MODELS)}")
    if prior_name not in PRIORS:
        raise CommandError(f"unknown --prior {prior_name!r}; choose from {sorted(PRIORS)}")
    network = getattr(models, MODELS[model_name])
    model = network(prior=PRIORS[prior_name](), dataset_size=dataset_size)
    return network, model, StructuredGuide(model, clip_var=CLIP_VAR[model_name])


def _load_data(source):
    try:
        return bc_data.load(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e


def run(args):
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    data = _load_data(args.data)
    train_loader, test_loader = bc_data.mnist_loaders(data, batch_size=args.batch_size)
    network, model, guide = build(args.model, args.prior, len(data.train_x))
    checkpoint = out / "checkpoint.pt"
    resuming = args.resume and checkpoint.exists()
    if args.pretrain_epochs > 0 and not resuming:
        twin = pretrain(network.deterministic(), train_loader, epochs=args.pretrain_epochs)
        guide.init_from(twin)
    history = fit(
        model,
        guide,
        train_loader,
        epochs=args.epochs,
        lr=args.lr,
        test_loader=test_loader,
        checkpoint=checkpoint,
        resume=args.resume,
        seed=args.seed,
    )
    result = evaluate(model, guide, test_loader, num_samples=args.mc_samples)
    summary = {
        "model": args.model,
        "prior": args.prior,
        "data": str(args.data),
        "epochs": len(history),
        "test_error_posterior_mean": result["error"],
        f"test_error_mc{args.mc_samples}": result.get("error_mc"),
        "checkpoint": str(checkpoint),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def parser():
    p = argparse.ArgumentParser(prog="pyro-bc", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="train, evaluate and save a Bayesian network")
    r.add_argument("--model", default="lenet300", help=f"one of {sorted(MODELS)}")
    r.add_argument("--prior", default="gnj", help=f"one of {sorted(PRIORS)}")
    r.add_argument(
        "--data", default="subset", help="'subset' (shipped), 'mnist' (cache) or a directory"
    )
    r.add_argument("--epochs", type=int, default=30)
    r.add_argument("--pretrain-epochs", type=int, default=5)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--mc-samples", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    r.add_argument("--out", default="runs/latest", help="output folder")
    r.set_defaults(handler=run)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except CommandError as e:
        print(f"pyro-bc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
