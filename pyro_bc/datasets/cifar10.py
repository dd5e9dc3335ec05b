"""
CIFAR-10 from the official binary release, never the pickled Python one.

The binary release (``cifar-10-binary.tar.gz``) holds ``cifar-10-batches-bin/data_batch_1.bin``
to ``data_batch_5.bin`` (50,000 training images) and ``test_batch.bin`` (10,000 test images),
each a sequence of 3,073-byte records: one label byte (0..9), then 3,072 pixel bytes,
channel-major (the 1,024 red values, then green, then blue, each 32x32 row by row).

Example::

    >>> from pyro_bc.datasets import load_cifar10, RandomCropFlip, train_test_loaders
    >>> cifar = load_cifar10("~/data/cifar10", download=True)
    >>> cifar.train_x.shape
    torch.Size([50000, 3, 32, 32])
    >>> train_loader, test_loader = train_test_loaders(cifar, transform=RandomCropFlip())
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .splits import ImageData
from .storage import DataFileError, cache_dir, extract_tar, fetch

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "default_cifar10_dir",
    "download_cifar10",
    "load_cifar10",
    "read_cifar10_batch",
]

#: The official binary release, from the data set's page https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
#: MD5 of that archive as published on https://www.cs.toronto.edu/~kriz/cifar.html
#: ("CIFAR-10 binary version (suitable for C programs)", 162 MB).
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
#: The archive's size in bytes, a cap on the download.
CIFAR10_ARCHIVE_BYTES = 170_052_171
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32
#: Records in each official batch file, the most a batch file may hold.
RECORDS_PER_FILE = 10_000
NORMALIZATIONS = ("channel", "symmetric", "unit", None)


def default_cifar10_dir() -> Path:
    """
    Where :func:`load_cifar10` looks without a ``root``: ``$XDG_CACHE_HOME/pyro_bc/cifar10``.

    Example::

        >>> default_cifar10_dir()
        PosixPath('/home/me/.cache/pyro_bc/cifar10')
    """
    return cache_dir("cifar10")


def _batch_dir(root: Path) -> Path:
    # root may be the folder the archive was extracted into, or the batches folder itself
    nested = root / CIFAR10_FOLDER
    return nested if nested.is_dir() else root


def _missing_files(root: Path) -> list[str]:
    folder = _batch_dir(root)
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    return [name for name in names if not (folder / name).is_file()]


def download_cifar10(root: str | os.PathLike | None = None, *, url: str | None = None) -> Path:
    """
    Download the official binary archive, check its MD5 and extract the six batch files.

    The archive (162 MB) is streamed to a temporary file, checked against the published MD5
    :data:`CIFAR10_MD5`, and only the six expected regular files are extracted, each written
    atomically, so nothing outside ``root/cifar-10-batches-bin`` is ever written. The archive
    is deleted afterwards.

    Example::

        >>> download_cifar10("~/data/cifar10")
        PosixPath('/home/me/data/cifar10/cifar-10-batches-bin')

    :param root: target directory, created if needed; default :func:`default_cifar10_dir`.
    :param url: where to fetch the archive from; default :data:`CIFAR10_URL`, the official one.
    :returns: the folder holding the batch files.
    :raises DataDownloadError: if the download fails or the archive's MD5 is wrong.
    """
    root = Path(root).expanduser() if root is not None else default_cifar10_dir()
    if not _missing_files(root):
        return _batch_dir(root)
    archive = root / "cifar-10-binary.tar.gz"
    fetch(url or CIFAR10_URL, archive, max_bytes=CIFAR10_ARCHIVE_BYTES, md5=CIFAR10_MD5)
    try:
        members = {f"{CIFAR10_FOLDER}/{name}" for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)}
        extract_tar(archive, root, members)
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
    return root / CIFAR10_FOLDER


def read_cifar10_batch(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Read one binary batch file into uint8 images ``(N, 3, 32, 32)`` and labels ``(N,)``.

    Example::

        >>> images, labels = read_cifar10_batch("cifar-10-batches-bin/test_batch.bin")
        >>> images.shape, labels[:3]
        (torch.Size([10000, 3, 32, 32]), tensor([3, 8, 8], dtype=torch.uint8))

    :raises DataFileError: if the file is empty, too large, ends in a partial record or holds
        a label outside 0..9.
    """
    path = Path(path)
    size = path.stat().st_size
    advice = "Delete the batch files and extract or download the archive again (download=True)."
    if size == 0:
        raise DataFileError(f"{path}: empty file, it holds no images. {advice}")
    if size % RECORD_BYTES:
        raise DataFileError(
            f"{path}: {size:,} bytes is not a whole number of {RECORD_BYTES:,}-byte records "
            f"(1 label byte + 3x32x32 pixel bytes): the last record is truncated, or this is not "
            f"a CIFAR-10 binary batch (the pickled Python release is not supported). {advice}"
        )
    if size > RECORDS_PER_FILE * RECORD_BYTES:
        raise DataFileError(
            f"{path}: {size // RECORD_BYTES:,} records, more than the {RECORDS_PER_FILE:,} of "
            f"an official batch file. {advice}"
        )
    with open(path, "rb") as f:
        # a bytearray is writable, so the tensor owns it without a copy or a warning
        raw = bytearray(f.read(size + 1))
    if len(raw) != size:
        raise DataFileError(f"{path}: changed size while being read. {advice}")
    records = torch.frombuffer(raw, dtype=torch.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].clone()
    if int(labels.max()) > 9:
        bad = int((labels > 9).nonzero()[0, 0])
        raise DataFileError(
            f"{path}: label {int(labels[bad])} in record {bad}, CIFAR-10 has only 0..9. "
            f"This is not a CIFAR-10 batch (or it is corrupt, or CIFAR-100). {advice}"
        )
    return records[:, 1:].reshape(-1, *IMAGE_SHAPE), labels


