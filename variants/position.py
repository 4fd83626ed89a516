"""Position encodings applied to queries and keys inside attention: "none" and "rope".

Shapes:
    B  batch size          T  number of positions in this call
    H  query heads         H_kv  key heads (may differ from H, for example in GQA or MLA)
    D  rotated head width  L  max_seq_len, the number of positions the tables cover

Every builder takes ``(head_dim, max_seq_len, theta)`` and returns a module whose
``forward(q, k, offset=0)`` maps q (B, H, T, D) and k (B, H_kv, T, D) to tensors of the same shapes.
``offset`` is the position of the first of the T tokens, so cached decoding can rotate new tokens
at their true positions.
"""

from __future__ import annotations

import torch
from torch import nn

from variants.registry import POSITION


@POSITION.register("none")
class NoPosition(nn.Module):
    """Identity: attention gets no position signal besides the causal mask (N4 as published)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the halves [x1, x2] of the last dimension to [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@POSITION.register("rope")
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864).

    Channel j of the first half and channel j + D/2 form one 2-D pair (the "rotate-half" pairing of
    GPT-NeoX and LLaMA, not the interleaved pairs of the paper), rotated at position m by the angle
    m * theta^(-2j/D). After rotation q_m . k_n depends on the positions only through m - n.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} is odd: RoPE rotates channel pairs and needs an even width")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len} is invalid: expected a positive integer")
        if theta <= 0:
            raise ValueError(f"theta={theta!r} is invalid: expected a positive number")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = float(theta)

        # Non-persistent: the tables are derived from the three arguments, so checkpoints skip them.
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (L, D)
        self.register_buffer("sin", sin, persistent=False)  # (L, D)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the float32 cos and sin tables, (L, D) each, on ``device``."""
        # Angles in float64 on the CPU (some accelerators lack float64), rounded once at the end.
        # The device is explicit so that building under a default device such as "meta" still works.
        cpu = torch.device("cpu")
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=cpu) / self.head_dim
        inv_freq = self.theta**-exponents  # (D/2,)
        positions = torch.arange(self.max_seq_len, dtype=torch.float64, device=cpu)  # (L,)
        angles = torch.outer(positions, inv_freq)  # (L, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (L, D): channel j and j + D/2 share an angle
        return angles.cos().to(device, torch.float32), angles.sin().to(device, torch.float32)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = max(q.shape[-2], k.shape[-2])
        if offset < 0:
            raise ValueError(f"offset={offset} is invalid: expected a position >= 0")
        if offset + seq_len > self.max_seq_len:
            raise ValueError(
                f"position {offset + seq_len - 1} is beyond max_seq_len={self.max_seq_len} "
                f"(offset={offset}, {seq_len} positions): raise max_seq_len in the model config"
            )

        # NOTE: Module.to(dtype) also casts floating-point buffers. Tables rounded to bf16 or fp16
        # put visible errors into the rotations of late positions, so rebuild them in float32.
        if self.cos.dtype not in (torch.float32, torch.float64):
            self.cos, self.sin = self._tables(self.cos.device)

        return self._rotate(q, offset), self._rotate(k, offset)

    def _rotate(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Rotate x (B, heads, T, D) as positions offset .. offset + T - 1, in at least float32."""
        seq_len = x.shape[-2]
        cos = self.cos[offset : offset + seq_len]  # (T, D), broadcast over B and heads
        sin = self.sin[offset : offset + seq_len]
        wide = x.to(torch.promote_types(x.dtype, cos.dtype))
        return (wide * cos + rotate_half(wide) * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta:g}"
