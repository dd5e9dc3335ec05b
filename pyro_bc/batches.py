"""Data as pyro_bc reads it: loaders of ``(x, y)`` batches, checked as they are read.

A loader is anything that yields ``(x, y)`` pairs of tensors, ``y`` holding one integer class
per example: a ``DataLoader``, a list of pairs, :class:`~pyro_bc.datasets.TensorBatches`. Every
function that reads one reads it through :func:`batches`, so that a malformed batch is an error
that names the function, not a broadcast that returns a wrong number (labels of shape ``(B, 1)``
against predictions of shape ``(B,)`` compare as a ``(B, B)`` matrix), and a loader that yields
nothing is an error, not an error rate of 0/0. Functions that read a loader more than once (SVI
epochs, a search over candidates) also refuse one that can be read only once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def require_reiterable(loader, where: str) -> None:
    """Refuses a loader that can be read only once (a generator or another iterator) where it
    is read more than once.

    Example::

        require_reiterable(val_loader, "compress(validation=...)")  # a DataLoader: fine
    """
    if isinstance(loader, Iterator):
        raise TypeError(
            f"{where}: got {type(loader).__name__}, an iterator that can be read only once, but "
            "it is read several times; pass a DataLoader or a list of (x, y) batches"
        )


def batches(loader, where: str):
    """Yields the ``(x, y)`` batches of ``loader``, each checked: a pair of tensors, ``y`` one
    integer label per example of ``x``. Raises if ``loader`` yields no batch.

    Example::

        for x, y in batches(test_loader, "evaluate"):
            ...
    """
    empty = True
    for batch in loader:
        yield checked(batch, where)
        empty = False
    if empty:
        once = ""
        if isinstance(loader, Iterator):
            once = " (an iterator is read once; pass a DataLoader or a list)"
        raise ValueError(f"{where}: the loader yielded no batches{once}")


def checked(batch, where: str):
    """``batch`` as ``(x, y)`` once checked as :func:`batches` checks each (for a loop that must
    iterate the loader itself).

    Example::

        x, y = checked(batch, "fit")
    """
    if not (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        raise TypeError(
            f"{where}: each batch must be an (x, y) pair of tensors, got {_kind(batch)}"
        )
    x, y = batch
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(
            f"{where}: labels must be integer class indices of shape (batch,), got "
            f"{y.dtype} of shape {tuple(y.shape)}"
        )
    if x.dim() == 0 or len(x) != len(y):
        raise ValueError(
            f"{where}: a batch of {len(y)} labels has inputs of shape {tuple(x.shape)}: the "
            "first dimension of x must count the examples"
        )
    return x, y


def check_inputs(x: torch.Tensor, input_shape, where: str) -> None:
    """Raises unless ``x`` is a floating-point batch of examples of ``input_shape`` (any shape
    when it is None), naming ``where`` and the shape the network takes.

    Example::

        check_inputs(x, (1, 28, 28), "fit")  # x of shape (128, 1, 28, 28), float32: fine
    """
    wrong_shape = input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape)
    if wrong_shape or not x.is_floating_point():
        wanted = "(batch, ...)" if input_shape is None else str(("batch", *input_shape))
        wanted = wanted.replace("'batch'", "batch")
        raise ValueError(
            f"{where}: inputs of shape {tuple(x.shape)} and dtype {x.dtype}, but the network "
            f"takes floating-point batches of shape {wanted}; reshape or convert them as the "
            "training inputs were"
        )


def count_outside(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many ``labels`` lie outside ``0..num_classes - 1``, as a tensor on their device
    (read it once, after the loop, not per batch).

    Example::

        bad += count_outside(y, logits.shape[-1])
    """
    return ((labels < 0) | (labels >= num_classes)).sum()


def check_labels_inside(count: torch.Tensor, num_classes: int, where: str) -> None:
    """Raises if :func:`count_outside`'s sum ``count`` is not zero.

    Example::

        check_labels_inside(bad, 10, "evaluate")
    """
    if int(count):
        raise ValueError(
            f"{where}: {int(count)} labels lie outside 0..{num_classes - 1}, the classes the "
            "network predicts; check the data's labels"
        )


def _kind(batch) -> str:
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(type(t).__name__ for t in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"a {type(batch).__name__} of {len(batch)} ({inner})"
    return type(batch).__name__
