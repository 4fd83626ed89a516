"""Baseline normalisation layers: "layernorm" and "rmsnorm", as PyTorch's own modules.

Every builder takes ``(dim, **options)`` and returns a module mapping (..., dim) to (..., dim).
"""

from __future__ import annotations

from torch import nn

from variants.registry import NORM


@NORM.register("layernorm")
def layer_norm(dim: int, eps: float = 1e-5, bias: bool = True) -> nn.LayerNorm:
    """Return LayerNorm (Ba et al., arXiv 1607.06450) over the last dimension, with a learnable gain
    and, unless ``bias=False``, a learnable bias."""
    return nn.LayerNorm(dim, eps=eps, bias=bias)


@NORM.register("rmsnorm")
def rms_norm(dim: int, eps: float = 1e-6) -> nn.RMSNorm:
    """Return RMSNorm (Zhang and Sennrich, arXiv 1910.07467), x / sqrt(mean(x^2) + eps) * gain."""
    return nn.RMSNorm(dim, eps=eps)
