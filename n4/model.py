"""The decoder-only language model shared by every ablation variant.

Shapes:
    B  batch size        T  sequence length        C  hidden size        V  vocabulary size

A model is: token embedding -> L decoder blocks -> lm_head (untied, no bias), with no final norm,
as in N4. The attention, MLP and norm of every block come from the registries in ``variants``,
selected by name in the ``ModelConfig``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from n4.cache import LayerCache, ModelCache
from n4.config import ModelConfig

# Label value that the loss skips (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


# ``variants`` is imported inside the builders because it imports the N4 layers in this package.
def build_attention(config: ModelConfig) -> nn.Module:
    import variants

    return variants.ATTENTION[config.attention](config, **config.attention_options)


def build_mlp(config: ModelConfig) -> nn.Module:
    import variants

    return variants.MLP[config.mlp](config.hidden_size, config.inter_size, bias=config.bias, **config.mlp_options)


def build_norm(config: ModelConfig) -> nn.Module:
    import variants

    return variants.NORM[config.norm](config.hidden_size, **config.norm_options)


class DecoderBlock(nn.Module):
    """Decoder block with "sandwich" norms around both sub-layers (as in Gemma 2):

        h = x + post_attn_norm(attention(pre_attn_norm(x)))
        y = h + post_mlp_norm(mlp(pre_mlp_norm(h)))

    Residual dropout (config.dropout) applies to each branch just before it is added.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Submodule order follows the published checkpoint: attention, mlp, then the four norms.
        self.attention = build_attention(config)
        self.mlp = build_mlp(config)
        self.pre_attn_norm = build_norm(config)
        self.post_attn_norm = build_norm(config)
        self.pre_mlp_norm = build_norm(config)
        self.post_mlp_norm = build_norm(config)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        # Attention sub-layer. The cache goes only to attentions that are asked to use one, so an
        # attention without cache support still trains and generates without a cache.
        normed = self.pre_attn_norm(x)
        attended = self.attention(normed) if cache is None else self.attention(normed, cache=cache)
        h = x + self.residual_dropout(self.post_attn_norm(attended))  # (B, T, C)

        # MLP sub-layer.
        return h + self.residual_dropout(self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h))))  # (B, T, C)


class CausalLM(nn.Module):
    """Decoder-only language model: embedding -> blocks -> lm_head, float32 logits.

    ``forward(input_ids)`` returns logits (B, T, V), and ``forward(input_ids, labels)`` returns
    ``(logits, loss)``. The loss is the mean next-token cross-entropy of the logits at t against
    the labels at t + 1, skipping labels equal to -100.

    ``forward(input_ids, cache=cache)`` with a cache from ``new_cache()`` reads input_ids as the
    tokens that follow the ``cache.length`` tokens already processed, returns their logits and
    appends them to the cache. ``generate`` and ``stream`` sample continuations.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: ModelCache | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
            )
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(
                f"the cache has {len(cache)} layers but the model has {len(self.blocks)}: "
                f"create it with model.new_cache()"
            )

        # Token embedding. Position information, if any, comes from the attention variant.
        x = self.embedding(input_ids)  # (B, T, C)

        # Decoder blocks, each with its own layer cache.
        for index, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache[index])

        # Vocabulary projection with no final norm, cast to float32 for an accurate softmax.
        logits = self.lm_head(x).float()  # (B, T, V)
        if labels is None:
            return logits

        # Next-token loss: the logits at t predict the token at t + 1.
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return logits, loss

    def new_cache(self) -> ModelCache:
        """Return an empty cache for ``forward(..., cache=...)``, one layer cache per block.

        Raises TypeError when the configured attention's forward takes no ``cache`` argument.
        """
        parameters = inspect.signature(self.blocks[0].attention.forward).parameters
        if "cache" not in parameters:
            raise TypeError(
                f"attention {self.config.attention!r} does not support a KV cache: its forward takes no "
                f"'cache' argument. Generate with use_cache=False, or add forward(x, cache=None) to it"
            )
        return ModelCache(len(self.blocks))

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return input_ids (B, T) followed by up to ``max_new_tokens`` sampled tokens, (B, T + N).

        See ``n4.generate.generate`` for the sampling rules: temperature 0 is greedy, top_k and
        top_p filter the distribution, and a row that emits ``eos_token_id`` is padded with it
        until every row has, or until N tokens.
        """
        from n4.generate import generate

        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            generator=generator,
        )

    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Return an iterator over the sampled tokens, one (B,) tensor per step; see ``generate``."""
        from n4.generate import stream

        return stream(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            generator=generator,
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Count the parameters, buffers excluded.

        ``exclude_embeddings`` leaves out the embedding and lm_head, the convention behind N4's
        "127M parameters" (about 178M in all).
        """
        excluded: set[int] = set()
        if exclude_embeddings:
            excluded = {id(p) for p in (*self.embedding.parameters(), *self.lm_head.parameters())}
        return sum(p.numel() for p in self.parameters() if id(p) not in excluded)

    def flops_per_token(self, seq_len: int) -> int:
        """Estimate the training FLOPs (forward and backward) per token at sequence length ``seq_len``.

        Uses the formula of PaLM (Chowdhery et al., arXiv 2204.02311, appendix B):
        6 * N + 12 * L * T * C. N counts the weights of every matmul, lm_head included and the
        embedding lookup excluded, taken here as every parameter with two or more dimensions outside
        nn.Embedding modules. The second term covers the attention scores and the weighted sum of
        values. The estimate ignores element-wise work (norms, activations, N4's key running sum)
        and the work that the causal mask saves.
        """
        embedding_ids = {
            id(p) for module in self.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
        }
        matmul_parameters = sum(p.numel() for p in self.parameters() if p.ndim >= 2 and id(p) not in embedding_ids)
        config = self.config
        return 6 * matmul_parameters + 12 * config.layers * seq_len * config.hidden_size
