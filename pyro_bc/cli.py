"""The ``pyro-bc`` command: train, compress, inspect and export Bayesian-compressed networks.

Every option is checked before any work starts; every failure a user can cause (a bad option, a
missing or corrupt file, a checkpoint of another model, bad data, training that diverges) is one
line on stderr, ``pyro-bc: error: ...``, and exit status 2. ``--debug`` shows the traceback.

Example::

    pyro-bc run --model lenet300 --prior gnj          # shipped MNIST subset, a few minutes
    pyro-bc run --model lenet5 --prior ghs --data ~/mnist --epochs 200 --out runs/lenet5
    pyro-bc run --model vgg16 --data cifar10 --download --device cuda --max-error-increase 0.005
    pyro-bc compress runs/latest/checkpoint.pt --thresholds fc1=-2.8,fc2=-3,fc3=-5
    pyro-bc evaluate runs/latest/model.bc
    pyro-bc info runs/latest/model.bc
    pyro-bc export runs/latest/model.bc --onnx model.onnx --torchscript model.pt
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pyro
import torch

from . import __version__, plots
from . import datasets as bc_data
from .checkpoint import CheckpointError, load_checkpoint
from .codec import CompressedFileError
from .compressed import CompressedNetwork
from .compression import compress
from .datasets import DataFileError, RandomCropFlip, TensorBatches
from .export import export_file
from .files import write_atomically
from .infer import TrainingDivergedError, evaluate, fit, linear_decay, pretrain
from .models import MODELS, PRIORS, RECIPES, build, recipe

#: what ``--data`` names besides a directory, and the data set each one is
DATA_NAMES = {
    "subset": "mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "synthetic-cifar10": "cifar10",
}
#: the ``--data`` a network gets when none is given, by its recipe's data set
DEFAULT_DATA = {"mnist": "subset", "cifar10": "cifar10"}
#: the shape of one image of each data set (how ``evaluate`` tells what a ``.bc`` file takes)
INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
#: ``--data synthetic-cifar10``: this many random training and test images
SYNTHETIC_SIZES = {"train": 1024, "test": 256}
#: the most training images ``--validation`` holds out by default (a fifth when there are fewer)
VALIDATION_IMAGES = 10_000
#: batches of evaluation, calibration and validation passes
EVAL_BATCH_SIZE = 1000


class CommandError(Exception):
    """A user error: printed as one line, exit status 2.

    Example::

        raise CommandError("--validation 20000: the data has only 10000 training images")
    """


# ---------------------------------------------------------------------------------------------
# Option types: argparse calls them while parsing, so a bad value stops the command at once,
# as one line naming the option.


def positive_int(text: str) -> int:
    """An integer >= 1 (``--epochs``, ``--batch-size``, ``--width``).

    Example::

        positive_int("30")  # 30
    """
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (sample counts, ``--validation``, ``--pretrain-epochs``).

    Example::

        non_negative_int("0")  # 0
    """
    return _bounded_int(text, 0)


