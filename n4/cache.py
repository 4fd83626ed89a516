"""Key/value caches for incremental decoding, and causal attention for queries that follow a cache.

Shapes:
    B  batch size         T  new tokens in this call         S  tokens in an entry after the call
    H  query heads        H_kv  key/value heads              D  head width
    W  sliding window

Every attention in ``variants.ATTENTION`` has ``forward(x, cache=None)``. With a cache, ``x`` holds
only the new tokens, which follow the ``cache.length`` tokens already seen. The attention then:

1. reads ``cache.length`` as the position offset of its first new token (for RoPE and for N4's
   1-based position weights),
2. calls ``cache.update({...})`` once with its per-token entries for the new tokens, such as keys
   and values, and gets back each entry for every cached token with the new ones appended,
3. keeps any fixed-size state, such as N4's float32 running key sum, in ``cache.state``,
4. attends with ``causal_attention``, which aligns the T queries with the last T of the S keys.

What an attention stores is its own choice. ``LayerCache`` only appends, trims to a window and
counts, so a new attention variant needs no new cache class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

# Token dimension of every per-token cache entry, such as keys (B, H, S, D) or MLA latents (B, S, L).
TOKEN_DIM = -2


class LayerCache:
    """Cached state of one attention layer for a batch of sequences.

    ``length`` is the number of tokens the layer has seen, which is the 0-based position of the
    next token. Per-token entries live in ``update``'s buffers. An entry updated with ``keep=W``
    holds only its last W tokens. Fixed-size state that does not grow with the sequence lives in
    the ``state`` dict.

    NOTE: the cache is for inference. Buffers are written in place, so backpropagating through
    more than one cached call fails with PyTorch's in-place modification error.
    """

    def __init__(self) -> None:
        self.length = 0
        self.state: dict[str, torch.Tensor] = {}
        # Per-token entries. An unwindowed entry is a buffer with spare capacity along TOKEN_DIM,
        # grown by doubling, so that appending one token does not copy the whole history.
        self._buffers: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, int] = {}

    def update(self, new: Mapping[str, torch.Tensor], keep: int | None = None) -> tuple[torch.Tensor, ...]:
        """Append the new tokens of each entry and return every entry with all its tokens.

        ``new`` maps entry names to tensors whose dimension -2 indexes the T new tokens (the same T
        for every entry). The result has one tensor per entry, in the order of ``new``: the cached
        tokens followed by the new ones. With ``keep=W`` the returned tensor still contains all old
        tokens plus the T new ones, so that the new queries can see W keys each, but the cache
        keeps only the last W. ``length`` advances by T, so an attention calls this once per
        forward pass.
        """
        if not new:
            raise ValueError("update needs at least one cache entry")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} is invalid: expected None or a number of tokens >= 1")
        new_tokens = {name: tensor.shape[TOKEN_DIM] for name, tensor in new.items()}
        if len(set(new_tokens.values())) != 1:
            raise ValueError(f"cache entries disagree on the number of new tokens: {new_tokens}")

        results = tuple(self._append(name, tensor, keep) for name, tensor in new.items())
        self.length += next(iter(new_tokens.values()))
        return results

    def _append(self, name: str, tensor: torch.Tensor, keep: int | None) -> torch.Tensor:
        if tensor.ndim < 3:
            raise ValueError(
                f"cache entry {name!r} has shape {tuple(tensor.shape)}: expected (batch, ..., tokens, width)"
            )
        old = self.entry(name)
        if old is not None and (old.shape[:-2] != tensor.shape[:-2] or old.shape[-1] != tensor.shape[-1]):
            raise ValueError(
                f"cache entry {name!r} has shape {tuple(old.shape)} and cannot take new tokens of shape "
                f"{tuple(tensor.shape)}: the batch size or width changed"
            )

        # A windowed entry is small (at most W tokens), so it is rebuilt by concatenation and trimmed.
        if keep is not None:
            full = tensor if old is None else torch.cat((old, tensor), dim=TOKEN_DIM)
            kept = full[..., -keep:, :]
            if full.shape[TOKEN_DIM] > 2 * keep:
                kept = kept.clone()  # a view would keep a long prompt's tokens in memory
            self._buffers[name] = kept
            self._sizes[name] = kept.shape[TOKEN_DIM]
            return full

        # An unwindowed entry grows in place while its buffer has room.
        size = self._sizes.get(name, 0)
        needed = size + tensor.shape[TOKEN_DIM]
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[TOKEN_DIM] < needed:
            capacity = max(needed, 2 * (0 if buffer is None else buffer.shape[TOKEN_DIM]), 16)
            grown = tensor.new_empty((*tensor.shape[:-2], capacity, tensor.shape[-1]))
            if size:
                grown[..., :size, :] = buffer[..., :size, :]
            buffer = grown
            self._buffers[name] = buffer
        buffer[..., size:needed, :] = tensor
        self._sizes[name] = needed
        return buffer[..., :needed, :]

    def entry(self, name: str) -> torch.Tensor | None:
        """Return the cached tokens of entry ``name`` (a view, tokens along dimension -2), or None."""
        buffer = self._buffers.get(name)
        if buffer is None:
            return None
        return buffer[..., : self._sizes[name], :]

    def entries(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, cached tokens) for every per-token entry."""
        for name in self._buffers:
            yield name, self.entry(name)

    @property
    def numbers_per_token(self) -> int:
        """Numbers stored per cached token and sequence, summed over the per-token entries.

        This is the width the cache grows by for each token, before any window stops its growth.
        Zero before the first update.
        """
        total = 0
        for _, tensor in self.entries():
            # The dimensions between batch and tokens (such as heads) times the width.
            total += math.prod(tensor.shape[1:TOKEN_DIM]) * tensor.shape[-1]
        return total

    @property
    def state_numbers(self) -> int:
        """Numbers of fixed-size state per sequence, such as N4's running key sum."""
        return sum(tensor[0].numel() for tensor in self.state.values())

    def numbers(self) -> int:
        """Numbers held per sequence now: every cached token of every entry, plus the fixed state."""
        return sum(tensor[0].numel() for _, tensor in self.entries()) + self.state_numbers

    def __repr__(self) -> str:
        held = {name: tuple(tensor.shape) for name, tensor in self.entries()}
        state = {name: tuple(tensor.shape) for name, tensor in self.state.items()}
        return f"LayerCache(length={self.length}, entries={held}, state={state})"


