"""The option types of ``pyro-bc``: argparse calls them while parsing, so a bad value stops
the command before any work, with one line naming the option."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

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
