"""N4C: the published N4 model's constructor and checkpoint layout on top of ``CausalLM``.

N4C is ``CausalLM(ModelConfig.published(...))`` whose ``state_dict()`` and ``load_state_dict()``
use the key names of the published code, so a checkpoint saved by either loads into the other:

    published key                          CausalLM key
    n4b.embedding.*                        embedding.*
    n4b.n4d.{i}.n4.*                       blocks.{i}.attention.*
    n4b.n4d.{i}.mlp.*                      blocks.{i}.mlp.*
    n4b.n4d.{i}.pre_n4_norm.*              blocks.{i}.pre_attn_norm.*
    n4b.n4d.{i}.post_n4_norm.*             blocks.{i}.post_attn_norm.*
    n4b.n4d.{i}.pre_mlp_norm.*             blocks.{i}.pre_mlp_norm.*
    n4b.n4d.{i}.post_mlp_norm.*            blocks.{i}.post_mlp_norm.*
    lm_head.*                              lm_head.*

The published attention also owns a per-head DyT, ``n4.norm.weight`` (D values), that its forward
pass never calls. N4C keeps it as a persistent buffer, ``blocks.{i}.attention.norm.weight``, so
that checkpoints round-trip, while optimisers and parameter counts ignore it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from n4.config import ModelConfig
from n4.model import CausalLM

# Renames inside one block, published prefix -> CausalLM prefix.
_BLOCK_PREFIXES = {
    "n4.": "attention.",
    "mlp.": "mlp.",
    "pre_n4_norm.": "pre_attn_norm.",
    "post_n4_norm.": "post_attn_norm.",
    "pre_mlp_norm.": "pre_mlp_norm.",
    "post_mlp_norm.": "post_mlp_norm.",
}
_PUBLISHED_BLOCK = re.compile(r"n4b\.n4d\.(\d+)\.(.+)")
_INTERNAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")

# The unused per-head norm of the published attention, as N4C names it (relative to a block).
_UNUSED_HEAD_NORM_KEY = "attention.norm.weight"

# Prefix that loading gives to keys outside the published layout. No module matches it, so
# PyTorch reports those keys as unexpected, and the post-hook restores their original names.
_NOT_PUBLISHED = "<not in the published layout>."


def _replace_prefix(key: str, renames: Mapping[str, str]) -> str | None:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def published_key_to_internal(key: str) -> str | None:
    """Return the CausalLM name of a published checkpoint key, or None if the key is not in the
    published layout."""
    match = _PUBLISHED_BLOCK.fullmatch(key)
    if match:
        index, rest = match.groups()
        renamed = _replace_prefix(rest, _BLOCK_PREFIXES)
        return None if renamed is None else f"blocks.{index}.{renamed}"
    return _replace_prefix(key, {"n4b.embedding.": "embedding.", "lm_head.": "lm_head."})


def internal_key_to_published(key: str) -> str | None:
    """Return the published checkpoint name of a CausalLM key, or None if it has none."""
    match = _INTERNAL_BLOCK.fullmatch(key)
    if match:
        index, rest = match.groups()
        renamed = _replace_prefix(rest, {new: old for old, new in _BLOCK_PREFIXES.items()})
        return None if renamed is None else f"n4b.n4d.{index}.{renamed}"
    return _replace_prefix(key, {"embedding.": "n4b.embedding.", "lm_head.": "lm_head."})


def published_to_causal_lm_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a published N4 state dict to the key names of ``CausalLM``.

    The result loads strictly into ``CausalLM(ModelConfig.published(...))``. The unused per-head
    norm weights are dropped because CausalLM has no such buffer. A key outside the published
    layout raises ValueError.
    """
    converted = {}
    for key, value in state_dict.items():
        internal = published_key_to_internal(key)
        if internal is None:
            raise ValueError(
                f"state dict key {key!r} is not in the published N4 layout: expected n4b.embedding.*, "
                f"n4b.n4d.<i>.<n4|mlp|pre_n4_norm|post_n4_norm|pre_mlp_norm|post_mlp_norm>.* or lm_head.*"
            )
        block = _INTERNAL_BLOCK.fullmatch(internal)
        if block is not None and block.group(2) == _UNUSED_HEAD_NORM_KEY:
            continue
        converted[internal] = value
    return converted


class _UnusedHeadNorm(nn.Module):
    """Holder of the per-head DyT weight that the published attention creates but never uses."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the published per-head norm of N4 attention only stores a weight and is never applied")


# The hooks below are module-level functions rather than methods because PyTorch marks a hook
# registered through register_state_dict_post_hook with an attribute, and a bound method takes none.


def _save_published_keys(module: N4C, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: rename this model's keys to the published layout, keeping their order."""
    # Remove all of them before inserting any, so that a new name cannot overwrite an old one.
    keys = [key for key in state_dict if key.startswith(prefix)]
    entries = [(key, state_dict.pop(key)) for key in keys]
    for key, value in entries:
        local_key = key[len(prefix) :]
        published = internal_key_to_published(local_key)
        state_dict[prefix + (published if published is not None else local_key)] = value


def _load_published_keys(
    module: N4C,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: rename published keys to CausalLM names before PyTorch matches them.

    Keys outside the published layout, CausalLM names included, are moved where nothing matches,
    so strict loading reports them as unexpected instead of loading or dropping them.
    """
    module._original_key_names = {}
    module._load_prefix = prefix
    # Remove all of them before inserting any, because a renamed published key must not overwrite
    # a CausalLM name given alongside it.
    keys = [key for key in state_dict if key.startswith(prefix)]
    entries = [(key, state_dict.pop(key)) for key in keys]
    for key, value in entries:
        local_key = key[len(prefix) :]
        internal = published_key_to_internal(local_key)
        new_key = prefix + (internal if internal is not None else _NOT_PUBLISHED + local_key)
        state_dict[new_key] = value
        module._original_key_names[new_key] = key


def _report_published_keys(module: N4C, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: name missing and unexpected keys as the published layout does."""
    prefix = module._load_prefix
    missing = incompatible_keys.missing_keys
    for position, key in enumerate(missing):
        if key.startswith(prefix):
            published = internal_key_to_published(key[len(prefix) :])
            if published is not None:
                missing[position] = prefix + published
    unexpected = incompatible_keys.unexpected_keys
    for position, key in enumerate(unexpected):
        unexpected[position] = module._original_key_names.get(key, key)


class N4C(CausalLM):
    """The published N4 model: N4 attention with scale 1/sqrt(C), ASGG, the reduced DyT
    gamma * tanh(x) and no position encoding, with the published checkpoint key names.

    The constructor and the forward contract match the published class: ``model(input_ids)``
    returns float32 logits (B, T, V), and ``model(input_ids, labels)`` returns ``(logits, loss)``.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, inter_size: int, heads: int, layers: int, bias: bool = False
    ) -> None:
        config = ModelConfig.published(vocab_size, hidden_size, inter_size, heads, layers)
        super().__init__(dataclasses.replace(config, bias=bias))
        for block in self.blocks:
            block.attention.add_module("norm", _UnusedHeadNorm(self.config.head_dim))

        self._load_prefix = ""
        self._original_key_names: dict[str, str] = {}
        self.register_state_dict_post_hook(_save_published_keys)
        self.register_load_state_dict_pre_hook(_load_published_keys)
        self.register_load_state_dict_post_hook(_report_published_keys)