class ModelCache:
    """One ``LayerCache`` per decoder block, for ``CausalLM.forward(input_ids, cache=...)``."""

    def __init__(self, layers: int) -> None:
        if layers < 1:
            raise ValueError(f"layers={layers} is invalid: expected a positive integer")
        self.layers = [LayerCache() for _ in range(layers)]

    @property
    def length(self) -> int:
        """Tokens seen so far, which is the position of the next token."""
        return self.layers[0].length

    @property
    def numbers_per_token(self) -> int:
        """Numbers stored per cached token and sequence, summed over the layers."""
        return sum(layer.numbers_per_token for layer in self.layers)

    @property
    def state_numbers(self) -> int:
        """Numbers of fixed-size state per sequence, summed over the layers."""
        return sum(layer.state_numbers for layer in self.layers)

    def numbers(self) -> int:
        """Numbers held per sequence now, summed over the layers."""
        return sum(layer.numbers() for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerCache:
        return self.layers[index]

    def __repr__(self) -> str:
        return f"ModelCache(layers={len(self.layers)}, length={self.length})"


def causal_mask(
    query_len: int, key_len: int, window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Return the boolean (T, S) mask of T queries that are the last T of S key positions.

    Query i sits at key position i + S - T, so it may attend key j when j <= i + S - T, and with a
    window W also when j > i + S - T - W (W keys, itself included). This bottom-right alignment is
    what cached decoding needs. SDPA's ``is_causal=True`` aligns the top-left corner instead,
    which is only the same when T == S.
    """
    if key_len < query_len:
        raise ValueError(f"{query_len} queries cannot be the last positions of only {key_len} keys")
    query_positions = torch.arange(key_len - query_len, key_len, device=device)[:, None]  # (T, 1)
    key_positions = torch.arange(key_len, device=device)[None, :]  # (1, S)
    distance = query_positions - key_positions  # (T, S)
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Return causal softmax attention of q (B, H, T, D) over k (B, H_kv, S, D) and v (B, H_kv, S, Dv).

    The T queries are the last T of the S key positions (see ``causal_mask``). ``window`` W limits
    each query to its last W keys. The call picks the cheapest exact form of
    ``F.scaled_dot_product_attention``: ``is_causal=True`` when T == S and the window covers
    everything, no mask at all for one query (after slicing its last W keys), and an explicit
    bottom-right mask otherwise.
    """
    query_len, key_len = q.shape[-2], k.shape[-2]
    if window is not None and window >= key_len:
        window = None  # every query's window reaches back past the first key

    if window is None and query_len == key_len:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    if query_len == 1:
        if window is not None:
            k, v = k[..., -window:, :], v[..., -window:, :]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
    mask = causal_mask(query_len, key_len, window, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
    )
