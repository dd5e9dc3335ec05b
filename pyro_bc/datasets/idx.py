"""
IDX files, the format of MNIST: a magic number, the dimensions, then unsigned bytes.

Only the two MNIST layouts are read: images (magic ``0x00000803``, three dimensions) and labels
(magic ``0x00000801``, one dimension), gzipped or not (detected from the content, not the name).

Example::

    >>> write_idx("labels-idx1-ubyte.gz", torch.tensor([3, 1, 4], dtype=torch.uint8))
    >>> read_idx("labels-idx1-ubyte.gz")
    tensor([3, 1, 4], dtype=torch.uint8)
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch

from ..files import write_atomically
from .storage import DataFileError, read_capped

__all__ = ["DEFAULT_MAX_IDX_BYTES", "parse_idx", "read_idx", "write_idx"]

#: Largest IDX file :func:`read_idx` accepts by default (full MNIST's largest is 47,040,016).
DEFAULT_MAX_IDX_BYTES = 1 << 28

_IDX_UBYTE = 0x08
_IDX_MAGIC = {0x00000801: "labels", 0x00000803: "images"}


def read_idx(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_IDX_BYTES) -> torch.Tensor:
    """
    Read an unsigned-byte IDX file, gzipped or not, into a uint8 tensor.

    Decompression streams and stops past ``max_bytes``, so a small file that inflates to
    gigabytes fails fast with bounded memory.

    Example::

        >>> labels = read_idx("mnist/t10k-labels-idx1-ubyte.gz")
        >>> labels.shape, labels.dtype
        (torch.Size([10000]), torch.uint8)

    :param path: path to the ``.gz`` or uncompressed IDX file.
    :param max_bytes: the largest uncompressed size accepted, header included.
    :returns: a uint8 tensor with the shape declared in the file header.
    :raises DataFileError: if the file is not a valid IDX file or exceeds ``max_bytes``.
    """
    path = Path(path)
    return parse_idx(read_capped(path, max_bytes), path)


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, *, compress: bool = True) -> None:
    """
    Atomically write a uint8 tensor of 1 or 3 dimensions as an IDX file.

    With ``compress=True`` the file is gzipped at level 9 with a zero timestamp, so the output
    bytes depend only on the tensor.

    Example::

        >>> write_idx("labels-idx1-ubyte.gz", torch.tensor([3, 1, 4], dtype=torch.uint8))

    :param path: destination; its directory must exist.
    :param tensor: uint8 tensor of shape ``(N,)`` or ``(N, rows, cols)``.
    :param compress: whether to gzip the output.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() not in (1, 3):
        raise ValueError(
            f"write_idx({str(path)!r}): expected a uint8 tensor with 1 or 3 dimensions, "
            f"got dtype {tensor.dtype} with shape {tuple(tensor.shape)}"
        )
    header = bytes([0, 0, _IDX_UBYTE, tensor.dim()])
    header += b"".join(size.to_bytes(4, "big") for size in tensor.shape)
    raw = header + tensor.contiguous().numpy().tobytes()
    if compress:
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    write_atomically(Path(path), raw)


def parse_idx(raw: bytes, source: str | os.PathLike) -> torch.Tensor:
    """
    Parse the uncompressed bytes of an IDX file; ``source`` names it in errors.

    Example::

        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]), "labels")
        tensor([7, 9], dtype=torch.uint8)

    :raises DataFileError: on a bad magic number, a short header, or a size that does not
        match the header.
    """
    if len(raw) < 4:
        raise DataFileError(
            f"{source}: only {len(raw)} bytes, too short for an IDX header. "
            "The file is truncated or not an IDX file; replace it."
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataFileError(
            f"{source}: bad IDX magic number 0x{magic:08x}, expected 0x00000803 (images) or "
            "0x00000801 (labels). This is not an MNIST IDX file; check the path."
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFileError(
            f"{source}: header declares {ndim} dimensions ({header_len} header bytes) but the "
            f"file has only {len(raw)} bytes. The file is truncated; replace it."
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, found = math.prod(shape), len(raw) - header_len
    if found != expected:
        problem = "truncated" if found < expected else "has trailing bytes"
        raise DataFileError(
            f"{source}: {problem}: header shape {tuple(shape)} needs {expected} data bytes, "
            f"found {found}. Delete the file and download or copy it again."
        )
    if found == 0:  # torch.frombuffer rejects empty views
        return torch.empty(shape, dtype=torch.uint8)
    # A bytearray gives torch.frombuffer a writable buffer that the tensor then owns.
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_len, count=found)
    return data.reshape(shape)
