"""Multi-head latent attention, "mla" (DeepSeek-V2, arXiv 2405.04434, section 2.1).

Shapes:
    B  batch size       T  sequence length       C  hidden size
    H  heads            N  qk_nope_head_dim      R  qk_rope_head_dim (decoupled RoPE width)
    V  v_head_dim       Lkv  kv_lora_rank        Lq  q_lora_rank (0: no query latent)

Widths come from ``ModelConfig.mla_dims``.
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

# Names of the per-token cache entries: c^KV (B, S, Lkv) and the rotated k^R (B, 1, S, R).
LATENT = "latent"
ROPE_KEYS = "rope_keys"


@ATTENTION.register("mla")
class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention with a decoupled RoPE key shared by all heads.

    For token t with input h_t and head i (DeepSeek-V2, equations 9 to 19):

        c_t^KV  = W^DKV h_t                          joint key/value latent, Lkv wide
        k_t^C   = W^UK c_t^KV,   v_t^C = W^UV c_t^KV  per head: N and V wide
        k_t^R   = RoPE(W^KR h_t)                     R wide, one for all heads
        c_t^Q   = W^DQ h_t                           only when Lq > 0, else c_t^Q = h_t
        q_t^C   = W^UQ c_t^Q,        q_t^R = RoPE(W^QR c_t^Q)   per head: N and R wide
        q_t,i   = [q_t,i^C; q_t,i^R],   k_t,i = [k_t,i^C; k_t^R]
        o_t,i   = sum_{j<=t} softmax_j(q_t,i . k_j,i / sqrt(N + R)) v_j,i^C
        u_t     = W^O [o_t,1; ...; o_t,H]

    With Lq = 0, ``q_proj`` is W^Q and ``q_rope_proj`` is W^QR, both applied to h_t directly.
    When config.position is "none", q^R and k^R are kept but not rotated.

    Cache: per token and layer only c_t^KV and k_t^R, Lkv + R numbers, against 2 * H * D for
    multi-head attention. Decoding one token at a time absorbs W^UK into the query and applies
    W^UV after attention, so attention runs on the cached latents directly. Full-sequence calls
    decompress keys and values, which is cheaper when there are many queries. Both are the same
    function.

    NOTE: DeepSeek-V2's released model code also applies an RMSNorm to c^Q and c^KV
    (``q_a_layernorm`` and ``kv_a_layernorm``), which the equations above omit. This module follows
    the equations and has no latent norm.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dims = config.mla_dims
        self.hidden_size = config.hidden_size
        self.heads = config.heads
        self.kv_lora_rank = dims["kv_lora_rank"]
        self.q_lora_rank = dims["q_lora_rank"]
        self.nope_dim = dims["qk_nope_head_dim"]
        self.rope_dim = dims["qk_rope_head_dim"]
        self.v_head_dim = dims["v_head_dim"]
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if dims[name] < 1:
                raise ValueError(f"{name}={dims[name]} is invalid for MLA: expected a positive integer")
        if self.rope_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.rope_dim} is invalid: RoPE needs an even width")
        self.dropout = config.dropout
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        bias = config.bias
        C, H = config.hidden_size, config.heads

        # Queries: directly from h (Lq = 0) or through the latent c^Q.
        if self.q_lora_rank > 0:
            self.q_down = nn.Linear(C, self.q_lora_rank, bias=bias)  # W^DQ
            q_in = self.q_lora_rank
        else:
            self.q_down = None
            q_in = C
        self.q_proj = nn.Linear(q_in, H * self.nope_dim, bias=bias)  # W^UQ, or W^Q when Lq = 0
        self.q_rope_proj = nn.Linear(q_in, H * self.rope_dim, bias=bias)  # W^QR

        # Keys and values: the joint latent, its up-projections and the shared RoPE key.
        self.kv_down = nn.Linear(C, self.kv_lora_rank, bias=bias)  # W^DKV
        self.k_up = nn.Linear(self.kv_lora_rank, H * self.nope_dim, bias=bias)  # W^UK
        self.v_up = nn.Linear(self.kv_lora_rank, H * self.v_head_dim, bias=bias)  # W^UV
        self.k_rope_proj = nn.Linear(C, self.rope_dim, bias=bias)  # W^KR

        self.o_proj = nn.Linear(H * self.v_head_dim, C, bias=bias)  # W^O
        self.position = POSITION[config.position](self.rope_dim, config.max_seq_len, config.rope_theta)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Attend over x (B, T, C), or with ``cache`` over the cached tokens followed by x.

        The cache stores c^KV and the rotated k^R of every token, Lkv + R numbers per token (plus
        what ``extra_cache_entries`` adds). A call with one new token and a cache attends in the
        latent space, with W^UK absorbed into the query and W^UV applied after attention. Every
        other call decompresses keys and values. Both compute the same function.
        """
        B, T, C = x.shape
        H = self.heads
        offset = 0 if cache is None else cache.length

        # Queries: content part q^C (B, H, T, N) and decoupled part q^R (B, H, T, R).
        q_in = self.q_down(x) if self.q_down is not None else x
        q_nope = self.q_proj(q_in).view(B, T, H, self.nope_dim).transpose(1, 2)
        q_rope = self.q_rope_proj(q_in).view(B, T, H, self.rope_dim).transpose(1, 2)

        # The latent c^KV (B, T, Lkv) and the one-head RoPE key k^R (B, 1, T, R).
        latent = self.kv_down(x)
        k_rope = self.k_rope_proj(x).view(B, T, 1, self.rope_dim).transpose(1, 2)

        # Rotate only the decoupled parts, so the latent path stays position-free and cacheable.
        q_rope, k_rope = self.position(q_rope, k_rope, offset=offset)

        # With a cache, continue every per-token entry: S tokens from here on (S = T without a cache).
        entries = {LATENT: latent, ROPE_KEYS: k_rope, **self.extra_cache_entries(x)}
        if cache is not None:
            entries = dict(zip(entries, cache.update(entries)))

        # Attention, per head over keys [k^C; k^R] and values v^C (B, H, T, V).
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and T == 1 and dropout_p == 0.0:
            y = self._attend_absorbed(q_nope, q_rope, entries)
        else:
            key_latent = self.key_latents(entries)  # (B, S, Lkv)
            y = self._attend_decompressed(q_nope, q_rope, key_latent, entries[LATENT], entries[ROPE_KEYS], dropout_p)

        # Concatenate heads (B, T, H * V) and project out.
        y = y.transpose(1, 2).reshape(B, T, H * self.v_head_dim)
        return self.o_proj(y)

    def extra_cache_entries(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return per-token tensors (B, T, width) of x that the cache keeps besides c^KV and k^R.

        The base class adds none. ``key_latents`` and ``latent_key_scores`` receive them for every
        cached token.
        """
        return {}

    def key_latents(self, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the latents (B, S, Lkv) that W^UK decompresses into content keys.

        ``entries`` contains every token's c^KV (B, S, Lkv), k^R and the extra entries. Plain MLA
        uses c^KV itself.
        """
        return entries[LATENT]

    def _attend_decompressed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        key_latent: torch.Tensor,
        value_latent: torch.Tensor,
        k_rope: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        """Attend with per-head keys W^UK c (B, H, S, N) and values W^UV c (B, H, S, V)."""
        B, H, _, _ = q_nope.shape
        S = key_latent.shape[1]
        k_nope = self.k_up(key_latent).view(B, S, H, self.nope_dim).transpose(1, 2)
        v = self.v_up(value_latent).view(B, S, H, self.v_head_dim).transpose(1, 2)

        # Per head q = [q^C; q^R] and k = [k^C; k^R], with k^R shared by every head.
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, N + R)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)  # (B, H, S, N + R)

        # SDPA accepts a value width V other than the query/key width N + R, but PyTorch's fused CPU
        # kernel does not (torch 2.13): SDPA then falls back to its math kernel, which materialises
        # the (T, S) scores. Zero columns appended to v keep the fused kernel; their outputs are
        # zero and are dropped.
        width = q.shape[-1]
        if self.v_head_dim < width:
            y = causal_attention(q, k, F.pad(v, (0, width - self.v_head_dim)), scale=self.scale, dropout_p=dropout_p)
            return y[..., : self.v_head_dim]
        return causal_attention(q, k, v, scale=self.scale, dropout_p=dropout_p)

    def latent_key_scores(self, q_latent: torch.Tensor, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the content scores (B, H, S) of one new token's latent queries q_latent (B, H, Lkv).

        Score j of head i is q_latent_i . (key latent j), which equals q_i^C . k_{j,i}^C up to a
        key bias term that is the same for every j. Plain MLA scores the cached c^KV directly.
        """
        return q_latent @ entries[LATENT].transpose(1, 2)  # (B, H, Lkv) @ (B, Lkv, S)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attend in the latent space for one new token, without decompressing the S cached latents.

        Per head i, q_i^C . (W_i^UK c_j + b_i) = (W_i^UK^T q_i^C) . c_j + q_i^C . b_i, and the last
        term is the same for every key j, so the softmax ignores it. The attention output
        sum_j a_j (W_i^UV c_j + b_i^V) is W_i^UV (sum_j a_j c_j) + b_i^V because the weights a_j sum
        to 1, which is true only without attention dropout. Returns (B, H, 1, V).
        """
        B, H, T, _ = q_nope.shape
        if T != 1:
            raise ValueError(f"latent-space attention takes one new token per call, got {T}")
        k_up = self.k_up.weight.view(H, self.nope_dim, self.kv_lora_rank)  # W^UK per head (N, Lkv)
        v_up = self.v_up.weight.view(H, self.v_head_dim, self.kv_lora_rank)  # W^UV per head (V, Lkv)

        # Scores of the H heads against the S cached tokens, with heads in the row dimension so
        # that the one shared key head is never copied per query head.
        q_latent = torch.einsum("bhn,hnl->bhl", q_nope[:, :, 0], k_up)  # (B, H, Lkv)
        content_scores = self.latent_key_scores(q_latent, entries)  # (B, H, S)
        rope_scores = q_rope[:, :, 0] @ entries[ROPE_KEYS][:, 0].transpose(1, 2)  # (B, H, R) @ (B, R, S)

        # Every cached token precedes the new one, so there is no mask. Softmax in float32, as SDPA does.
        scores = (content_scores + rope_scores) * self.scale
        weights = scores.float().softmax(dim=-1).to(q_nope.dtype)  # (B, H, S)
        y_latent = weights @ entries[LATENT]  # (B, H, Lkv)

        # Decompress the attention output per head.
        y = torch.einsum("bhl,hvl->bhv", y_latent, v_up)  # (B, H, V)
        if self.v_up.bias is not None:
            y = y + self.v_up.bias.view(H, self.v_head_dim)
        return y.unsqueeze(2)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"qk_nope_head_dim={self.nope_dim}, qk_rope_head_dim={self.rope_dim}, v_head_dim={self.v_head_dim}"
        )
