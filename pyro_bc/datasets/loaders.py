"""
In-memory mini-batches by index tensors, and the train/validation/test loaders built on them.

``DataLoader(TensorDataset(x, y))`` fetches and collates one example at a time; for data that
already sits in memory as two tensors, :class:`TensorBatches` gathers each batch with one
indexing operation instead, in the same order and with the same use of the random stream.

Example::

    >>> mnist = load_mnist("subset")
    >>> train_loader, test_loader = train_test_loaders(mnist, batch_size=128)
    >>> train, validation, test = train_validation_test_loaders(load_mnist("mnist"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import TensorDataset

from ..checks import is_integer
from .splits import ImageData, train_validation_split

__all__ = [
    "Loaders",
    "TensorBatches",
    "train_test_loaders",
    "train_validation_test_loaders",
]


class TensorBatches:
    """
    Mini-batches ``(x[idx], y[idx])`` of two in-memory tensors, a fast ``DataLoader``.

    Iterating gives ``ceil(N / batch_size)`` batches (the last may be smaller), reshuffled on
    every pass when ``shuffle`` is set. The order is the one
    ``DataLoader(TensorDataset(x, y), batch_size, shuffle=shuffle, generator=generator)`` gives
    and the random draws are the same, so for the same torch seed (or the same seeded
    ``generator``) both give the same batches and leave the random stream in the same state
    after a full pass: switching loaders does not change a training run. Unshuffled batches are
    views of ``x`` and ``y``; shuffled ones are gathered copies. ``transform`` (e.g.
    :class:`RandomCropFlip`) maps each batch of ``x`` and must not modify it in place.

    Example::

        >>> batches = TensorBatches(x, y, batch_size=128, shuffle=True,
        ...                         generator=torch.Generator().manual_seed(0))
        >>> len(batches), next(iter(batches))[0].shape
        (469, torch.Size([128, 1, 28, 28]))

    :param x: inputs, first dimension indexing examples.
    :param y: targets, the same number of examples.
    :param batch_size: examples per batch.
    :param shuffle: draw a new random order every pass.
    :param generator: random generator for the order (the global torch stream if ``None``).
    :param transform: ``transform(x_batch) -> x_batch``, applied to every batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"TensorBatches: x has {len(x)} examples but y has {len(y)}")
        if not (is_integer(batch_size) and batch_size >= 1):
            raise ValueError(f"TensorBatches: batch_size={batch_size!r} must be an integer >= 1")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.generator, self.transform = shuffle, generator, transform
        # for code written against DataLoader, e.g. len(loader.dataset)
        self.dataset = TensorDataset(x, y)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # DataLoader draws a base seed for its workers whenever an iterator is made, shuffled
        # or not, even one never used (tqdm makes one it throws away): so do we, eagerly.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = len(self.y), self.batch_size
        order = None
        if self.shuffle:
            # RandomSampler: a fresh generator seeded from the global stream, or the given one.
            generator = self.generator
            if generator is None:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            if order is not None and self.generator is not None and start + size >= n:
                # RandomSampler draws one more (empty) permutation when it runs out
                torch.randperm(n, generator=self.generator)
            if order is None:
                x, y = self.x[start : start + size], self.y[start : start + size]
            else:
                index = order[start : start + size]
                x, y = self.x[index], self.y[index]
            yield (x if self.transform is None else self.transform(x)), y

    def __repr__(self) -> str:
        return (
            f"TensorBatches({len(self.y)} examples, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, transform={self.transform!r})"
        )


class Loaders(NamedTuple):
    """
    Training, validation and test batches, as :func:`train_validation_test_loaders` gives.

    Example::

        >>> loaders = train_validation_test_loaders(load_mnist("mnist"))
        >>> len(loaders.validation.dataset)
        10000
    """

    train: TensorBatches
    validation: TensorBatches
    test: TensorBatches


def train_test_loaders(
    data: ImageData,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[TensorBatches, TensorBatches]:
    """
    Training batches (reshuffled every epoch, optionally augmented) and test batches (in order).

    Example::

        >>> train_loader, test_loader = train_test_loaders(load_mnist("subset"), batch_size=64)
        >>> x, y = next(iter(train_loader))
        >>> x.shape, y.shape
        (torch.Size([64, 1, 28, 28]), torch.Size([64]))

    :param shuffle: reshuffle the training images every epoch (pass a seeded ``generator`` for
        a reproducible order).
    :param transform: augmentation for the training batches only, e.g. :class:`RandomCropFlip`.
    :returns: ``(train_loader, test_loader)`` yielding ``(images, labels)`` batches.
    """
    train = TensorBatches(
        data.train_x,
        data.train_y,
        batch_size,
        shuffle=shuffle,
        generator=generator,
        transform=transform,
    )
    return train, TensorBatches(data.test_x, data.test_y, test_batch_size)


def train_validation_test_loaders(
    data: ImageData,
    validation: int = 10_000,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Loaders:
    """
    Training, validation and test loaders; the validation images are the last training ones.

    If ``data`` has no validation split yet, :func:`train_validation_split` holds out its last
    ``validation`` training images (never test images), so choices tuned on the validation
    error leave the test error honest. Validation and test batches come in order, unaugmented.

    Example::

        >>> train, validation, test = train_validation_test_loaders(load_mnist("mnist"))
        >>> len(train.dataset), len(validation.dataset), len(test.dataset)
        (50000, 10000, 10000)

    :param validation: how many training images to hold out; ignored if ``data`` is split.
    :param transform: augmentation for the training batches only.
    """
    if data.validation_x is None:
        data = train_validation_split(data, validation)
    train, test = train_test_loaders(
        data,
        batch_size,
        test_batch_size,
        shuffle=shuffle,
        generator=generator,
        transform=transform,
    )
    validation_batches = TensorBatches(data.validation_x, data.validation_y, test_batch_size)
    return Loaders(train, validation_batches, test)
