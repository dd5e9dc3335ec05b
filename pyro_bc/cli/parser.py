"""The ``pyro-bc`` argument parser: help with defaults, examples and the recipes."""

from __future__ import annotations

import argparse

from .. import __version__
from ..models import MODELS, PRIORS, RECIPES
from .commands import compress_checkpoint, evaluate_file, export, info, run
from .options import (
    VALIDATION_IMAGES,
    device,
    error_fraction,
    existing_file,
    learning_rate,
    non_negative_int,
    output_file,
    output_folder,
    parse_thresholds,
    positive_int,
    seed,
)

# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other error of the command."""

    def error(self, message):
        self.exit(2, f"pyro-bc: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one; None (computed) and flags say theirs in the help."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


DESCRIPTION = """\
Bayesian Compression for Deep Learning (Louizos, Ullrich, Welling 2017) with Pyro: train
networks with group-sparsity priors, prune their neurons and filters, quantize their weights,
and save them as small .bc files.

Errors are one line, "pyro-bc: error: ...", exit status 2 (--debug shows the traceback)."""

EXAMPLES = """\
examples:
  pyro-bc run --model lenet300 --prior gnj       # shipped MNIST subset, under a minute
  pyro-bc run --model lenet5 --prior ghs --data ~/mnist --out runs/lenet5
  pyro-bc run --model vgg16 --data cifar10 --download --device cuda
  pyro-bc compress runs/latest/checkpoint.pt --thresholds fc1=-2.8,fc2=-3,fc3=-5
  pyro-bc compress runs/latest/checkpoint.pt --max-error-increase 0.002 --out runs/smaller
  pyro-bc evaluate runs/latest/model.bc
  pyro-bc info runs/latest/model.bc
  pyro-bc export runs/latest/model.bc --onnx model.onnx --torchscript model.pt"""

DATA_HELP = (
    "'subset' (the MNIST subset shipped with pyro_bc: 10,000 training, 2,000 test images), "
    "'mnist' (full MNIST in the user cache), 'cifar10' (the CIFAR-10 binary release in the "
    "user cache), 'synthetic-cifar10' (1,024 training and 256 test random CIFAR-shaped images "
    "whose class shows in their mean: smoke tests in seconds), or a directory with the MNIST "
    "or CIFAR-10 files (default: 'subset' for the LeNets, 'cifar10' for vgg16)"
)
THRESHOLDS_HELP = (
    "pruning thresholds of log alpha: 'auto' (each layer's histogram valley), a number, or "
    "LAYER=VALUE pairs such as fc1=-2.8,fc2=auto (default: the recipe's, where no budget is "
    "searched)"
)
VALIDATION_HELP = (
    "hold out the last N training images (never trained on) as validation data, on which "
    f"--max-error-increase searches; 0 holds none out (default: {VALIDATION_IMAGES:,}, or a "
    "fifth of the training images if fewer: 2,000 of the shipped subset)"
)
BUDGET_HELP = (
    "search the thresholds and bit widths for the smallest network whose validation error is "
    "at most this much (a fraction: 0.001 = 0.1 points) above the dense network's (default: "
    "for run, with images held out and no --thresholds, the recipe's budget, 0.001 for the "
    "LeNets on full MNIST, 0.005 on the shipped subset, none for vgg16, which then uses its "
    "thresholds; for compress: no search, the thresholds of --thresholds)"
)

RETRAIN_EPOCHS_HELP = (
    "with an error budget: also prune to the looser --prune-error-increase, train the thinned "
    "posterior this many epochs and compress it again within the budget; the smaller network "
    "within the budget is kept (0: none; default: the recipe's for run, 0 for compress)"
)
RETRAIN_ROUNDS_HELP = (
    "with --retrain-epochs: prune and retrain this many times, each round from the last one's "
    "posterior; the smallest round within the budget is kept (default: the recipe's)"
)
REFIT_EPOCHS_HELP = (
    "then train the chosen network's posterior (its groups and bit widths fixed) this many "
    "epochs more on all training images, the held-out ones included, and save that network "
    "(needs held-out images; 0: none; default: the recipe's for run, 0 for compress)"
)
PRUNE_BUDGET_HELP = (
    "the looser validation budget of the pruning before retraining, or several: each is tried "
    "and the smallest network within the budget kept (default: the recipe's)"
)


def _recipes_table():
    rows = [
        f"  {m:<9}{p:<5}{r.epochs:>7}{r.pretrain_epochs:>10}{r.lr:>9g}{r.decay_epochs:>7}"
        f"{r.batch_size:>7}  {r.thresholds}"
        for (m, p), r in RECIPES.items()
    ]
    header = f"  {'model':<9}{'prior':<5}{'epochs':>7}{'pretrain':>10}{'lr':>9}{'decay':>7}"
    return "\n".join(
        ["recipes (used where the option is not given):", header + "  batch  thresholds", *rows]
    )


def _pruning_options(command):
    """How ``command`` chooses what to prune: thresholds or an error budget, and retraining."""
    how = command.add_mutually_exclusive_group()
    how.add_argument("--thresholds", metavar="T", type=parse_thresholds, help=THRESHOLDS_HELP)
    how.add_argument("--max-error-increase", metavar="F", type=error_fraction, help=BUDGET_HELP)
    command.add_argument(
        "--retrain-epochs", metavar="N", type=non_negative_int, help=RETRAIN_EPOCHS_HELP
    )
    command.add_argument(
        "--retrain-rounds", metavar="N", type=positive_int, help=RETRAIN_ROUNDS_HELP
    )
    command.add_argument(
        "--refit-epochs", metavar="N", type=non_negative_int, help=REFIT_EPOCHS_HELP
    )
    command.add_argument(
        "--prune-error-increase",
        metavar="F",
        type=error_fraction,
        nargs="+",
        help=PRUNE_BUDGET_HELP,
    )


def _figures_option(command):
    command.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="skip the PNG figures (pruning histograms, weights, bits, training curves), which "
        "take most of the time of a quick run",
    )


