"""
Data sets for the experiments: MNIST (full or the shipped subset) and CIFAR-10, as tensors.

* :func:`load_mnist` (``"subset"``, ``"mnist"`` for the user cache, or a directory) and
  :func:`load_cifar10` (the official binary release) return an :class:`ImageData`;
* :func:`train_validation_split` holds out the last training images for validation;
* :func:`train_test_loaders` and :func:`train_validation_test_loaders` wrap them in
  :class:`TensorBatches`, fast in-memory mini-batches, optionally augmented per batch by
  :class:`RandomCropFlip`;
* :func:`synthetic_image_data` makes random images of a data set's shape for smoke tests.

Files are read defensively (:mod:`pyro_bc.datasets.storage`): capped streaming decompression,
checksums remembered beside the data, verified downloads and safe extraction; every error is a
:class:`DataFileError` that names the file and says what to do.

Example::

    >>> from pyro_bc.datasets import load_mnist, train_test_loaders
    >>> train_loader, test_loader = train_test_loaders(load_mnist("subset"), batch_size=128)
"""

from .cifar10 import (
    CIFAR10_CLASSES,
    default_cifar10_dir,
    download_cifar10,
    load_cifar10,
    read_cifar10_batch,
)
from .idx import read_idx, write_idx
from .loaders import Loaders, TensorBatches, train_test_loaders, train_validation_test_loaders
from .mnist import DATA_ENV_VAR, default_mnist_dir, download_mnist, load_mnist, load_mnist_subset
from .splits import ImageData, train_validation_split
from .storage import DataDownloadError, DataFileError
from .synthetic import synthetic_image_data
from .transforms import RandomCropFlip

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_ENV_VAR",
    "DataDownloadError",
    "DataFileError",
    "ImageData",
    "Loaders",
    "RandomCropFlip",
    "TensorBatches",
    "default_cifar10_dir",
    "default_mnist_dir",
    "download_cifar10",
    "download_mnist",
    "load_cifar10",
    "load_mnist",
    "load_mnist_subset",
    "read_cifar10_batch",
    "read_idx",
    "synthetic_image_data",
    "train_test_loaders",
    "train_validation_split",
    "train_validation_test_loaders",
    "write_idx",
]
