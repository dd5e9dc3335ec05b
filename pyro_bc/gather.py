"""``Gather``: the module in front of a thinned dense layer that keeps the inputs it still reads."""

from __future__ import annotations

import torch
from torch import nn


class Gather(nn.Module):
    """Keeps the features at ``index`` of the last dimension: the inputs a dense layer still reads.

    Example::

        gather = Gather(torch.tensor([0, 2, 5]), in_features=6)
        gather(torch.arange(6.0).expand(2, 6))  # tensor([[0., 2., 5.], [0., 2., 5.]])
    """

    def __init__(self, index, in_features: int):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1 or (index.numel() and not 0 <= index.min() <= index.max()):
            raise ValueError("Gather: index must be a 1-d tensor of non-negative positions")
        if index.numel() and index.max() >= in_features:
            raise ValueError(f"Gather: index {int(index.max())} >= in_features ({in_features})")
        self.in_features = in_features
        self.register_buffer("index", index)

    @property
    def out_features(self) -> int:
        return self.index.numel()

    def forward(self, x):
        return x.index_select(-1, self.index)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"