def parser() -> argparse.ArgumentParser:
    """The ``pyro-bc`` argument parser.

    Example::

        args = parser().parse_args(["info", "model.bc"])
    """
    p = _Parser(
        prog="pyro-bc", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_Formatter
    )
    p.add_argument("--version", action="version", version=f"pyro-bc {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # the same flag after the command; SUPPRESS keeps the one before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, epilog=None):
        return commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=epilog,
            parents=[common],
            formatter_class=_Formatter,
        )

    r = command(
        "run",
        "pretrain, train, compress and save a Bayesian network as its recipe says",
        epilog=_recipes_table()
        + "\n\nexample:\n  pyro-bc run --model vgg16 --data synthetic-cifar10 --width 4 "
        "--epochs 1 --pretrain-epochs 0",
    )
    r.add_argument("--model", default="lenet300", choices=sorted(MODELS), help="the network")
    r.add_argument(
        "--prior",
        default="gnj",
        choices=sorted(PRIORS),
        help="group normal-Jeffreys, group horseshoe or regularized horseshoe",
    )
    r.add_argument("--data", metavar="NAME|DIR", help=DATA_HELP)
    r.add_argument(
        "--download", action="store_true", help="fetch MNIST or CIFAR-10 if files are missing"
    )
    r.add_argument(
        "--width",
        metavar="N",
        type=positive_int,
        help="vgg16 only: channels of the first block; small for quick runs (default: 64, the "
        "paper's)",
    )
    r.add_argument(
        "--epochs", metavar="N", type=positive_int, help="epochs of SVI (default: the recipe's)"
    )
    r.add_argument(
        "--pretrain-epochs",
        metavar="N",
        type=non_negative_int,
        help="epochs of the deterministic twin before SVI (default: the recipe's)",
    )
    r.add_argument(
        "--lr", type=learning_rate, help="Adam's learning rate for SVI (default: the recipe's)"
    )
    r.add_argument(
        "--decay-epochs",
        metavar="N",
        type=non_negative_int,
        help="the learning rate decays linearly to 0 over these last epochs (default: the "
        "recipe's)",
    )
    r.add_argument(
        "--batch-size",
        metavar="N",
        type=positive_int,
        help="training batch size (default: the recipe's)",
    )
    r.add_argument(
        "--mc-samples",
        metavar="N",
        type=non_negative_int,
        default=10,
        help="samples of the Monte Carlo predictive for the reported test error (0: none)",
    )
    r.add_argument("--validation", type=non_negative_int, metavar="N", help=VALIDATION_HELP)
    _pruning_options(r)
    r.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    r.add_argument("--seed", type=seed, default=0, help="seed of every random draw")
    r.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists"
    )
    r.add_argument("--out", type=output_folder, default="runs/latest", help="output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    _figures_option(r)
    r.set_defaults(handler=run)

    c = command("compress", "compress a checkpoint written by run, with other choices")
    c.add_argument("checkpoint", type=existing_file, help="a checkpoint.pt written by run")
    c.add_argument(
        "--model", choices=sorted(MODELS), help="the network (default: the checkpoint's)"
    )
    c.add_argument("--prior", choices=sorted(PRIORS), help="the prior (default: the checkpoint's)")
    c.add_argument(
        "--width", metavar="N", type=positive_int, help="vgg16 only (default: the checkpoint's)"
    )
    c.add_argument(
        "--data",
        help="data for the test error, the means of pruned inputs and the validation images "
        "(names as for run; default: the data the checkpoint was trained on)",
    )
    c.add_argument(
        "--download", action="store_true", help="fetch MNIST or CIFAR-10 if files are missing"
    )
    c.add_argument(
        "--validation",
        type=non_negative_int,
        metavar="N",
        help="hold out the last N training images (default: as many as run held out)",
    )
    _pruning_options(c)
    c.add_argument(
        "--out", type=output_folder, help="output folder (default: the checkpoint's folder)"
    )
    _figures_option(c)
    c.set_defaults(handler=compress_checkpoint)

    e = command("evaluate", "test error of a compressed .bc file")
    e.add_argument("file", type=existing_file, help="a .bc file")
    e.add_argument(
        "--data",
        help="test data, names as for run (default: 'subset' for MNIST-shaped networks, "
        "'cifar10' for CIFAR-shaped ones)",
    )
    e.add_argument(
        "--download", action="store_true", help="fetch MNIST or CIFAR-10 if files are missing"
    )
    e.set_defaults(handler=evaluate_file)

    i = command("info", "what a compressed .bc file holds")
    i.add_argument("file", type=existing_file, help="a .bc file")
    i.set_defaults(handler=info)

    x = command("export", "write a compressed .bc file as ONNX and/or TorchScript")
    x.add_argument("file", type=existing_file, help="a .bc file")
    x.add_argument("--onnx", type=output_file, help="where to write the ONNX model (default: none)")
    x.add_argument(
        "--torchscript",
        type=output_file,
        help="where to write the TorchScript file (default: none)",
    )
    x.set_defaults(handler=export)
    return p


#: failures a user causes and can fix: one line, exit status 2 (OSError covers missing and
#: unreadable files, permissions, a full disk and failed downloads)
