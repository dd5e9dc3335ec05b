"""
Training augmentation on batches of image tensors, without torchvision.

Example::

    >>> augment = RandomCropFlip(padding=4, generator=torch.Generator().manual_seed(0))
    >>> augment(torch.zeros(128, 3, 32, 32)).shape
    torch.Size([128, 3, 32, 32])
"""

from __future__ import annotations

import torch

from ..checks import is_integer

__all__ = ["RandomCropFlip"]


class RandomCropFlip:
    """
    The usual CIFAR augmentation: a random crop from the zero-padded image and a random
    horizontal flip, drawn independently for every image of a batch.

    Each image of ``x`` (shape ``(N, C, H, W)``) is padded with ``padding`` zeros on every side
    (zero is the channel mean after ``"channel"`` normalisation), an ``H x W`` window is cut at
    an offset drawn uniformly from ``0..2 * padding`` in each direction, and it is mirrored left
    to right with probability ``flip``. The draws come from ``generator`` (the global torch
    random stream if ``None``). Use it as the ``transform`` of a :class:`TensorBatches`.

    Example::

        >>> cifar = load_cifar10("~/data/cifar10")
        >>> augment = RandomCropFlip(generator=torch.Generator().manual_seed(0))
        >>> train_loader, test_loader = train_test_loaders(cifar, transform=augment)

    :param padding: zeros added on each side before cropping back to the input size.
    :param flip: probability of a horizontal flip.
    :param generator: random generator for the offsets and flips.
    """

    def __init__(
        self, padding: int = 4, flip: float = 0.5, *, generator: torch.Generator | None = None
    ):
        if not (is_integer(padding) and padding >= 0):
            raise ValueError(f"RandomCropFlip: padding={padding!r} must be an integer >= 0")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"RandomCropFlip: flip={flip!r} must be a probability in [0, 1]")
        self.padding, self.flip, self.generator = padding, flip, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"RandomCropFlip: expected a batch of images (N, C, H, W), got shape "
                f"{tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        p = self.padding
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
            left = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
            # every window as a view (N, C, 2p + 1, 2p + 1, H, W); one gather picks each image's
            windows = padded.unfold(2, h, 1).unfold(3, w, 1)
            x = windows[torch.arange(n), :, top, left]
        flips = torch.rand(n, generator=self.generator) < self.flip
        return torch.where(flips.view(n, 1, 1, 1), x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"