def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    normalize: str | None = "channel",
) -> ImageData:
    """
    Load CIFAR-10 (50,000 training and 10,000 test images) from the official binary files.

    ``root`` is the folder the archive was extracted into (holding ``cifar-10-batches-bin``)
    or that folder itself; by default :func:`default_cifar10_dir`. Images come back as
    float32 ``(N, 3, 32, 32)``, labels as int64 ``(N,)`` indexing :data:`CIFAR10_CLASSES`.

    Example::

        >>> cifar = load_cifar10("~/data/cifar10", download=True)
        >>> cifar.train_x.mean(dim=(0, 2, 3))  # "channel": standardised by training statistics
        tensor([0., 0., 0.])

    :param download: fetch and extract the official archive into ``root`` if files are missing.
    :param normalize: ``"channel"`` subtracts each channel's mean over the training images and
        divides by its standard deviation (the same numbers for the test images);
        ``"symmetric"`` scales to ``[-1, 1]``, ``"unit"`` to ``[0, 1]``, ``None`` (or
        ``"none"``) keeps raw ``0..255`` values as float.
    :raises FileNotFoundError: if files are missing and ``download`` is False.
    :raises DataFileError: if a batch file is malformed.
    """
    normalize = None if normalize == "none" else normalize
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"load_cifar10: normalize={normalize!r} is not supported; use 'channel', "
            "'symmetric', 'unit' or None."
        )
    root = Path(root).expanduser() if root is not None else default_cifar10_dir()
    if download:
        download_cifar10(root)
    missing = _missing_files(root)
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 binary files not found in {root} or {root / CIFAR10_FOLDER}: "
            f"{', '.join(missing)}. Pass root= the folder where cifar-10-binary.tar.gz was "
            "extracted, or use download=True to fetch it there."
        )
    folder = _batch_dir(root)
    train = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    train_x = torch.cat([images for images, _ in train])
    test_x, test_y = read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    mean, std = _channel_stats(train_x)
    return ImageData(
        train_x=_to_float(train_x, normalize, mean, std),
        train_y=torch.cat([labels for _, labels in train]).long(),
        test_x=_to_float(test_x, normalize, mean, std),
        test_y=test_y.long(),
    )


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Exact, from per-channel histograms of the bytes: no float32 rounding over 51M pixels.
    counts = torch.stack(
        [images[:, c].flatten().bincount(minlength=256) for c in range(images.shape[1])]
    ).double()
    values = torch.arange(256, dtype=torch.float64)
    n = counts.sum(1)
    mean = counts @ values / n
    var = counts @ values.square() / n - mean.square()
    return mean, var.clamp_min(1e-12).sqrt()


def _to_float(images, normalize, mean, std) -> torch.Tensor:
    x = images.to(torch.float32)
    if normalize == "channel":
        return x.sub_(mean.float().view(-1, 1, 1)).div_(std.float().view(-1, 1, 1))
    if normalize == "symmetric":
        return x.div_(127.5).sub_(1.0)
    if normalize == "unit":
        return x.div_(255.0)
    return x
