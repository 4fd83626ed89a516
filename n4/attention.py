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
matrix, which the published code does. For the same reason it has a KV cache: the modified keys of
past tokens never change, and the running sum (one D-wide vector per head) continues the mean.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: F401 because tests patch F.scaled_dot_product_attention through this name
from torch import nn

from n4.cache import LayerCache, causal_attention

if TYPE_CHECKING:
    from n4.config import ModelConfig

# Softmax scale choices: 1/sqrt(head_dim) is the usual one, and 1/sqrt(hidden_size) is what the
# published N4 code uses and its README formula writes.
SCALES = ("head_dim", "hidden_size")

# Name of the float32 running key sum in a LayerCache's state.
RUNNING_SUM = "key_running_sum"


def n4_modified_keys(k: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Return the N4 keys k'_j = (sum_{t<=j} t * tanh(g_t) * k_t) / j^2, with t and j 1-based.

    k: (B, H, T, D), gate_logits: (B, H, T). The result has k's shape and dtype.

    The running sum grows like j^2, so in bfloat16 its later terms would be rounded away. It is
    therefore accumulated in float32, or in k's dtype where that is wider (float64 stays float64).
    """
    keys, _ = n4_modified_keys_with_state(k, gate_logits)
    return keys


def n4_modified_keys_with_state(
    k: torch.Tensor, gate_logits: torch.Tensor, offset: int = 0, running_sum: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue the N4 key running mean over T new tokens that follow ``offset`` earlier ones.

    k: (B, H, T, D), gate_logits: (B, H, T). ``running_sum`` (B, H, D) is sum_{t<=offset} t *
    tanh(g_t) * k_t over the earlier tokens (None when offset is 0). The new tokens have 1-based
    positions offset + 1 .. offset + T. Returns the modified keys (B, H, T, D) in k's dtype and the
    running sum after the last new token, (B, H, D) in the accumulation dtype (float32, or k's
    dtype where that is wider). That sum is the whole state N4 needs to continue the mean.
    """
    if k.ndim != 4 or gate_logits.shape != k.shape[:3]:
        raise ValueError(
            f"expected k of shape (B, H, T, D) and gate_logits of shape (B, H, T), "
            f"got {tuple(k.shape)} and {tuple(gate_logits.shape)}"
        )
    if offset < 0:
        raise ValueError(f"offset={offset} is invalid: expected a number of earlier tokens >= 0")
    if (running_sum is None) != (offset == 0):
        raise ValueError(f"a running sum is needed exactly when offset > 0, got offset={offset}")
    accumulate_dtype = torch.promote_types(k.dtype, torch.float32)
    seq_len = k.shape[2]
    positions = torch.arange(offset + 1, offset + seq_len + 1, device=k.device, dtype=accumulate_dtype)  # (T,)

    # Position-weighted, gated keys t * tanh(g_t) * k_t.
    weights = positions * torch.tanh(gate_logits.to(accumulate_dtype))  # (B, H, T)
    weighted_keys = weights.unsqueeze(-1) * k.to(accumulate_dtype)  # (B, H, T, D)

    # Causal running sum over positions, continued from the earlier tokens, then the 1 / j^2 normalisation.
    running_sums = weighted_keys.cumsum(dim=2)  # (B, H, T, D)
    if running_sum is not None:
        running_sums = running_sums + running_sum.to(accumulate_dtype).unsqueeze(2)
    keys = (running_sums / positions.square().unsqueeze(-1)).to(k.dtype)
    return keys, running_sums[:, :, -1]


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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Attend over x (B, T, C), or with ``cache`` over the cached tokens followed by x.

        The cache stores the rotated modified keys and the values of every token, 2 * C numbers per
        token, plus the float32 running key sum (C numbers) that continues the mean.
        """
        batch, seq_len, hidden_size = x.shape
        offset = 0 if cache is None else cache.length

        # Fused projection, split into head-grouped q, k, v and one gate logit per head.
        q, k, v, gate_logits = split_head_grouped_qkvh(self.qkvh_linear(x), self.heads)  # (B, H, T, D), (B, H, T)

        # Replace the keys by their gated, position-weighted running mean, continued from the cache.
        running_sum = None if cache is None else cache.state.get(RUNNING_SUM)
        k, running_sum = n4_modified_keys_with_state(k, gate_logits, offset, running_sum)  # (B, H, T, D)

        # Position encoding acts on the keys that attention actually compares against.
        q, k = self.position(q, k, offset=offset)

        # With a cache, attend over every cached token: keys and values become (B, H, S, D).
        if cache is not None:
            cache.state[RUNNING_SUM] = running_sum
            k, v = cache.update({"keys": k, "values": v})

        # Causal attention on the modified keys. Without a cache the kernel applies the causal mask itself.
        y = causal_attention(
            q, k, v, scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)

        # Concatenate the heads and project back to C.
        y = y.transpose(1, 2).reshape(batch, seq_len, hidden_size)  # (B, T, C)
        return self.out_linear(y)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, scale={self.scale!r}"
