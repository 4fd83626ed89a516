"""The N4 key transform fused with each base attention: "n4-gqa", "n4-swa" and "n4-mla".

Shapes:
    B  batch size        T  new tokens        S  cached tokens plus new ones        C  hidden size
    H  query heads       H_kv  key/value heads        D  head width, C // H        W  window
    Lkv  MLA latent width        R  MLA decoupled RoPE width

N4 replaces each key by a gated, position-weighted running mean of the keys so far (1-based t, j):

    k'_j = (sum_{t<=j} t * tanh(g_t) * k_t) / j^2

Each variant below applies it where its base attention keeps its advantage: GQA's narrow key/value
heads, SWA's bounded cache and MLA's compressed latent cache. The running sum is accumulated in
float32 (``n4.attention.n4_modified_keys_with_state``), and position encoding, where the config sets
one, rotates the modified keys as in "n4".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from n4.attention import RUNNING_SUM, SCALES, n4_modified_keys, n4_modified_keys_with_state
from n4.cache import LayerCache
from variants.attention import CausalSelfAttention
from variants.mla import LATENT, MultiHeadLatentAttention
from variants.registry import ATTENTION

if TYPE_CHECKING:
    from n4.config import ModelConfig

# Name of the per-token MLA cache entry with the gate logits g_t, (B, S, 1).
GATE_LOGITS = "gate_logits"


class N4CausalSelfAttention(CausalSelfAttention):
    """Causal self-attention with H_kv key/value heads, an optional window, and N4 keys.

    A projection ``gate_proj`` (C -> H_kv) gives one gate logit g_t per key/value head and token,
    and the keys of each key/value head become k'_j before position encoding. The query heads of a
    group share their key/value head's modified keys, as they share its keys in GQA. ``scale``
    is "head_dim" for 1/sqrt(D) or "hidden_size" for 1/sqrt(C), the published N4 choice.

    The cache keeps k'_j and v_j (2 * H_kv * D numbers per token, the last W tokens with a window)
    and the float32 running sum (H_kv * D numbers) that continues the mean.
    """

    def __init__(
        self, config: ModelConfig, num_kv_heads: int, window: int | None = None, scale: str = "head_dim"
    ) -> None:
        if scale not in SCALES:
            raise ValueError(
                f"scale={scale!r} is invalid for N4 attention; allowed values: {', '.join(SCALES)}"
            )
        super().__init__(config, num_kv_heads=num_kv_heads, window=window)
        self.scale_option = scale
        self.scale = 1.0 / math.sqrt(config.head_dim if scale == "head_dim" else config.hidden_size)
        self.gate_proj = nn.Linear(config.hidden_size, num_kv_heads, bias=config.bias)

    def transform_keys(self, x: torch.Tensor, k: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """Return the N4 keys (B, H_kv, T, D) of the new tokens, continuing the cached running sum."""
        offset = 0 if cache is None else cache.length
        gate_logits = self.gate_proj(x).transpose(1, 2)  # (B, H_kv, T)
        running_sum = None if cache is None else cache.state.get(RUNNING_SUM)

        keys, running_sum = n4_modified_keys_with_state(k, gate_logits, offset, running_sum)
        if cache is not None:
            cache.state[RUNNING_SUM] = running_sum  # (B, H_kv, D)
        return keys

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale_option!r}"


@ATTENTION.register("n4-gqa")
class N4GroupedQueryAttention(N4CausalSelfAttention):
    """Grouped-query attention over N4 keys, with one gate per key/value head.

    With G = H / H_kv and key/value head m = i // G serving query head i:

        k'_{m,j} = (sum_{t<=j} t * tanh(g_{m,t}) * k_{m,t}) / j^2,   g_{m,t} = (W_g x_t)_m
        out_{i,t} = sum_{j<=t} softmax_j(q_{i,t} . k'_{m,j} * scale) v_{m,j}

    The transform runs on the H_kv key heads, so the cache stays H_kv heads wide, as in GQA. With
    H_kv = H this is "n4" with separate q, k, v and gate projections in place of the fused,
    head-grouped one.
    """

    def __init__(self, config: ModelConfig, scale: str = "head_dim") -> None:
        super().__init__(config, num_kv_heads=config.num_kv_heads, scale=scale)


@ATTENTION.register("n4-swa")
class N4SlidingWindowAttention(N4CausalSelfAttention):
    """Sliding-window attention over N4 keys: the running mean spans the whole prefix, the window
    limits which keys each query attends.

        k'_j      = (sum_{t=1..j} t * tanh(g_t) * k_t) / j^2       (every earlier token, not only W)
        out_{i,t} = sum_{t-W < j <= t} softmax_j(q_{i,t} . k'_j * scale) v_j

    A mean over the whole prefix needs only the running sum as state, so the cache still holds
    only W modified keys and values plus one D-wide sum per head, and k'_j is exactly N4's key.
    A mean over the window alone would have to subtract keys as they leave the window, which needs
    the raw keys of the window cached as well. The price of the prefix mean is that tokens before
    the window still reach the output, through the keys (never through the values). As in "swa",
    every query head has its own key/value head and config.kv_heads is ignored.
    """

    def __init__(self, config: ModelConfig, scale: str = "head_dim") -> None:
        super().__init__(config, num_kv_heads=config.heads, window=config.window, scale=scale)


@ATTENTION.register("n4-mla")
class N4MultiHeadLatentAttention(MultiHeadLatentAttention):
    """Multi-head latent attention whose content keys come from the N4 running mean of the latent.

    One gate logit per token, g_t = W_g h_t (a projection C -> 1), gates the latent c_t^KV:

        c'_j      = (sum_{t<=j} t * tanh(g_t) * c_t^KV) / j^2
        k_{j,i}^C = W_i^UK c'_j,     v_{j,i}^C = W_i^UV c_j^KV       (values from the raw latent)
        k_{j,i}   = [k_{j,i}^C; k_j^R]                               (k^R rotated, not averaged)

    Everything else is "mla". Without a bias in W^UK, W_i^UK c'_j is the N4 mean of the
    decompressed keys W_i^UK c_t^KV, by linearity, with one gate shared by all heads. With a bias
    b, the keys are W_i^UK c'_j + b rather than a mean of biased keys. The RoPE key stays
    unaveraged because a mean of keys rotated at different positions is no rotation at any one
    position, which would break RoPE's dependence on relative position alone.

    Cache: c_t^KV, g_t and k_t^R, Lkv + 1 + R numbers per token. Values need the raw latents, so
    the cache keeps those rather than the means c'_j, which would double the latent cache to
    2 * Lkv + R. Decoding one token moves the mean from the latents to the scores: with
    q~_i = W_i^UK^T q_i^C,

        q~_i . c'_j = (sum_{t<=j} t * tanh(g_t) * (q~_i . c_t)) / j^2

    so each step scores the raw cached latents, as MLA does, and adds a float32 running sum over
    the S scores of each head, O(S * H) work. The softmax scale is MLA's 1/sqrt(N + R), so this
    variant takes no options.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.gate_proj = nn.Linear(config.hidden_size, 1, bias=config.bias)

    def extra_cache_entries(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {GATE_LOGITS: self.gate_proj(x)}  # (B, T, 1)

    def key_latents(self, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the running means c'_j (B, S, Lkv) of every cached token's latent."""
        latent = entries[LATENT]  # (B, S, Lkv)
        gate_logits = entries[GATE_LOGITS]  # (B, S, 1)

        # The transform treats its second dimension as heads: the latent is one head of width Lkv.
        means = n4_modified_keys(latent.unsqueeze(1), gate_logits.squeeze(-1).unsqueeze(1))  # (B, 1, S, Lkv)
        return means.squeeze(1)

    def latent_key_scores(self, q_latent: torch.Tensor, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return q~_i . c'_j (B, H, S) as the running mean of the scores q~_i . c_t of the raw latents."""
        raw_scores = super().latent_key_scores(q_latent, entries)  # (B, H, S)
        gate_logits = entries[GATE_LOGITS].squeeze(-1)  # (B, S), one gate per token for every head

        # Each head's score sequence is a one-wide "key" sequence for the N4 transform.
        gate_logits = gate_logits.unsqueeze(1).expand_as(raw_scores)  # (B, H, S)
        return n4_modified_keys(raw_scores.unsqueeze(-1), gate_logits).squeeze(-1)
