"""The ``pyro-bc`` command: train, compress and inspect Bayesian-compressed networks.

Example::

    pyro-bc run --model lenet300 --prior gnj          # shipped MNIST subset, a few minutes
    pyro-bc run --model lenet5 --prior ghs --data ~/mnist --epochs 200 --out runs/lenet5
    pyro-bc compress runs/latest/checkpoint.pt --thresholds fc1=-2.8,fc2=-3,fc3=-5
    pyro-bc evaluate runs/latest/model.bc
    pyro-bc info runs/latest/model.bc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyro

from . import datasets as bc_data
from . import models, plots
from .codec import CompressedFileError
from .compressed import CompressedNetwork
from .compression import compress
from .files import write_atomically
from .infer import evaluate, fit, load_checkpoint, pretrain
from .models import MODELS, PRIORS, recipe


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def build(model_name, prior_name, dataset_size):
    """Network class, model and guide for ``--model`` and ``--prior`` (their recipe's).

    Example::

        network, model, guide = build("lenet300", "gnj", 60_000)
    """
    try:
        return models.build(model_name, prior_name, dataset_size)
    except ValueError as e:
        raise CommandError(str(e)) from None


def parse_thresholds(text):
    """``"auto"``, ``"-3"`` or ``"fc1=-2.8,fc2=auto"`` as compress's ``thresholds`` argument.

    Example::

        parse_thresholds("fc1=-2.8,fc2=-3")   # {'fc1': -2.8, 'fc2': -3.0}
    """
    if text is None:
        return None

    def value(v):
        if v == "auto":
            return v
        try:
            return float(v)
        except ValueError:
            raise CommandError(f"threshold {v!r} is neither a number nor 'auto'") from None

    if "=" not in text:
        return value(text)
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise CommandError(f"--thresholds {text!r}: write LAYER=VALUE pairs, e.g. fc1=-3,fc2=auto")
    return {name: value(v) for name, v in pairs}


def _load_data(source):
    try:
        return bc_data.load_mnist(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e


def _compress(guide, thresholds, test_loader, out, calibration=None):
    try:
        compressed = compress(
            guide, thresholds=thresholds, test_loader=test_loader, calibration=calibration
        )
    except ValueError as e:
        raise CommandError(str(e)) from e
    compressed.save(out / "model.bc")
    report = compressed.report
    write_atomically(out / "report.json", report.to_json(indent=2).encode())
    print(report)
    return compressed


def _figures(guide, compressed, thresholds, out, history=None):
    plots.pruning_histograms(guide, thresholds=thresholds, path=out / "pruning-histograms.png")
    plots.weight_matrices(guide, compressed, path=out / "weights.png")
    plots.bits_per_layer(compressed, path=out / "bits.png")
    if history is not None:
        plots.training_curves(history, path=out / "training.png")


def run(args):
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    data = _load_data(args.data)
    train_loader, test_loader = bc_data.train_test_loaders(data, batch_size=args.batch_size)
    network, model, guide = build(args.model, args.prior, len(data.train_x))
    thresholds = parse_thresholds(args.thresholds)
    checkpoint = out / "checkpoint.pt"
    if args.pretrain_epochs > 0 and not (args.resume and checkpoint.exists()):
        twin = pretrain(network.deterministic(), train_loader, epochs=args.pretrain_epochs)
        guide.init_from(twin, rescale=recipe(args.model, args.prior).rescale)
    metadata = {"model": args.model, "prior": args.prior, "dataset_size": len(data.train_x)}
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
        metadata=metadata,
    )
    dense = evaluate(model, guide, test_loader, num_samples=args.mc_samples)
    compressed = _compress(guide, thresholds, test_loader, out, calibration=train_loader)
    _figures(guide, compressed, thresholds, out, history)
    summary = {
        **metadata,
        "data": str(args.data),
        "epochs": len(history),
        "test_error_posterior_mean": dense["error"],
        f"test_error_mc{args.mc_samples}": dense.get("error_mc"),
        "test_error_compressed": compressed.report.test_error,
        "architecture": compressed.report.architecture,
        "pruning_rate": compressed.report.pruning_rate,
        "precision_rate": compressed.report.precision_rate,
        "file_bytes": compressed.report.file_bytes,
        "file_rate": compressed.report.file_rate,
        "files": {
            "checkpoint": str(checkpoint),
            "compressed": str(out / "model.bc"),
            "report": str(out / "report.json"),
        },
    }
    write_atomically(out / "summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))


def compress_checkpoint(args):
    try:
        state = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from e
    metadata = dict(state.get("metadata") or {})
    model_name = args.model or metadata.get("model")
    prior_name = args.prior or metadata.get("prior")
    if not model_name or not prior_name:
        raise CommandError(
            f"{args.checkpoint} does not say which model and prior it holds; pass --model and "
            "--prior"
        )
    _, _, guide = build(model_name, prior_name, metadata.get("dataset_size"))
    try:
        guide.load_state_dict(state["guide"])
    except RuntimeError as e:
        raise CommandError(
            f"{args.checkpoint} does not fit --model {model_name} --prior {prior_name}: {e}"
        ) from e
    train_loader = test_loader = None
    if args.data is not None:
        train_loader, test_loader = bc_data.train_test_loaders(_load_data(args.data))
    out = Path(args.out or Path(args.checkpoint).parent)
    thresholds = parse_thresholds(args.thresholds)
    compressed = _compress(guide, thresholds, test_loader, out, calibration=train_loader)
    _figures(guide, compressed, thresholds, out)


def _load_network(path):
    try:
        return CompressedNetwork.load(path)
    except (FileNotFoundError, CompressedFileError) as e:
        raise CommandError(str(e)) from e


def evaluate_file(args):
    network = _load_network(args.file)
    test_loader = bc_data.train_test_loaders(_load_data(args.data))[1]
    result = network.evaluate(test_loader)
    print(json.dumps({"file": str(args.file), "data": str(args.data), **result}, indent=2))


def info(args):
    network = _load_network(args.file)
    weights = sum(m.weight.numel() for m in network.modules() if hasattr(m, "weight"))
    print(f"{args.file}: {Path(args.file).stat().st_size} bytes, {weights} weights")
    print(f"input shape: {network.input_shape}")
    print(f"fraction bits per layer: {network.formats}")
    print(network)


def parser():
    p = argparse.ArgumentParser(prog="pyro-bc", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)

    r = commands.add_parser("run", help="train, compress and save a Bayesian network")
    r.add_argument("--model", default="lenet300", choices=sorted(MODELS))
    r.add_argument("--prior", default="gnj", choices=sorted(PRIORS))
    r.add_argument(
        "--data", default="subset", help="'subset' (shipped), 'mnist' (cache) or a directory"
    )
    r.add_argument("--epochs", type=int, default=30)
    r.add_argument("--pretrain-epochs", type=int, default=5)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--mc-samples", type=int, default=10)
    r.add_argument("--thresholds", help="'auto' (default), a number, or LAYER=VALUE pairs")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    r.add_argument("--out", default="runs/latest", help="output folder")
    r.set_defaults(handler=run)

    c = commands.add_parser("compress", help="compress a checkpoint written by run")
    c.add_argument("checkpoint")
    c.add_argument("--model", choices=sorted(MODELS), help="default: from the checkpoint")
    c.add_argument("--prior", choices=sorted(PRIORS), help="default: from the checkpoint")
    c.add_argument("--thresholds", help="'auto' (default), a number, or LAYER=VALUE pairs")
    c.add_argument(
        "--data",
        help="data for the test error and for the means of pruned inputs ('subset', a directory)",
    )
    c.add_argument("--out", help="output folder (default: the checkpoint's)")
    c.set_defaults(handler=compress_checkpoint)

    e = commands.add_parser("evaluate", help="test error of a compressed file")
    e.add_argument("file")
    e.add_argument("--data", default="subset")
    e.set_defaults(handler=evaluate_file)

    i = commands.add_parser("info", help="what a compressed file holds")
    i.add_argument("file")
    i.set_defaults(handler=info)
    return p


def main(argv=None):
    """Entry point of the ``pyro-bc`` command; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except CommandError as e:
        print(f"pyro-bc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
