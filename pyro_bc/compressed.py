"""The compressed network: an ordinary ``nn.Sequential`` with its number formats, report and file.

Example::

    compressed = pyro_bc.compress(guide)
    compressed.save("lenet300.bc")
    same = pyro_bc.load("lenet300.bc")
    assert torch.equal(same(x), compressed(x))
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .batches import batches, check_inputs, check_labels_inside, count_outside
from .codec import MAX_PARAMETERS, decode, encode
from .files import write_atomically


class CompressedNetwork(nn.Sequential):
    """A compressed network: an ordinary ``nn.Sequential`` with its number formats and report.

    It is a point estimate: the posterior means of the kept weights, rounded to each layer's
    fixed-point grid (for predictive uncertainty, use the guide; see :mod:`pyro_bc.predictive`).

    :ivar input_shape: the shape of one example, e.g. ``(1, 28, 28)``.
    :ivar formats: ``{layer name: t}``, the fraction bits of each fixed-point layer (weights
        ``q 2^-t``), or None for a layer kept in float32 (``compress(..., bits=None)``).
    :ivar report: the :class:`~pyro_bc.compression.CompressionReport` of
        :func:`pyro_bc.compress`; None after :func:`load` (the file holds the network, not how
        it was made).

    Example::

        compressed = pyro_bc.compress(guide)
        logits = compressed(x)
        compressed.save("lenet300.bc")
        assert torch.equal(pyro_bc.load("lenet300.bc")(x), logits)
    """

    def __init__(self, layers: OrderedDict, *, input_shape=None, formats=None, report=None):
        super().__init__(layers)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.formats = dict(formats or {})
        self.report = report

    def encode(self) -> tuple[bytes, dict]:
        """The file's bytes and their split ``{"header", "weights", "biases", "masks"}``.

        Example::

            data, layout = compressed.encode()
        """
        if self.input_shape is None:
            raise ValueError("save: the CompressedNetwork has no input_shape; set it first")
        return encode(self.named_children(), self.input_shape, self.formats)

    def to_bytes(self) -> bytes:
        """The file :meth:`save` writes, as bytes.

        Example::

            size = len(compressed.to_bytes())
        """
        return self.encode()[0]

    def save(self, path) -> int:
        """Writes the network to ``path`` atomically (see :mod:`pyro_bc.codec`); returns bytes.

        Example::

            compressed.save("lenet300.bc")
        """
        data = self.to_bytes()
        write_atomically(path, data)
        return len(data)

    @classmethod
    def from_bytes(
        cls, data: bytes, source: str = "<bytes>", max_parameters: int = MAX_PARAMETERS
    ) -> CompressedNetwork:
        """Reads a network from a file's bytes (see :func:`load`).

        Example::

            same = CompressedNetwork.from_bytes(compressed.to_bytes())
        """
        modules, input_shape, formats = decode(data, source, max_parameters)
        return cls(modules, input_shape=input_shape, formats=formats).eval()

    @classmethod
    def load(cls, path, max_parameters: int = MAX_PARAMETERS) -> CompressedNetwork:
        """Reads a network written by :meth:`save`; its outputs are bit-identical.

        :param max_parameters: the most values the file may ask to allocate
            (:data:`pyro_bc.codec.MAX_PARAMETERS`); raise it for a larger network you trust.
        :raises CompressedFileError: (a ``ValueError``) if the file is truncated, corrupted or
            not a pyro_bc compressed network; the message names the file and the problem.

        Example::

            compressed = CompressedNetwork.load("lenet300.bc")
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"compressed network {path} is a directory; pass the .bc file (pyro-bc run writes "
                "model.bc in its output directory)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"compressed network {path} does not exist")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OSError(f"compressed network {path} cannot be read: {e.strerror}") from None
        return cls.from_bytes(data, str(path), max_parameters)

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Test error of the network on ``(x, y)`` batches: ``{"error": ..., "n": ...}``.

        Example::

            compressed.evaluate(test_loader)  # {'error': 0.018, 'n': 10000}
        """
        self.eval()
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        errors = torch.zeros(2, dtype=torch.long, device=device)  # and labels outside
        seen = 0
        for x, y in batches(loader, "CompressedNetwork.evaluate"):
            check_inputs(x, self.input_shape, "CompressedNetwork.evaluate")
            x, y = x.to(device), y.to(device)
            logits = self(x)
            errors[0] += (logits.argmax(-1) != y).sum()
            errors[1] += count_outside(y, logits.shape[-1])
            seen += len(y)
        wrong, outside = errors.tolist()
        check_labels_inside(outside, logits.shape[-1], "CompressedNetwork.evaluate")
        if seen == 0:
            raise ValueError("evaluate: the loader yielded no examples")
        return {"error": wrong / seen, "n": seen}


def load(path, max_parameters: int = MAX_PARAMETERS) -> CompressedNetwork:
    """Reads a compressed network file (:meth:`CompressedNetwork.load`).

    Example::

        compressed = pyro_bc.load("lenet300.bc")
    """
    return CompressedNetwork.load(path, max_parameters)


def save(network: CompressedNetwork, path) -> int:
    """Writes a compressed network file (:meth:`CompressedNetwork.save`); returns its size.

    Example::

        pyro_bc.save(compressed, "lenet300.bc")
    """
    if not isinstance(network, CompressedNetwork):
        raise ValueError(
            f"save: expected a CompressedNetwork from pyro_bc.compress, got "
            f"{type(network).__name__}"
        )
    return network.save(path)
