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

from variants.registry import ATTENTION, POSITION

if TYPE_CHECKING:
    from n4.config import ModelConfig


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

    Cache this would allow: per token and layer only c_t^KV and k_t^R, Lkv + R numbers, against
    2 * H * D for multi-head attention. At inference W^UK can be absorbed into the query projection
    and W^UV into W^O, so attention runs on the latent directly. This module computes the
    un-absorbed form, which is the same function.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.heads

        # Queries: content part q^C (B, H, T, N) and decoupled part q^R (B, H, T, R).
        q_in = self.q_down(x) if self.q_down is not None else x
        q_nope = self.q_proj(q_in).view(B, T, H, self.nope_dim).transpose(1, 2)
        q_rope = self.q_rope_proj(q_in).view(B, T, H, self.rope_dim).transpose(1, 2)

        # Keys and values from the latent c^KV (B, T, Lkv), and the one-head RoPE key k^R (B, 1, T, R).
        latent = self.kv_down(x)
        k_nope = self.k_up(latent).view(B, T, H, self.nope_dim).transpose(1, 2)
        v = self.v_up(latent).view(B, T, H, self.v_head_dim).transpose(1, 2)
        k_rope = self.k_rope_proj(x).view(B, T, 1, self.rope_dim).transpose(1, 2)

        # Rotate only the decoupled parts, so the latent path stays position-free and cacheable.
        q_rope, k_rope = self.position(q_rope, k_rope)

        # Per head q = [q^C; q^R] and k = [k^C; k^R], with k^R shared by every head.
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, N + R)
        k = torch.cat((k_nope, k_rope.expand(B, H, T, self.rope_dim)), dim=-1)  # (B, H, T, N + R)

        # Attention. SDPA allows a value width V different from the query/key width N + R.
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.scale)

        # Concatenate heads (B, T, H * V) and project out.
        y = y.transpose(1, 2).reshape(B, T, H * self.v_head_dim)
        return self.o_proj(y)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"qk_nope_head_dim={self.nope_dim}, qk_rope_head_dim={self.rope_dim}, v_head_dim={self.v_head_dim}"
        )
