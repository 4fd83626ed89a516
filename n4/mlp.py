"""ASGG (Adaptive Swish-GELU Gating), the MLP of N4.

Shapes:
    B  batch size        T  sequence length        C  hidden size        M  intermediate size

As published:

    [a, r, u] = split_3(W_up x)              (gate a, reference r, value u; M channels each)
    mlp(x)    = W_down(gelu(r) * sigmoid(a) * u)

ASGG has 4 * C * M weights, against 3 * C * M for SwiGLU and 2 * C * M for a GELU MLP of the same
M, so parameter-matched comparisons need different intermediate sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Negative slope of the Kaiming-normal initialisation in the published code.
KAIMING_NEGATIVE_SLOPE = math.sqrt(0.5)


class ASGG(nn.Module):
    """Adaptive Swish-GELU Gating MLP: C -> 3M (gate, reference, value) -> M -> C."""

    def __init__(self, hidden_size: int, inter_size: int, bias: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inter_size = inter_size
        self.up_proj = nn.Linear(hidden_size, 3 * inter_size, bias=bias)
        self.down_proj = nn.Linear(inter_size, hidden_size, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw both weights from Kaiming-normal with negative slope sqrt(0.5), as the published
        code does (fan-in mode, std = sqrt(2 / 1.5) / sqrt(fan_in)), and zero any biases."""
        for linear in (self.up_proj, self.down_proj):
            nn.init.kaiming_normal_(linear.weight, a=KAIMING_NEGATIVE_SLOPE)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Up-projection, split in the published order: gate, reference, value.
        gate, reference, value = self.up_proj(x).chunk(3, dim=-1)  # (B, T, M) each

        # Exact (erf) GELU of the reference, sigmoid-gated, times the value.
        hidden = F.gelu(reference) * torch.sigmoid(gate) * value  # (B, T, M)

        return self.down_proj(hidden)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, inter_size={self.inter_size}"
