"""N4 attention: causal softmax attention over gated, position-weighted running means of the keys.

Shapes:
    B  batch size        T  sequence length        C  hidden size (config.hidden_size)
    H  heads             D  head width, C // H

Per head, with 1-based positions t and j, and g_t the gate logit of the head at position t:

    gate_t = tanh(g_t)
    k'_j   = (sum_{t<=j} t * gate_t * k_t) / j^2
    out_i  = sum_{j<=i} softmax_j(q_i . k'_j * scale) v_j

k'_j depends only on positions <= j, so the layer is ordinary causal attention on modified keys. It
runs on F.scaled_dot_product_attention with is_causal=True and builds no T x T mask or key-weight
matrix, which the published code does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from n4.config import ModelConfig

# Softmax scale choices: 1/sqrt(head_dim) is the usual one, and 1/sqrt(hidden_size) is what the
# published N4 code uses and its README formula writes.
SCALES = ("head_dim", "hidden_size")


def n4_modified_keys(k: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Return the N4 keys k'_j = (sum_{t<=j} t * tanh(g_t) * k_t) / j^2, with t and j 1-based.

    k: (B, H, T, D), gate_logits: (B, H, T). The result has k's shape and dtype.

    The running sum grows like j^2, so in bfloat16 its later terms would be rounded away. It is
    therefore accumulated in float32, or in k's dtype where that is wider (float64 stays float64).
    """
    if k.ndim != 4 or gate_logits.shape != k.shape[:3]:
        raise ValueError(
            f"expected k of shape (B, H, T, D) and gate_logits of shape (B, H, T), "
            f"got {tuple(k.shape)} and {tuple(gate_logits.shape)}"
        )
    accumulate_dtype = torch.promote_types(k.dtype, torch.float32)
    seq_len = k.shape[2]
    positions = torch.arange(1, seq_len + 1, device=k.device, dtype=accumulate_dtype)  # (T,)

    # Position-weighted, gated keys t * tanh(g_t) * k_t.
    weights = positions * torch.tanh(gate_logits.to(accumulate_dtype))  # (B, H, T)
    weighted_keys = weights.unsqueeze(-1) * k.to(accumulate_dtype)  # (B, H, T, D)

    # Causal running sum over positions, then the 1 / j^2 normalisation.
    running_sum = weighted_keys.cumsum(dim=2)  # (B, H, T, D)
    return (running_sum / positions.square().unsqueeze(-1)).to(k.dtype)


def split_head_grouped_qkvh(
    qkvh: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection output (B, T, 3C + H) into q, k, v (B, H, T, D) and gates (B, H, T).

    The first 3C channels are grouped by head, as in the published checkpoint: head 0's q, k, v
    (D channels each), then head 1's, and so on. The last H channels are the gate logits in head
    order. Reading them as [all q | all k | all v] would silently give a different model.
    """
    batch, seq_len, width = qkvh.shape
    hidden_size, rest = divmod(width - heads, 3)
    if rest or hidden_size % heads:
        raise ValueError(f"a projection of width {width} does not split into 3C + H channels with H={heads}")
    head_dim = hidden_size // heads

    qkv, gate_logits = qkvh.split([3 * hidden_size, heads], dim=-1)
    q, k, v = qkv.view(batch, seq_len, heads, 3, head_dim).unbind(dim=3)  # each (B, T, H, D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate_logits.transpose(1, 2)


class N4Attention(nn.Module):
    """N4 attention with a fused q/k/v/gate projection (C -> 3C + H) and an output projection.

    ``scale`` selects the softmax scale: "head_dim" for 1/sqrt(D), or "hidden_size" for 1/sqrt(C),
    the published choice. Position encoding (config.position) is applied to q and to the modified
    keys k'. The published model uses none.
    """

    def __init__(self, config: ModelConfig, scale: str = "head_dim") -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r} is invalid for N4 attention; allowed values: {', '.join(SCALES)}")
        # Imported here because variants imports this module to register it.
        import variants

        self.hidden_size = config.hidden_size
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.scale = scale
        self.softmax_scale = 1.0 / math.sqrt(config.head_dim if scale == "head_dim" else config.hidden_size)

        self.qkvh_linear = nn.Linear(config.hidden_size, 3 * config.hidden_size + config.heads, bias=config.bias)
        self.out_linear = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.position = variants.POSITION[config.position](config.head_dim, config.max_seq_len, config.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = x.shape

        # Fused projection, split into head-grouped q, k, v and one gate logit per head.
        q, k, v, gate_logits = split_head_grouped_qkvh(self.qkvh_linear(x), self.heads)  # (B, H, T, D), (B, H, T)

        # Replace the keys by their gated, position-weighted running mean.
        k = n4_modified_keys(k, gate_logits)  # (B, H, T, D)

        # Position encoding acts on the keys that attention actually compares against.
        q, k = self.position(q, k, offset=0)

        # Causal attention on the modified keys. The kernel applies the causal mask itself.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
        )  # (B, H, T, D)

        # Concatenate the heads and project back to C.
        y = y.transpose(1, 2).reshape(batch, seq_len, hidden_size)  # (B, T, C)
        return self.out_linear(y)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, scale={self.scale!r}"
