"""Baseline feed-forward blocks: "swiglu" and "gelu".

Shapes:
    B  batch size    T  sequence length    C  hidden size    M  intermediate size (inter_size)

Every builder takes ``(hidden_size, inter_size, bias=False)`` and returns a module mapping
(B, T, C) to (B, T, C). Weights per block: SwiGLU 3 * C * M, GELU 2 * C * M (without biases), so a
parameter-matched comparison gives them different intermediate sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from variants.registry import MLP


@MLP.register("swiglu")
class SwiGLU(nn.Module):
    """SwiGLU feed-forward block, down(silu(gate(x)) * up(x)) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, hidden_size: int, inter_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, inter_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, inter_size, bias=bias)
        self.down_proj = nn.Linear(inter_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gate: Swish-1 (SiLU) of one projection scales the other, elementwise.
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, M)

        # Project back to the hidden size.
        return self.down_proj(hidden)


@MLP.register("gelu")
class GeluMLP(nn.Module):
    """Two-layer feed-forward block down(gelu(up(x))) with the exact erf GELU, not the tanh
    approximation (Hendrycks and Gimpel, arXiv 1606.08415)."""

    def __init__(self, hidden_size: int, inter_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, inter_size, bias=bias)
        self.down_proj = nn.Linear(inter_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Expand and apply the exact GELU, x * Phi(x).
        hidden = F.gelu(self.up_proj(x))  # (B, T, M)

        # Project back to the hidden size.
        return self.down_proj(hidden)
