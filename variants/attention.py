"""Standard causal self-attention baselines: "mha", "gqa" and "swa".

Shapes:
    B  batch size        T  sequence length        C  hidden size (config.hidden_size)
    H  query heads       H_kv  key/value heads     D  head width, C // H
    W  sliding window (config.window)

All three share one implementation, ``CausalSelfAttention``, and differ only in the number of
key/value heads and the window. They run on ``F.scaled_dot_product_attention``: "mha" and "gqa"
with ``is_causal=True`` and no mask tensor, "swa" with a cached boolean band mask. With a
``LayerCache`` (cached decoding) they cache H_kv key/value heads, "swa" only its last W tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from n4.cache import LayerCache, causal_attention
from variants.registry import ATTENTION, POSITION

if TYPE_CHECKING:
    from n4.config import ModelConfig


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Return the (T, T) boolean mask, True where query i may attend key j: i - W < j <= i."""
    positions = torch.arange(seq_len, device=device)
    distance = positions[:, None] - positions[None, :]  # (T, T): i - j
    return (distance >= 0) & (distance < window)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with H_kv key/value heads and an optional sliding window.

    Query head i reads key/value head i // (H // H_kv): contiguous groups of query heads share one
    key/value head, the layout ``repeat_interleave`` produces. H_kv = H is multi-head attention
    (Vaswani et al., arXiv 1706.03762); 1 < H_kv < H is grouped-query attention (Ainslie et al.,
    arXiv 2305.13245). With ``window`` W, query i attends keys i - W + 1 .. i, W keys including
    itself; None attends all earlier keys.
    """

    def __init__(self, config: ModelConfig, num_kv_heads: int, window: int | None = None) -> None:
        super().__init__()
        if config.hidden_size % config.heads:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by heads={config.heads}")
        if num_kv_heads < 1 or config.heads % num_kv_heads:
            divisors = [d for d in range(1, config.heads + 1) if config.heads % d == 0]
            raise ValueError(
                f"kv_heads={num_kv_heads} does not divide heads={config.heads}; allowed values: {divisors}"
            )
        if window is not None and window < 1:
            raise ValueError(f"window={window} is invalid: expected an integer >= 1")

        self.hidden_size = config.hidden_size
        self.heads = config.heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = config.head_dim
        self.window = window
        self.dropout = config.dropout
        self.scale = self.head_dim**-0.5

        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.position = POSITION[config.position](self.head_dim, config.max_seq_len, config.rope_theta)

        # Band mask for the last sequence length seen, rebuilt when T or the device changes.
        self._window_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Attend over x (B, T, C), or with ``cache`` over the cached tokens followed by x.

        The cache stores the rotated keys and the values, 2 * H_kv * D numbers per token, and with
        a window only the last W tokens.
        """
        B, T, C = x.shape
        offset = 0 if cache is None else cache.length

        # Project to per-head queries, keys and values.
        q, k, v = self.project_qkv(x)  # (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)

        # Key transform of derived variants (identity here).
        k = self.transform_keys(x, k, cache)  # (B, H_kv, T, D)

        # Position encoding ("rope" rotates q and k; "none" leaves them unchanged).
        q, k = self.position(q, k, offset=offset)

        # With a cache, attend over the cached tokens too: keys and values become (B, H_kv, S, D).
        if cache is not None:
            k, v = cache.update({"keys": k, "values": v}, keep=self.window)

        # Attention.
        y = self.attend(q, k, v)  # (B, H, T, D)

        # Concatenate heads and project out.
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x (B, T, C) to q (B, H, T, D) and k, v (B, H_kv, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def transform_keys(self, x: torch.Tensor, k: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """Return the keys (B, H_kv, T, D) that attention uses, before position encoding.

        The identity here. A subclass may replace the keys of the new tokens x (B, T, C), reading
        and updating its own state in ``cache.state``, where ``cache.length`` tokens come before x.
        """
        return k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return causal softmax attention of q (B, H, T, D) over k, v (B, H_kv, S, D), as (B, H, T, D).

        The T queries are the last T of the S key positions, so S > T after a cache.
        """
        query_len, key_len = q.shape[-2], k.shape[-2]
        dropout_p = self.dropout if self.training else 0.0
        # SDPA's enable_gqa repeats key/value heads as repeat_interleave does, which gives the
        # contiguous grouping above. It stays off when every query head has its own key/value head.
        enable_gqa = self.num_kv_heads != self.heads

        # The full-sequence band mask is kept between calls because training reuses one length.
        if self.window is not None and self.window < key_len and query_len == key_len:
            mask = self._band_mask(query_len, q.device)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale, enable_gqa=enable_gqa
            )
        return causal_attention(
            q, k, v, scale=self.scale, window=self.window, dropout_p=dropout_p, enable_gqa=enable_gqa
        )

    def _band_mask(self, seq_len: int, device: torch.device) -> torch.Tensor:
        mask = self._window_mask
        if mask is None or mask.shape[0] != seq_len or mask.device != device:
            mask = sliding_window_mask(seq_len, self.window, device)
            self._window_mask = mask
        return mask

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"window={self.window}, dropout={self.dropout}"
        )


@ATTENTION.register("mha")
class MultiHeadAttention(CausalSelfAttention):
    """Causal multi-head attention, softmax scale 1/sqrt(head_dim); ignores config.kv_heads and window."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, num_kv_heads=config.heads)


@ATTENTION.register("gqa")
class GroupedQueryAttention(CausalSelfAttention):
    """Grouped-query attention with config.num_kv_heads key/value heads (Ainslie et al., arXiv 2305.13245)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, num_kv_heads=config.num_kv_heads)


@ATTENTION.register("swa")
class SlidingWindowAttention(CausalSelfAttention):
    """Causal attention over the last config.window keys, every query head with its own key/value head.

    This is the window of Mistral 7B (Jiang et al., arXiv 2310.06825) without the key/value head
    sharing that Mistral adds: config.kv_heads is ignored, so this variant changes only the window.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, num_kv_heads=config.heads, window=config.window)