def _bounded_int(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in 0..2**32 - 1 (what Pyro's ``set_rng_seed`` takes).

    Example::

        seed("0")  # 0
    """
    value = _bounded_int(text, 0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer below 2**32, got {value}")
    return value


def learning_rate(text: str) -> float:
    """A finite number > 0 (``--lr``).

    Example::

        learning_rate("1e-3")  # 0.001
    """
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def error_fraction(text: str) -> float:
    """A fraction in [0, 1) (``--max-error-increase``: 0.001 is 0.1 points of error).

    Example::

        error_fraction("0.005")  # 0.005
    """
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in [0, 1) (0.001 = 0.1 points of error), got {text!r}"
        )
    return value


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def parse_thresholds(text: str):
    """``"auto"``, ``"-3"`` or ``"fc1=-2.8,fc2=auto"`` as compress's ``thresholds`` argument.

    Example::

        parse_thresholds("fc1=-2.8,fc2=-3")   # {'fc1': -2.8, 'fc2': -3.0}
    """

    def value(v):
        if v == "auto":
            return v
        try:
            number = float(v)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"threshold {v!r} is neither a number nor 'auto'")
        return number

    if "=" not in text:
        return value(text)
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write LAYER=VALUE pairs, e.g. fc1=-3,fc2=auto")
    return {name: value(v) for name, v in pairs}


def existing_file(text: str) -> Path:
    """A path to an existing file (a checkpoint or a ``.bc`` file).

    Example::

        existing_file("runs/latest/model.bc")
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: an existing directory, or one that can be created.

    Example::

        output_folder("runs/latest")
    """
    path = Path(text).expanduser()
    _check_writable_below(path, text, what="folder")
    return path


def output_file(text: str) -> Path:
    """A file to write: not a directory, in a folder that exists or can be created.

    Example::

        output_file("model.onnx")
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    _check_writable_below(path.parent, text, what="file's folder")
    return path


def _check_writable_below(path, text, what):
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a {what}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f"{text}: {folder} is not writable")
            return


def device(text: str) -> torch.device:
    """A device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Example::

        device("cpu")  # device(type='cpu')
    """
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; write cpu, cuda, cuda:N or mps"
        ) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: CUDA is not available on this machine (torch.cuda.is_available() is "
                "False); use --device cpu"
            )
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: supported devices are cpu, cuda, cuda:N, mps")
    return d


# ---------------------------------------------------------------------------------------------
# Data


def load_data(source: str, dataset: str, *, download: bool = False, option: str = "--data"):
    """The images for a network made for ``dataset`` (``"mnist"`` or ``"cifar10"``) from
    ``--data`` ``source``: a name of :data:`DATA_NAMES` or a directory of that data set's files.

    Example::

        data = load_data("subset", "mnist")
    """
    kind = DATA_NAMES.get(source, dataset)
    if kind != dataset:
        raise CommandError(
            f"{option} {source} holds {kind} images, but the network takes {dataset} images "
            f"{'x'.join(map(str, INPUT_SHAPES[dataset]))}; choose {dataset} data"
        )
    try:
        if source == "synthetic-cifar10":
            return bc_data.synthetic_image_data(INPUT_SHAPES["cifar10"], **SYNTHETIC_SIZES)
        if dataset == "mnist":
            return bc_data.load_mnist(source, download=download)
        return bc_data.load_cifar10(None if source == "cifar10" else source, download=download)
    except FileNotFoundError as e:
        raise CommandError(f"{e} On the command line: {option} DIR, or --download") from None


