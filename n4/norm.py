"""DyT (Dynamic Tanh), the element-wise replacement for normalisation layers that N4 uses.

Shapes:
    ...  any leading dimensions        C  channels (dim)

The DyT paper (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025,
arXiv 2503.10622) defines DyT(x) = gamma * tanh(alpha * x) + beta with a learnable scalar alpha and
per-channel gamma and beta. The published N4 code uses the reduced form gamma * tanh(x), which is
``DyT(dim, alpha_init=None, bias=False)``.
"""

from __future__ import annotations

import torch
from torch import nn


class DyT(nn.Module):
    """gamma * tanh(alpha * x) + beta over the last dimension.

    ``alpha_init`` is the initial value of the learnable scalar ``alpha`` (0.5 in the DyT paper);
    None removes alpha, giving tanh(x). ``bias=False`` removes beta. ``weight`` (gamma) starts at
    ones and ``bias`` (beta) at zeros.
    """

    def __init__(self, dim: int, alpha_init: float | None = 0.5, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        if alpha_init is None:
            self.register_parameter("alpha", None)
        else:
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None:
            x = self.alpha * x
        y = torch.tanh(x) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha={self.alpha is not None}, bias={self.bias is not None}"
