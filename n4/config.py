"""The model configuration shared by every variant of the decoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Options of the published N4 code (see the README's "N4 as published" section): the softmax
# scale is 1/sqrt(hidden_size) rather than 1/sqrt(head_dim), and DyT is gamma * tanh(x) with no
# alpha and no beta.
PUBLISHED_ATTENTION_OPTIONS = {"scale": "hidden_size"}
PUBLISHED_NORM_OPTIONS = {"alpha_init": None, "bias": False}


@dataclass
class ModelConfig:
    """Sizes and variant names of a decoder-only language model.

    ``attention``, ``mlp``, ``norm`` and ``position`` are names from the registries in ``variants``.
    ``*_options`` are keyword options for the chosen variant's builder, for example
    ``attention_options={"scale": "hidden_size"}`` for the published N4 softmax scale.
    """

    vocab_size: int
    hidden_size: int
    inter_size: int
    heads: int
    layers: int
    attention: str = "n4"
    mlp: str = "asgg"
    norm: str = "dyt"
    position: str = "none"

    # Grouped-query attention: number of key/value heads, a divisor of ``heads`` (None means heads).
    kv_heads: int | None = None
    # Sliding-window attention: query i attends keys i-W+1 .. i, W keys including itself.
    window: int = 256
    # Rotary position embedding.
    max_seq_len: int = 4096
    rope_theta: float = 10000.0

    # Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434); None derives the value shown.
    kv_lora_rank: int | None = None  # d_c, width of the joint key/value latent; hidden_size // 2
    q_lora_rank: int = 0  # d_c', width of the query latent; 0 projects queries directly
    qk_nope_head_dim: int | None = None  # per-head query/key width without RoPE; head_dim
    qk_rope_head_dim: int | None = None  # d_h^R, width of the decoupled RoPE query/key; head_dim // 2
    v_head_dim: int | None = None  # per-head value width; head_dim

    bias: bool = False
    dropout: float = 0.0

    attention_options: dict[str, Any] = field(default_factory=dict)
    mlp_options: dict[str, Any] = field(default_factory=dict)
    norm_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def mla_dims(self) -> dict[str, int]:
        """MLA widths with the defaults filled in: kv_lora_rank, q_lora_rank, nope, rope, v."""
        return {
            "kv_lora_rank": self.kv_lora_rank if self.kv_lora_rank is not None else self.hidden_size // 2,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim if self.qk_nope_head_dim is not None else self.head_dim,
            "qk_rope_head_dim": (
                self.qk_rope_head_dim if self.qk_rope_head_dim is not None else max(2, self.head_dim // 2)
            ),
            "v_head_dim": self.v_head_dim if self.v_head_dim is not None else self.head_dim,
        }

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what is allowed."""
        for name in ("vocab_size", "hidden_size", "inter_size", "heads", "layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by heads={self.heads}: "
                f"choose heads among the divisors of hidden_size"
            )
        if self.kv_heads is not None:
            if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
                raise ValueError(f"kv_heads={self.kv_heads!r} is invalid: expected a positive integer")
            if self.heads % self.kv_heads:
                divisors = [d for d in range(1, self.heads + 1) if self.heads % d == 0]
                raise ValueError(
                    f"kv_heads={self.kv_heads} does not divide heads={self.heads}; "
                    f"allowed values: {divisors}"
                )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r} is invalid: expected an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} is invalid: expected 0 <= dropout < 1")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} is invalid: expected a positive number")
        for name, value in self.mla_dims.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a non-negative integer")
        if self.mla_dims["qk_rope_head_dim"] % 2:
            raise ValueError(
                f"qk_rope_head_dim={self.mla_dims['qk_rope_head_dim']} is invalid: RoPE needs an even width"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd: RoPE needs an even head width")
        self._validate_variants()

    def _validate_variants(self) -> None:
        # Imported here because variants imports the N4 layers, which import this module.
        import variants

        variants.ATTENTION.check_options(self.attention, self.attention_options, fixed=("config",))
        variants.MLP.check_options(self.mlp, self.mlp_options, fixed=("hidden_size", "inter_size", "bias"))
        variants.NORM.check_options(self.norm, self.norm_options, fixed=("dim",))
        variants.POSITION[self.position]  # raises UnknownVariantError listing the valid names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def published(cls, vocab_size: int, hidden_size: int, inter_size: int, heads: int, layers: int) -> ModelConfig:
        """Return the N4 configuration as the published code builds it: N4 attention with scale
        1/sqrt(hidden_size), ASGG, the reduced DyT gamma * tanh(x) and no position encoding."""
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            inter_size=inter_size,
            heads=heads,
            layers=layers,
            attention="n4",
            mlp="asgg",
            norm="dyt",
            position="none",
            attention_options=dict(PUBLISHED_ATTENTION_OPTIONS),
            norm_options=dict(PUBLISHED_NORM_OPTIONS),
        )