def split_validation(data, validation: int | None):
    """Holds out the last ``validation`` training images (default: :data:`VALIDATION_IMAGES`,
    or a fifth of the training images when that is fewer); returns ``(data, held out)``.

    Example::

        data, held_out = split_validation(load_data("subset", "mnist"), None)  # 2,000
    """
    n = len(data.train_y)
    if validation is None:
        validation = min(VALIDATION_IMAGES, n // 5)
    if validation == 0:
        return data, 0
    if validation >= n:
        raise CommandError(
            f"--validation {validation}: the data has only {n} training images; hold out "
            "fewer (0 for none)"
        )
    return bc_data.train_validation_split(data, validation), validation


def _in_order(x, y):
    return TensorBatches(x, y, EVAL_BATCH_SIZE, shuffle=False)


@torch.no_grad()
def _error(network, loader):
    """Test error of a plain network (the pretrained twin)."""
    network.eval()
    device = next(network.parameters()).device
    wrong = sum((network(x.to(device)).argmax(-1) != y.to(device)).sum().item() for x, y in loader)
    return wrong / len(loader.dataset)


# ---------------------------------------------------------------------------------------------
# Commands


def _network_options(width, model_name):
    """The network's keyword arguments: ``width`` for vgg16 (its default when None)."""
    if model_name != "vgg16":
        if width is not None:
            raise CommandError(f"--width applies to --model vgg16 only, not {model_name}")
        return {}
    default = inspect.signature(MODELS[model_name]).parameters["width"].default
    return {"width": default if width is None else width}


def _compress(guide, out, **kwargs):
    try:
        compressed = compress(guide, **kwargs)
    except ValueError as e:
        raise CommandError(str(e)) from e
    compressed.save(out / "model.bc")
    report = compressed.report
    write_atomically(out / "report.json", report.to_json(indent=2).encode())
    print(report)
    return compressed


def _figures(guide, compressed, out, history=None):
    plots.pruning_histograms(guide, compressed=compressed, path=out / "pruning-histograms.png")
    plots.weight_matrices(guide, compressed, path=out / "weights.png")
    plots.bits_per_layer(compressed, path=out / "bits.png")
    if history is not None and len(history):
        plots.training_curves(history, path=out / "training.png")


def _check_threshold_layers(thresholds, model, model_name):
    if not isinstance(thresholds, dict):
        return
    layers = [layer.site() for layer in model.bayesian_layers()]
    unknown = sorted(set(thresholds) - set(layers))
    if unknown:
        raise CommandError(
            f"--thresholds names layers {model_name} does not have: {', '.join(unknown)}; its "
            f"Bayesian layers are {', '.join(layers)}"
        )


def _check_resumable(checkpoint, asked):
    metadata = load_checkpoint(checkpoint).get("metadata") or {}
    different = {
        k: metadata[k] for k in asked if metadata.get(k) is not None and metadata[k] != asked[k]
    }
    if different:
        were = " ".join(f"--{k} {v}" for k, v in different.items())
        raise CommandError(
            f"--resume: {checkpoint} was trained with {were}; pass that, or another --out to "
            "start a new run"
        )


def run(args):
    """``pyro-bc run``: pretrain, fit, compress, save, evaluate and draw, as the recipe says."""
    source = args.data or DEFAULT_DATA[recipe(args.model, args.prior).dataset]
    r = recipe(args.model, args.prior, data=source)
    options = _network_options(args.width, args.model)
    if args.max_error_increase is not None and args.validation == 0:
        raise CommandError("--max-error-increase needs validation images: --validation N > 0")
    out = args.out
    checkpoint = out / "checkpoint.pt"
    resuming = args.resume and checkpoint.exists()
    if resuming:
        _check_resumable(checkpoint, {"model": args.model, "prior": args.prior, **options})
    epochs = r.epochs if args.epochs is None else args.epochs
    pretrain_epochs = r.pretrain_epochs if args.pretrain_epochs is None else args.pretrain_epochs
    decay = r.decay_epochs if args.decay_epochs is None else args.decay_epochs
    batch_size = r.batch_size if args.batch_size is None else args.batch_size
    thresholds = r.thresholds if args.thresholds is None else args.thresholds

    pyro.set_rng_seed(args.seed)
    data, held_out = split_validation(
        load_data(source, r.dataset, download=args.download), args.validation
    )
    if args.max_error_increase is not None and not held_out:
        raise CommandError("--max-error-increase needs validation images: --validation N > 0")
    augment = RandomCropFlip() if r.dataset == "cifar10" else None
    train_loader, test_loader = bc_data.train_test_loaders(
        data, batch_size=batch_size, transform=augment
    )
    network, model, guide = build(
        args.model, args.prior, len(data.train_y), device=args.device, **options
    )
    _check_threshold_layers(thresholds, model, args.model)
    deterministic_error = None  # the pretrained plain network's, where there is one
    if pretrain_epochs > 0 and not resuming:
        twin = network.deterministic(**options).to(args.device)
        twin = pretrain(twin, train_loader, epochs=pretrain_epochs, progress=not args.quiet)
        deterministic_error = _error(twin, test_loader)
        guide.init_from(twin, rescale=r.rescale)
    metadata = {
        "model": args.model,
        "prior": args.prior,
        "dataset_size": len(data.train_y),
        # a directory as an absolute path, so that compress finds it from any folder
        "data": source if source in DATA_NAMES else str(Path(source).expanduser().resolve()),
        "validation": held_out,
        **options,
    }
    with warnings.catch_warnings():
        # a NaN loss stops fit with TrainingDivergedError, one line: no warning before it
        warnings.filterwarnings("ignore", message="Encountered NaN")
        history = fit(
            model,
            guide,
            train_loader,
            epochs=epochs,
            # a resumed run keeps its checkpoint's rate unless --lr asks for another
            lr=r.lr if args.lr is None and not resuming else args.lr,
            lr_schedule=linear_decay(max(epochs - decay, 0), epochs) if decay > 0 else None,
            test_loader=test_loader,
            checkpoint=checkpoint,
            resume=args.resume,
            seed=args.seed,
            metadata=metadata,
            progress=not args.quiet,
        )
    dense = evaluate(model, guide, test_loader, num_samples=args.mc_samples)
    # the recipe's error budget on the held-out images unless thresholds are given
    max_error_increase = args.max_error_increase
    if max_error_increase is None and args.thresholds is None and held_out:
        max_error_increase = r.max_error_increase  # None: the recipe's thresholds
    budget = {}
    if max_error_increase is not None:
        budget = {
            "validation": _in_order(data.validation_x, data.validation_y),
            "max_error_increase": max_error_increase,
        }
    compressed = _compress(
        guide,
        out,
        thresholds=thresholds,
        test_loader=test_loader,
        calibration=_in_order(data.train_x, data.train_y),  # unaugmented
        **budget,
    )
    if args.figures:
        _figures(guide, compressed, out, history)
    report = compressed.report
    summary = {
        **metadata,
        "device": str(args.device),
        "epochs": len(history),
        "pretrain_epochs": 0 if resuming else pretrain_epochs,
        "lr": r.lr if args.lr is None else args.lr,
        "decay_epochs": decay,
        "batch_size": batch_size,
        "max_error_increase": max_error_increase,
        "test_error_deterministic": deterministic_error,
        "test_error_posterior_mean": dense["error"],
        f"test_error_mc{args.mc_samples}": dense.get("error_mc"),
        "test_error_compressed": report.test_error,
        "validation_error_compressed": getattr(report, "validation_error", None),
        "architecture": report.architecture,
        "pruning_rate": report.pruning_rate,
        "precision_rate": report.precision_rate,
        "file_bytes": report.file_bytes,
        "file_rate": report.file_rate,
        "files": {
            "checkpoint": str(checkpoint),
            "compressed": str(out / "model.bc"),
            "report": str(out / "report.json"),
        },
    }
    write_atomically(out / "summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))


def compress_checkpoint(args):
    """``pyro-bc compress``: compress a checkpoint written by ``run`` again, other choices."""
    metadata = dict(load_checkpoint(args.checkpoint).get("metadata") or {})
    model_name = args.model or metadata.get("model")
    prior_name = args.prior or metadata.get("prior")
    if not model_name or not prior_name:
        raise CommandError(
            f"{args.checkpoint} does not say which model and prior it holds; pass --model and "
            "--prior"
        )
    width = args.width
    if width is None and model_name == metadata.get("model"):
        width = metadata.get("width")
    options = _network_options(width, model_name)
    r = recipe(model_name, prior_name)
    source = args.data or metadata.get("data")
    if args.max_error_increase is not None and source is None:
        raise CommandError(
            f"--max-error-increase needs data: {args.checkpoint} does not record its data; "
            "pass --data"
        )
    _, model, guide = build(model_name, prior_name, metadata.get("dataset_size"), **options)
    _check_threshold_layers(args.thresholds, model, model_name)
    # checked against the guide (a checkpoint of another model is named in one line) and for
    # NaN or infinite values, which compress could not use
    state = load_checkpoint(args.checkpoint, guide)
    guide.load_state_dict(state["guide"])
    if state.get("model"):
        model.load_state_dict(state["model"])

    kwargs = {"thresholds": r.thresholds if args.thresholds is None else args.thresholds}
    if source is not None:
        validation = args.validation if args.validation is not None else metadata.get("validation")
        data, held_out = split_validation(
            load_data(str(source), r.dataset, download=args.download), validation
        )
        kwargs["test_loader"] = _in_order(data.test_x, data.test_y)
        kwargs["calibration"] = _in_order(data.train_x, data.train_y)
        if args.max_error_increase is not None:
            if not held_out:
                raise CommandError(
                    "--max-error-increase needs validation images: --validation N > 0"
                )
            kwargs["validation"] = _in_order(data.validation_x, data.validation_y)
            kwargs["max_error_increase"] = args.max_error_increase
    out = args.out or args.checkpoint.parent
    compressed = _compress(guide, out, **kwargs)
    if args.figures:
        _figures(guide, compressed, out)


def _dataset_of(network, path):
    shape = tuple(network.input_shape)
    for dataset, input_shape in INPUT_SHAPES.items():
        if shape == input_shape:
            return dataset
    raise CommandError(
        f"{path} takes inputs of shape {shape}; pyro-bc evaluates MNIST (1, 28, 28) and "
        "CIFAR-10 (3, 32, 32) networks"
    )


def evaluate_file(args):
    """``pyro-bc evaluate``: the test error of a ``.bc`` file."""
    network = CompressedNetwork.load(args.file)
    dataset = _dataset_of(network, args.file)
    source = args.data or DEFAULT_DATA[dataset]
    data = load_data(source, dataset, download=args.download)
    result = network.evaluate(_in_order(data.test_x, data.test_y))
    print(json.dumps({"file": str(args.file), "data": str(source), **result}, indent=2))


def info(args):
    """``pyro-bc info``: what a ``.bc`` file holds."""
    network = CompressedNetwork.load(args.file)
    weights = sum(m.weight.numel() for m in network.modules() if hasattr(m, "weight"))
    print(f"{args.file}: {args.file.stat().st_size} bytes, {weights} weights")
    print(f"input shape: {network.input_shape}")
    print(f"fraction bits per layer: {network.formats}")
    print(network)


def export(args):
    """``pyro-bc export``: a ``.bc`` file as ONNX and/or TorchScript."""
    if args.onnx is None and args.torchscript is None:
        raise CommandError("export: say what to write: --onnx PATH and/or --torchscript PATH")
    try:
        written = export_file(args.file, onnx=args.onnx, torchscript=args.torchscript)
    except ImportError as e:
        raise CommandError(str(e)) from e
    for path, size in written.items():
        print(f"{path}: {size} bytes")


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
  pyro-bc run --model lenet300 --prior gnj       # shipped MNIST subset, a few minutes
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
    "LAYER=VALUE pairs such as fc1=-2.8,fc2=auto (default: the recipe's)"
)
VALIDATION_HELP = (
    "hold out the last N training images (never trained on) as validation data, on which "
    f"--max-error-increase searches; 0 holds none out (default: {VALIDATION_IMAGES:,}, or a "
    "fifth of the training images if fewer: 2,000 of the shipped subset)"
)
BUDGET_HELP = (
    "search the thresholds and bit widths for the smallest network whose validation error is "
    "at most this much (a fraction: 0.001 = 0.1 points) above the dense network's (default: "
    "no search; the thresholds of --thresholds or the recipe)"
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
    how = r.add_mutually_exclusive_group()
    how.add_argument("--thresholds", metavar="T", type=parse_thresholds, help=THRESHOLDS_HELP)
    how.add_argument("--max-error-increase", metavar="F", type=error_fraction, help=BUDGET_HELP)
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
    how = c.add_mutually_exclusive_group()
    how.add_argument("--thresholds", metavar="T", type=parse_thresholds, help=THRESHOLDS_HELP)
    how.add_argument("--max-error-increase", metavar="F", type=error_fraction, help=BUDGET_HELP)
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
USER_ERRORS = (
    CommandError,
    CheckpointError,
    CompressedFileError,
    DataFileError,
    TrainingDivergedError,
    OSError,
)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    Example::

        one_line(ValueError("a\\nb"))  # 'a b'
    """
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    """Entry point of the ``pyro-bc`` command; returns the exit status.

    Example::

        main(["info", "runs/latest/model.bc"])  # 0
    """
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (already printed)
        return e.code if isinstance(e.code, int) else 0
    try:
        args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"pyro-bc: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pyro-bc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
