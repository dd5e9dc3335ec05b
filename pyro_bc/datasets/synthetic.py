"""
Small random image data sets of a real data set's shape, for smoke tests that run in seconds.

Every class has a fixed random pattern; an image is its class's pattern plus unit Gaussian
noise, so a network can learn the labels (a smoke test sees the error fall) while nothing is
read from disk. The same ``seed`` gives the same tensors on every machine.

Example::

    >>> data = synthetic_image_data((3, 32, 32), train=512, test=128)
    >>> data.train_x.shape, data.test_y.shape
    (torch.Size([512, 3, 32, 32]), torch.Size([128]))
"""

from __future__ import annotations

import torch

from ..checks import is_integer
from .splits import ImageData

__all__ = ["synthetic_image_data"]


def synthetic_image_data(
    shape=(3, 32, 32),
    *,
    train: int = 1024,
    test: int = 256,
    classes: int = 10,
    signal: float = 0.5,
    seed: int = 0,
) -> ImageData:
    """
    Random images of ``shape`` (float32, about unit variance) with labels in ``0..classes-1``.

    An image of class ``c`` is ``signal * pattern[c] + noise``, with standard normal patterns
    and noise drawn from a generator seeded by ``seed`` (the global random stream is untouched).

    Example::

        >>> cifar_like = synthetic_image_data((3, 32, 32), train=1024, test=256)
        >>> int(cifar_like.train_y.max()) <= 9
        True

    :raises ValueError: if a count is not a positive integer or ``signal`` is negative.
    """
    for name, value in (("train", train), ("test", test), ("classes", classes)):
        if not (is_integer(value) and value >= 1):
            raise ValueError(f"synthetic_image_data: {name}={value!r} must be an integer >= 1")
    if not signal >= 0:
        raise ValueError(f"synthetic_image_data: signal={signal!r} must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *shape, generator=generator)

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=generator)
        noise = torch.randn(n, *shape, generator=generator)
        return signal * patterns[labels] + noise, labels

    train_x, train_y = draw(train)
    test_x, test_y = draw(test)
    return ImageData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
