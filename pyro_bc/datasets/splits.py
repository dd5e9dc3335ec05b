"""
Image data sets as tensors, and the validation split carved from the training images.

Example::

    >>> data = train_validation_split(load_mnist("mnist"), validation=10_000)
    >>> len(data.train_y), len(data.validation_y), len(data.test_y)
    (50000, 10000, 10000)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..checks import is_integer

__all__ = ["ImageData", "train_validation_split"]


class ImageData(NamedTuple):
    """
    Train, test and (optionally) validation tensors of an image data set.

    Images are float32 of shape ``(N, C, H, W)``; labels are int64 of shape ``(N,)``. The
    validation fields are ``None`` until :func:`train_validation_split` fills them.

    Example::

        >>> mnist = load_mnist("subset")
        >>> mnist.train_x.shape, mnist.train_y.dtype, mnist.validation_x
        (torch.Size([10000, 1, 28, 28]), torch.int64, None)
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    validation_x: torch.Tensor | None = None
    validation_y: torch.Tensor | None = None


def train_validation_split(data: ImageData, validation: int = 10_000) -> ImageData:
    """
    Hold out the last ``validation`` training images as a validation set.

    The test set is never touched, so choices made on the validation error (thresholds, an
    error budget, early stopping) leave the test error an honest estimate. The split is a
    fixed slice, not a random draw, so it is the same in every run and every process; MNIST's
    and CIFAR-10's training images come in no particular class order, so the last 10,000 are
    as good a sample as any. The tensors are views of ``data``'s, not copies.

    Example::

        >>> data = train_validation_split(load_mnist("mnist"))
        >>> len(data.train_y), len(data.validation_y)
        (50000, 10000)

    :param data: a data set without a validation split yet.
    :param validation: how many of the last training images to hold out.
    :raises ValueError: if ``data`` already has a validation split or ``validation`` does not
        leave both sets non-empty.
    """
    if data.validation_x is not None:
        raise ValueError(
            "train_validation_split: data already has a validation split; split the "
            "original data once."
        )
    n = len(data.train_y)
    if not (is_integer(validation) and 0 < validation < n):
        raise ValueError(
            f"train_validation_split: validation={validation!r} must be an integer between 1 "
            f"and {n - 1}: the data has {n} training images and both sets need some."
        )
    keep = n - validation
    return data._replace(
        train_x=data.train_x[:keep],
        train_y=data.train_y[:keep],
        validation_x=data.train_x[keep:],
        validation_y=data.train_y[keep:],
    )
