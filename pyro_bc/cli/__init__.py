"""The ``pyro-bc`` command: train, compress, inspect and export Bayesian-compressed networks.

Every option is checked before any work starts; every failure a user can cause (a bad option, a
missing or corrupt file, a checkpoint of another model, bad data, training that diverges) is one
line on stderr, ``pyro-bc: error: ...``, and exit status 2. ``--debug`` shows the traceback.

Example::

    pyro-bc run --model lenet300 --prior gnj          # shipped MNIST subset, under a minute
    pyro-bc run --model lenet5 --prior ghs --data ~/mnist --epochs 200 --out runs/lenet5
    pyro-bc run --model vgg16 --data cifar10 --download --device cuda --max-error-increase 0.005
    pyro-bc compress runs/latest/checkpoint.pt --thresholds fc1=-2.8,fc2=-3,fc3=-5
    pyro-bc evaluate runs/latest/model.bc
    pyro-bc info runs/latest/model.bc
    pyro-bc export runs/latest/model.bc --onnx model.onnx --torchscript model.pt
"""

from __future__ import annotations

import os
import sys

from ..checkpoint import CheckpointError
from ..codec import CompressedFileError
from ..datasets import DataFileError
from ..infer import TrainingDivergedError
from .commands import load_data, split_validation
from .options import CommandError, parse_thresholds
from .parser import parser

__all__ = [
    "USER_ERRORS",
    "CommandError",
    "load_data",
    "main",
    "one_line",
    "parse_thresholds",
    "parser",
    "split_validation",
]

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
