"""Export of a compressed network to ONNX and TorchScript, for runtimes without Python or Pyro.

A :class:`~pyro_bc.compressed.CompressedNetwork` is an ordinary ``nn.Sequential`` (Linear, Conv2d,
activations, pooling, Flatten and :class:`~pyro_bc.gather.Gather`, which is an ``index_select``),
so both exporters take it as it is. The exported graph computes with the network's float32
weights, which are exactly the fixed-point values ``q 2^-t`` of the ``.bc`` file: the export is
as large as a float32 network of the thinned shape (ONNX and TorchScript have no packed
fixed-point weights), but computes the same numbers (``docs/method.md#fixed-point-storage``).
The batch dimension is dynamic; the other dimensions are the network's ``input_shape``.

Files are written atomically (:func:`pyro_bc.files.write_atomically`).

Example::

    from pyro_bc import export

    compressed = pyro_bc.load("lenet300.bc")
    export.to_onnx(compressed, "lenet300.onnx")
    export.to_torchscript(compressed, "lenet300.pt")
    # or, as the command line does:
    export.export_file("lenet300.bc", onnx="lenet300.onnx")
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .compressed import load
from .files import write_atomically

__all__ = ["export_file", "to_onnx", "to_torchscript"]

#: the names of the exported graph's input and output
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _plain_network(network):
    """The network's layers as a plain ``nn.Sequential`` in eval mode: the report, formats and
    other attributes of a ``CompressedNetwork`` are not part of the graph."""
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"export: expected a network (e.g. a pyro_bc CompressedNetwork), got "
            f"{type(network).__name__}"
        )
    if isinstance(network, nn.Sequential):
        network = nn.Sequential(OrderedDict(network.named_children()))
    return network.eval()


def _input_shape(network, input_shape):
    if input_shape is None:
        input_shape = getattr(network, "input_shape", None)
    if input_shape is None:
        raise ValueError(
            f"to_onnx: {type(network).__name__} has no input_shape; pass input_shape=(...), the "
            "shape of one example, e.g. (1, 28, 28)"
        )
    return tuple(int(s) for s in input_shape)


def _example(network, input_shape):
    # two examples: torch.export specializes a batch dimension of size 1 to a constant
    parameter = next(network.parameters(), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    device = None if parameter is None else parameter.device
    return torch.zeros(2, *input_shape, dtype=dtype, device=device)


@contextlib.contextmanager
def _quiet_exporter():
    # torch.onnx logs a warning per torchvision operator it cannot register, and torch.export
    # warns about its own use of a deprecated pytree class, on every export: noise to a user
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
            )
            yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def to_onnx(network, path, *, input_shape=None, opset_version: int | None = None) -> int:
    """Writes ``network`` to ``path`` as an ONNX model with a dynamic batch dimension.

    The graph has one input, ``"input"``, of shape ``(batch, *input_shape)`` and one output,
    ``"logits"``, of shape ``(batch, classes)``. It comes from PyTorch's ``torch.export``-based
    exporter (``torch.onnx.export(..., dynamo=True)``), which needs the packages ``onnx`` and
    ``onnxscript`` (``pip install "pyro-bc[onnx]"``); any ONNX runtime runs the result, e.g.
    ``onnxruntime.InferenceSession(path).run(None, {"input": x})``.

    :param network: a :class:`~pyro_bc.compressed.CompressedNetwork` or another module the
        exporter can trace.
    :param input_shape: the shape of one example; default ``network.input_shape``.
    :param opset_version: the ONNX opset; default the exporter's.
    :returns: the number of bytes written.
    :raises ImportError: if ``onnx`` or ``onnxscript`` is missing, saying what to install.

    Example::

        to_onnx(pyro_bc.load("lenet5.bc"), "lenet5.onnx")
    """
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as e:
            raise ImportError(
                f"to_onnx needs the package {package!r} for PyTorch's ONNX exporter: "
                'pip install "pyro-bc[onnx]" (or pip install onnx onnxscript)'
            ) from e
    plain = _plain_network(network)
    example = _example(plain, _input_shape(network, input_shape))
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(
            plain,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset_version,
            external_data=False,
            verbose=False,
        )
    data = program.model_proto.SerializeToString()
    write_atomically(path, data)
    return len(data)


@torch.no_grad()
def to_torchscript(network, path) -> int:
    """Writes ``network`` to ``path`` as a TorchScript archive (``torch.jit.load`` reads it).

    The network is compiled with ``torch.jit.script``, so any batch size runs. For LibTorch (C++)
    and other runtimes that load TorchScript; PyTorch itself has deprecated TorchScript in
    favour of ``torch.export``, and warns so. A TorchScript archive holds code: load only files
    you trust (a ``.bc`` file, by contrast, is data only).

    :returns: the number of bytes written.

    Example::

        to_torchscript(pyro_bc.load("lenet5.bc"), "lenet5.pt")
        torch.jit.load("lenet5.pt")(x)
    """
    scripted = torch.jit.script(_plain_network(network))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    data = buffer.getvalue()
    write_atomically(path, data)
    return len(data)


def export_file(source, *, onnx=None, torchscript=None) -> dict:
    """Exports a compressed network, or the ``.bc`` file at ``source``, to ONNX and/or TorchScript.

    The entry point of ``pyro-bc export model.bc --onnx model.onnx [--torchscript model.pt]``.

    :param source: a path to a ``.bc`` file (read with :func:`pyro_bc.load`) or a network.
    :param onnx: where to write the ONNX model (:func:`to_onnx`), or None.
    :param torchscript: where to write the TorchScript archive (:func:`to_torchscript`), or None.
    :returns: ``{path written: bytes}``.
    :raises ValueError: if neither ``onnx`` nor ``torchscript`` is given, or ``source`` is not a
        valid ``.bc`` file (:class:`~pyro_bc.codec.CompressedFileError`, naming the file).

    Example::

        export_file("lenet300.bc", onnx="lenet300.onnx", torchscript="lenet300.pt")
    """
    if onnx is None and torchscript is None:
        raise ValueError("export: say where to write: onnx=PATH and/or torchscript=PATH")
    network = source if isinstance(source, nn.Module) else load(Path(source))
    written = {}
    if onnx is not None:
        written[Path(onnx)] = to_onnx(network, onnx)
    if torchscript is not None:
        written[Path(torchscript)] = to_torchscript(network, torchscript)
    return written
